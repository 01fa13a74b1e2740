"""Config parsing for every Hub config, parameter counts on the meta device, and each bad checkpoint's error."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from r1cli.config import load_config
from r1cli.errors import CheckpointError, UnsupportedArchitectureError
from r1cli.loader import load_model
from r1cli.sizes import count_parameters, kv_cache_bytes_per_token
from paths import FIXTURES, HUB_CONFIGS
from tiny import llama_config, qwen2_config, v3_config, write_checkpoint


def table_counts() -> dict[str, tuple[int, int]]:
    text = (FIXTURES / "README.md").read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\| ([^|]+?) (?:\([^)]*\) )?\| ([\d,]+)(?: \([^)]*\))? \| ([\d,]+|same) \|$", line)
        if m:
            total = int(m.group(2).replace(",", ""))
            active = total if m.group(3) == "same" else int(m.group(3).replace(",", ""))
            for name in m.group(1).split(" / "):
                rows[name.strip()] = (total, active)
    return rows


def test_every_hub_config_parses_and_counts_match_the_table():
    table = table_counts()
    configs = sorted(p for p in HUB_CONFIGS.iterdir() if p.is_dir() and not p.name.startswith("_"))
    assert len(configs) == 10
    for folder in configs:
        name = folder.name
        key = name if name in table else name.replace("DeepSeek-", "").replace("deepseek-", "")
        key = next(k for k in table if k in (name, key, name.replace("DeepSeek-R1-Distill-", "R1-Distill-")))
        args = load_config(folder)
        assert count_parameters(args) == table[key], name


def test_hub_config_facts():
    r1 = load_config(HUB_CONFIGS / "DeepSeek-R1")
    assert r1.fp8_block == (128, 128) and r1.topk_method == "noaux_tc" and r1.scoring_func == "sigmoid"
    assert r1.rope.kind == "yarn" and abs(r1.softmax_scale - 192**-0.5 * (0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2) < 1e-9
    assert [r1.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]
    assert kv_cache_bytes_per_token(r1) == 61 * 576 * 2
    lite = load_config(HUB_CONFIGS / "DeepSeek-V2-Lite")
    assert lite.q_lora_rank is None and lite.scoring_func == "softmax" and not lite.norm_topk_prob
    llama = load_config(HUB_CONFIGS / "DeepSeek-R1-Distill-Llama-8B")
    assert llama.rope.kind == "llama3" and llama.norm_eps == 1e-5 and not llama.qkv_bias
    qwen = load_config(HUB_CONFIGS / "DeepSeek-R1-Distill-Qwen-1.5B")
    assert qwen.qkv_bias and not qwen.tie_embeddings and qwen.sliding_window is None


@pytest.fixture
def good(tmp_path):
    folder = tmp_path / "ckpt"
    write_checkpoint(qwen2_config(), folder)
    return folder


def _only_file(folder: Path) -> Path:
    (file,) = folder.glob("*.safetensors")
    return file


def _error(folder) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(folder, dtype="float32")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_tensor_is_named(good):
    file = _only_file(good)
    t = load_file(file)
    del t["model.layers.1.self_attn.k_proj.bias"]
    save_file(t, str(file))
    assert "model.layers.1.self_attn.k_proj.bias is missing" in _error(good)


def test_unexpected_tensor_is_named(good):
    file = _only_file(good)
    t = load_file(file)
    t["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(t, str(file))
    msg = _error(good)
    assert "unexpected tensor model.layers.0.self_attn.extra.weight" in msg and file.name in msg


def test_misshaped_tensor_is_named(good):
    file = _only_file(good)
    t = load_file(file)
    t["model.layers.2.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(t, str(file))
    msg = _error(good)
    assert "model.layers.2.mlp.up_proj.weight" in msg and "[95, 64]" in msg and "[96, 64]" in msg


def test_truncated_file(good):
    file = _only_file(good)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    msg = _error(good)
    assert file.name in msg and "truncated" in msg


def test_corrupt_header(good):
    file = _only_file(good)
    file.write_bytes(b"\xff" * 64)
    assert file.name in _error(good)


def test_missing_shard(tmp_path):
    folder = tmp_path / "sharded"
    write_checkpoint(llama_config(), folder)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / shard).unlink()
    msg = _error(folder)
    assert shard in msg and "missing" in msg


def test_pickles_are_never_loaded(tmp_path):
    folder = tmp_path / "pickled"
    write_checkpoint(llama_config(), folder)
    _only_file(folder).unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not even read")
    msg = _error(folder)
    assert "pytorch_model.bin" in msg and "safetensors" in msg


def test_unsupported_architecture(good):
    cfg = json.loads((good / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_model(good)
    assert "MistralForCausalLM" in str(e.value) and "Qwen2ForCausalLM" in str(e.value)


def test_mtp_layer_is_skipped(tmp_path):
    folder = tmp_path / "mtp"
    write_checkpoint(v3_config(), folder)
    file = _only_file(folder)
    t = load_file(file)
    n = 3  # num_hidden_layers: layer 3 is the multi-token-prediction module
    t.update({f"model.layers.{n}.enorm.weight": torch.ones(64), f"model.layers.{n}.eh_proj.weight": torch.ones(64, 128),
              f"model.layers.{n}.mlp.experts.0.gate_proj.weight": torch.ones(32, 64)})
    save_file(t, str(file))
    model = load_model(folder, dtype="float32")
    assert len(model.model.layers) == 3
    assert not any(name.startswith(f"model.layers.{n}.") for name, _ in model.named_parameters())


@pytest.mark.slow
def test_cli_reports_one_line_without_traceback(good):
    cfg = json.loads((good / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (good / "config.json").write_text(json.dumps(cfg))
    code = f"from r1cli.cli import main; from r1cli.errors import R1Error\nimport sys\nfrom r1cli.loader import load_model\ntry:\n    load_model({str(good)!r})\nexcept R1Error as e:\n    print(f'r1: {{e}}', file=sys.stderr); sys.exit(e.exit_code)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "GPT2LMHeadModel" in proc.stderr
