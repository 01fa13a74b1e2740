"""benchmarks/ stays runnable as src/ changes: every script imports (so a renamed r1cli name fails here, not on a
GPU machine later), every runner step names a script and a config that exist, shape names resolve to the one copy
of each config, and a run folder gets its date, its label and a manifest that says what it was run on."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
from paths import HUB_CONFIGS, ROOT

BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_script_imports(name):
    module = importlib.import_module(name)
    assert module.__doc__, f"benchmarks/{name}.py says what it measures in its docstring"


def test_every_runner_step_names_a_script_and_configs_that_exist():
    import run

    for suite, steps in run.SUITES.items():
        names = [s.name for s in steps]
        assert len(names) == len(set(names)), suite
        for step in steps:
            first = step.argv[0]
            if first.startswith("benchmarks/"):
                assert (ROOT / first).is_file(), (suite, step.name)
            args = list(step.argv)
            if "--config" in args:
                value = args[args.index("--config") + 1]
                assert any((base / value / "config.json").is_file() for base in (ROOT, HUB_CONFIGS, BENCHMARKS / "configs")), \
                    (suite, step.name, value)
    # the GPU suite starts with its checks (the gpu-marked tests) and fits one device call
    assert run.GPU[0].name == "gpu-tests" and "tests/gpu" in run.GPU[0].argv
    assert run.BUDGETS["gpu"] < 600


def test_config_names_resolve_to_the_one_copy():
    import common

    assert common.config_dir("DeepSeek-V2-Lite") == HUB_CONFIGS / "DeepSeek-V2-Lite"
    assert common.config_dir("Qwen2.5-0.5B") == BENCHMARKS / "configs" / "Qwen2.5-0.5B"
    assert common.config_dir(HUB_CONFIGS / "DeepSeek-R1" / "config.json") == HUB_CONFIGS / "DeepSeek-R1"
    # no alias's config is copied into benchmarks/configs
    assert not {p.name for p in (BENCHMARKS / "configs").iterdir()} & {p.name for p in HUB_CONFIGS.iterdir()}
    with pytest.raises(SystemExit, match="known names"):
        common.config_dir("No-Such-Model")
    cfg = common.shape_config("DeepSeek-R1", layers=4, dense_layers=1)
    assert (cfg["num_hidden_layers"], cfg["first_k_dense_replace"]) == (4, 1)


def test_a_run_folder_is_dated_and_its_manifest_says_where_it_ran(tmp_path):
    import record

    first, second = record.new_run("cpu-x", root=tmp_path), record.new_run("cpu-x", root=tmp_path)
    assert first.name.endswith("-cpu-x") and second.name == first.name + "-2"
    assert first.name[:4].isdigit() and first.name[4] == "-"
    record.write_manifest(first, ["benchmarks/run.py", "cpu"], steps=[{"name": "a", "status": "pending"}])
    record.write_manifest(first, ["ignored: the first call's command stays"], steps=[{"name": "a", "status": "ok"}])
    m = json.loads((first / "manifest.json").read_text())
    assert m["command"] == "benchmarks/run.py cpu" and m["steps"] == [{"name": "a", "status": "ok"}]
    assert len(m["commit"]) == 40 and m["machine"]["versions"]["torch"]
    assert m["machine"]["cpu"]["cores"] and isinstance(m["machine"]["cpu"]["flags"], list)
    assert m["load"] in ("quiet", "loaded", "unknown")


def test_every_kept_result_folder_has_a_manifest_naming_its_files():
    folders = [p for p in (BENCHMARKS / "results").iterdir() if p.is_dir()]
    assert folders
    for folder in folders:
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest.get("date") or manifest.get("started"), folder.name
        files = {p.name for p in folder.iterdir()} - {"manifest.json"}
        if "files" in manifest:
            assert set(manifest["files"]) == files, folder.name
