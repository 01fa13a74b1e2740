"""The first minutes with r1 (issue #17): CLI conventions (--version, -h everywhere, bare `r1`, metavars, --debug
anywhere), missing local paths, `r1 show` before a download, the CPU feature module, progress on long work.

In-process through cli.main where a process adds nothing; the fake Hub (tests/hf_server.py) where the network is
the point. The pty side (Ctrl-C, type-ahead, /help, the thought figures) is in tests/test_repl.py.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import r1_env, run_r1
from hf_server import TINY_QWEN2_CONFIG, FakeHub, Repo, tiny_qwen2_repo
from paths import HUB_CONFIGS

from r1cli import cli, cpu
from r1cli import hub as r1hub
from r1cli.errors import ModelNotFoundError
from r1cli.registry import resolve_name

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("run", "chat", "serve", "pull", "list", "rm", "show", "bench")


def r1_main(capsys, *argv) -> tuple[int, str, str]:
    """cli.main in this process: (exit code, stdout, stderr)."""
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


# -- CLI conventions ---------------------------------------------------------------------------------------------


def test_version_bare_r1_and_help_on_every_command(capsys):
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)  # 3.10: no tomllib
    assert r1_main(capsys, "--version") == (0, f"r1 {version}\n", "")

    code, out, err = r1_main(capsys)  # bare r1: the help, success, nothing on stderr
    assert code == 0 and err == "" and "Usage: r1 [OPTIONS] COMMAND" in out and all(c in out for c in COMMANDS)
    for args in [("-h",), *((c, "-h") for c in COMMANDS), *((c, "--help") for c in COMMANDS)]:
        code, out, err = r1_main(capsys, *args)
        assert code == 0 and err == "", (args, err)
        assert f"Usage: r1 {args[0] if len(args) == 2 else ''}".rstrip() in out, (args, out)
        # typer's type labels and doubled brackets are gone; flags have no metavar, values a plain one
        assert not any(bad in out for bad in ("<bool>", "<str>", "<int>", "<float>", "<list", "[[", "{")), (args, out)
    assert "Usage: r1 run [OPTIONS] [MODEL] [PROMPT]..." in r1_main(capsys, "run", "-h")[1]
    assert "Usage: r1 show [OPTIONS] NAME" in r1_main(capsys, "show", "-h")[1]
    assert "INTEGER" in r1_main(capsys, "show", "-h")[1]


def test_debug_before_or_after_the_command_and_r1_debug(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("R1_DEBUG", "")
    missing = str(tmp_path / "nothing-here")
    code, _, err = r1_main(capsys, "show", missing)
    assert code == 3 and err == f"r1: no such file or folder: {missing}\n"
    for argv in (["--debug", "show", missing], ["show", missing, "--debug"], ["show", "--debug", missing]):
        monkeypatch.setenv("R1_DEBUG", "")
        with pytest.raises(ModelNotFoundError):  # the traceback, not the one line
            cli.main(argv)
    monkeypatch.setenv("R1_DEBUG", "1")
    with pytest.raises(ModelNotFoundError):
        cli.main(["show", missing])
    # after `--`, --debug is a word of the prompt, not the flag
    assert cli._take_debug_flag(["run", "m", "--", "--debug"]) == ["run", "m", "--", "--debug"]


def test_missing_local_paths_say_no_such_file_or_folder(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("R1_DEBUG", "")
    monkeypatch.chdir(tmp_path)
    for argv in (["run", "./nonexistent", "hi"], ["pull", "./nonexistent"], ["chat", "./nonexistent"],
                 ["run", "missing.gguf", "hi"], ["show", "~/surely-not-a-folder-r1"]):
        code, out, err = r1_main(capsys, *argv)
        assert code == 3 and out == "" and err == f"r1: no such file or folder: {argv[1]}\n", (argv, err)
    (tmp_path / "notes.txt").write_text("x")
    code, _, err = r1_main(capsys, "show", "./notes.txt")
    assert code == 2 and err == "r1: ./notes.txt is a file, not a model: give a model folder or a .gguf file\n"


# -- r1 show before a download -----------------------------------------------------------------------------------


@pytest.fixture
def offline_empty_cache(monkeypatch, tmp_path):
    """An empty HF cache and offline mode, in this process (huggingface_hub reads its constants at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("R1_DEBUG", "")
    return tmp_path


@pytest.mark.parametrize("alias, repo_name", [("deepseek-r1:671b", "DeepSeek-R1"),
                                              ("deepseek-r1:7b", "DeepSeek-R1-Distill-Qwen-7B")])
def test_show_an_alias_before_download_equals_show_after(offline_empty_cache, tmp_path, alias, repo_name):
    """Nothing downloaded, no network: the shipped config gives the same answer as the downloaded folder would."""
    before = r1hub.show(resolve_name(alias), ctx=2048)
    folder = tmp_path / repo_name
    folder.mkdir()
    shutil.copy(HUB_CONFIGS / repo_name / "config.json", folder / "config.json")
    # show reads no weights, only which layers the checkpoint has: an index naming one tensor per layer
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    weight_map = {f"model.layers.{i}.input_layernorm.weight": "model.safetensors" for i in range(layers)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    after = r1hub.show(resolve_name(str(folder)), ctx=2048)
    same = ("architecture", "parameters", "context_length", "dtype", "memory", "quantized_weights", "cpu")
    assert {k: before[k] for k in same} == {k: after[k] for k in same}
    assert before["downloaded"] is False and after["downloaded"] is True
    assert before["path"] is None and before["size_on_disk"] is None and before["download_size"] is None
    assert before["chat_template"] is None and any("file sizes" in u for u in before["unknown"])
    assert before["sampling"]["temperature"] == 0.6  # R1's recommendations follow from the name alone


def test_show_plans_671b_on_8_gpus_before_download(offline_empty_cache, capsys):
    """The README's "does it fit?" line answers with nothing downloaded."""
    code, out, err = r1_main(capsys, "show", "deepseek-r1:671b", "--gpus", "8", "--gpu-mem", "141")
    assert code == 0, err
    assert "parameters      671.03B total, 37.55B activated" in out
    assert "on 8 GPUs" in out and "fits in 141.0 GB" in out
    assert "size on disk    not downloaded" in out and "`r1 pull deepseek-r1:671b`" in out
    assert "not known yet: exact file sizes" in out


@pytest.mark.slow
def test_show_any_hub_repo_fetches_only_its_config(tmp_path):
    """A repo that is no alias: config.json alone is downloaded (the fake Hub's log says so), the download size is
    the Hub's file list's, and the parameter count is transformers' for the same config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    files = tiny_qwen2_repo()
    fake = FakeHub().start()
    try:
        fake.add("test/tiny", Repo(dict(files)))
        env = r1_env(tmp_path, HF_ENDPOINT=fake.url)
        p = run_r1("show", "test/tiny", "--json", env=env)
        assert p.returncode == 0, p.stderr
        info = json.loads(p.stdout)
        fetched = {r["path"].split("/resolve/main/")[-1] for r in fake.requests if "/resolve/" in r["path"]}
        missing = run_r1("show", "test/no-such-repo", env=env)
    finally:
        fake.stop()
    assert fetched == {"config.json"}
    assert info["downloaded"] is False and info["revision"] == fake.repos["test/tiny"].sha[:7]
    assert info["download_size"] == sum(len(data) for name, data in files.items() if r1hub.is_run_file(name))
    with torch.device("meta"):
        oracle = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_QWEN2_CONFIG)).num_parameters()
    assert info["parameters"]["total"] == oracle
    assert info["unknown"] == ["chat template (in the tokenizer files)"]
    assert missing.returncode == 3 and missing.stderr.strip().endswith("no model test/no-such-repo on the Hub "
                                                                      "(for a private repo, set HF_TOKEN or pass --token)")


# -- CPU features -------------------------------------------------------------------------------------------------


def test_cpu_features_agree_with_torch_and_cpuinfo():
    f = cpu.features()
    assert f.bf16_math == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert f.capability == torch.backends.cpu.get_cpu_capability()
    if sys.platform == "linux" and f.machine == "x86_64":
        flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split(":", 1)[1].splitlines()[0].split())
        assert (f.avx2, f.avx512, f.avx512_bf16) == ("avx2" in flags, "avx512f" in flags, "avx512_bf16" in flags)
        assert f.amx == ("amx_tile" in flags)
    # the cache dtype follows bf16 math, for the loader and for `r1 show` alike
    expected = torch.bfloat16 if f.bf16_math else torch.float32
    assert cpu.kv_cache_dtype(torch.bfloat16, torch.device("cpu")) == expected
    assert cpu.kv_cache_dtype(torch.bfloat16, torch.device("meta")) == torch.bfloat16


def test_cpu_classes_and_their_advice():
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 bf16 i8mm\n"
    assert cpu.parse_cpuinfo_flags(arm) >= {"asimd", "bf16", "i8mm"}
    assert cpu.parse_cpuinfo_flags("processor : 0\nflags : fpu avx2 fma\n") == {"fpu", "avx2", "fma"}
    base = dict(machine="x86_64", capability="AVX2", avx2=True, avx512=False, avx512_bf16=False, amx=False,
                vnni=False, neon=False, bf16_math=False)
    avx2 = cpu.CpuFeatures(**base)
    bf16 = cpu.CpuFeatures(**{**base, "avx512": True, "avx512_bf16": True, "bf16_math": True})
    neon = cpu.CpuFeatures(**{**base, "machine": "aarch64", "avx2": False, "neon": True})
    assert (avx2.cpu_class, bf16.cpu_class, neon.cpu_class) == ("avx2", "avx512-bf16", "neon")
    assert cpu.fastest_format(avx2)["fastest"] == "int8"
    assert cpu.fastest_format(bf16)["fastest"] == cpu.MEASURED_ORDER["avx512-bf16"][0][0]
    assert cpu.fastest_format(neon)["fastest"] is None and "not measured" in cpu.fastest_format(neon)["why"]


# -- progress bars -------------------------------------------------------------------------------------------------


def test_a_bar_redraws_a_few_times_a_second_whatever_the_number_of_updates():
    import io

    from rich.console import Console

    from r1cli import progress

    now = [0.0]
    out = io.StringIO()
    bar = progress.Bar("loading weights", 10_000 * 1000, 10_000, "tensors",
                       console=Console(file=out, force_terminal=True, width=100), clock=lambda: now[0])
    for _ in range(10_000):  # 10,000 tensors over 2 s of (fake) time
        now[0] += 0.0002
        bar.advance(1000)
    bar.close()
    assert bar.refreshes <= 1 + 2 * progress.REFRESH_PER_S + 1
    assert bar.items_done == 10_000
    assert "loading weights" in out.getvalue()


def test_no_bar_without_a_terminal(monkeypatch):
    from r1cli import progress

    monkeypatch.delenv("R1_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    with progress.tracker("loading weights") as t:
        t.start(100, 10)
        t.advance(10)
        assert t.bar is None


@pytest.mark.slow
def test_loading_shows_a_bar_on_a_terminal_and_nothing_in_a_pipe(steered_dir, tmp_path):
    import pexpect

    env = r1_env(tmp_path, TERM="xterm-256color")
    child = pexpect.spawn(sys.executable, ["-m", "r1cli", "run", str(steered_dir), "--max-tokens", "3", "hi"],
                          env=env, encoding="utf-8", timeout=120, dimensions=(24, 120))
    child.expect("loading weights")
    child.expect(r"\d+/\d+ tensors")
    child.expect(pexpect.EOF)
    piped = run_r1("run", str(steered_dir), "--max-tokens", "3", "hi", env=env)
    assert "loading weights" not in piped.stderr and "tensors" not in piped.stderr
