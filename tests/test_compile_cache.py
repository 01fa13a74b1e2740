"""The compiled decode step's on-disk cache (compile_cache.py): a second process loads the first one's artifacts and
compiles nothing (Inductor cache hits only, into an empty Inductor folder), with the same tokens; a cache file that
is a link, or writable by others, is never loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import r1_env
from tiny import llama_config, write_checkpoint

from r1cli import compile_cache

CHILD = """
import json, sys
import torch
from torch._dynamo.utils import counters
from r1cli.generate import Decoder, SamplingParams
from r1cli.loader import load_model

model = load_model(sys.argv[1], dtype="float32")
tokens = {}
for mode in ("eager", "compile"):
    gen = Decoder(model, max_len=64, decode_mode=mode)
    tokens[mode] = list(gen.generate([1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=6)))
print(json.dumps({"tokens": tokens, "hit": counters["inductor"]["fxgraph_cache_hit"],
                  "miss": counters["inductor"]["fxgraph_cache_miss"]}))
"""


@pytest.mark.slow
def test_a_second_process_reuses_the_compiled_step(tmp_path):
    folder = tmp_path / "tiny"
    write_checkpoint(llama_config(num_hidden_layers=1), folder)
    runs = []
    for i in range(2):  # a fresh Inductor folder each time: only r1's file can carry the first compile over
        env = r1_env(tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"ind{i}"))
        p = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, env=env,
                           timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["miss"] > 0 and first["tokens"]["compile"] == first["tokens"]["eager"]
    files = list((tmp_path / "xdg" / "r1cli" / "compile").glob("*.bin"))
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600
    assert second["hit"] > 0 and second["miss"] == 0, second
    assert second["tokens"] == first["tokens"]


def test_only_a_private_regular_file_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = compile_cache.cache_dir()
    folder.mkdir(parents=True, mode=0o700)
    calls = []
    monkeypatch.setattr("torch.compiler.load_cache_artifacts", lambda blob: calls.append(blob) or object())
    (folder / "k.bin").write_bytes(b"artifacts")
    os.chmod(folder / "k.bin", 0o600)
    assert compile_cache.load("k") and calls == [b"artifacts"]
    os.chmod(folder / "k.bin", 0o620)  # writable by the group: anyone in it could plant code
    assert not compile_cache.load("k")
    os.chmod(folder / "k.bin", 0o600)
    (tmp_path / "elsewhere.bin").write_bytes(b"other")
    os.chmod(tmp_path / "elsewhere.bin", 0o600)
    (folder / "link.bin").symlink_to(tmp_path / "elsewhere.bin")
    assert not compile_cache.load("link")
    os.chmod(folder, 0o777)  # a folder anyone may write into
    assert not compile_cache.load("k")
    assert calls == [b"artifacts"] and not compile_cache.load("absent")


def test_the_key_follows_the_weight_format():
    import torch

    from r1cli.models import build_model
    from r1cli.config import args_from_dict
    from r1cli.quant import quantize_model
    from r1cli.quant_formats import use_int8_kernel

    torch.manual_seed(0)
    cfg = {**llama_config(num_hidden_layers=1, hidden_size=128, intermediate_size=256).to_dict(),
           "architectures": ["LlamaForCausalLM"]}
    model = build_model(args_from_dict(cfg)).float()
    plain = compile_cache.step_key(model, "compile")
    quantize_model(model, "int8")
    use_int8_kernel(model, "pack")
    packed = compile_cache.step_key(model, "compile")
    use_int8_kernel(model, "dynamic")
    assert len({plain, packed, compile_cache.step_key(model, "compile")}) == 3
