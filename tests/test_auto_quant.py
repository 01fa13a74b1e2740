"""--quant auto, the default of `r1 run`, `chat` and `serve`: a quantized GGUF file (as llama.cpp and ollama users
have them) stays quantized on a CPU, in the fastest format measured on that CPU class that keeps the file's bits
(cpu.auto_scheme), instead of being dequantized to bf16; checkpoints, GPUs, an explicit --dtype or --quant load as
before. Files: llama.cpp's own quantizer's output (tests/fixtures/llamacpp/)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import r1_env, run_r1
from paths import ROOT

from r1cli import cpu
from r1cli.gguf import nominal_bits, open_gguf
from r1cli.loader import Checkpoint, resolve_quant

FIXTURES = ROOT / "tests" / "fixtures" / "llamacpp"
FILES = sorted(p.name for p in FIXTURES.glob("*.gguf"))


def preset_bits(name: str) -> int:
    """The bits of the preset llama.cpp's quantizer was asked for, from the file's name (llama-Q4_K_M.gguf: 4)."""
    preset = name.removesuffix(".gguf").split("-", 1)[1]
    return int("".join(ch for ch in preset.split("_")[0] if ch.isdigit()))


@pytest.mark.parametrize("name", FILES)
def test_a_gguf_files_bits_are_its_presets(name):
    assert nominal_bits(open_gguf(FIXTURES / name)) == preset_bits(name)


@pytest.mark.parametrize("name, bits", [("llama-Q4_K_M.gguf", 4), ("qwen2-Q5_0.gguf", 5), ("qwen2-Q8_0.gguf", 8)])
def test_without_a_preset_the_type_with_most_bytes_decides(name, bits):
    f = open_gguf(FIXTURES / name)
    del f.metadata["general.file_type"]
    assert nominal_bits(f) == bits


def features(cpu_class: str) -> cpu.CpuFeatures:
    return dataclasses.replace(cpu.features(), amx=False, neon=False, avx512_bf16=cpu_class == "avx512-bf16",
                               avx512=cpu_class == "avx512-bf16", avx2=cpu_class in ("avx512-bf16", "avx2"))


@pytest.mark.parametrize("cpu_class, bits, scheme", [
    ("avx512-bf16", 4, "int4"), ("avx512-bf16", 2, "int4"),  # int4 measured fastest there
    ("avx512-bf16", 5, "none"), ("avx512-bf16", 8, "none"),  # never below the file's bits: bf16 beats int8 there
    ("avx2", 4, "int8"), ("avx2", 8, "int8"),  # int8 measured fastest on AVX2
    ("avx2", 16, "none"),
    ("other", 4, "int4"), ("other", 5, "int8"), ("other", 16, "none"),  # unmeasured: the smallest that keeps the bits
])
def test_auto_picks_the_fastest_measured_format_that_keeps_the_files_bits(cpu_class, bits, scheme):
    f = features(cpu_class)
    assert f.cpu_class == cpu_class
    assert cpu.auto_scheme(bits, f)[0] == scheme


def test_auto_leaves_checkpoints_gpus_and_an_explicit_dtype_alone(steered_dir):
    gguf = Checkpoint(FIXTURES / "llama-Q4_K_M.gguf")
    cpu_ = torch.device("cpu")
    assert resolve_quant("auto", "auto", gguf, cpu_) == cpu.auto_scheme(4)
    assert resolve_quant("auto", "float32", gguf, cpu_) == ("none", None)
    assert resolve_quant("int8", "auto", gguf, cpu_) == ("int8", None)
    assert resolve_quant("auto", "auto", gguf, torch.device("cuda")) == ("none", None)
    assert resolve_quant("auto", "auto", Checkpoint(steered_dir), cpu_) == ("none", None)


def test_r1_run_keeps_a_4_bit_gguf_quantized_by_default(tmp_path):
    env = r1_env(tmp_path, R1_COMPILE="0")
    path, scheme = FIXTURES / "llama-Q4_K_M.gguf", cpu.auto_scheme(4)[0]
    common = ("--temperature", "0", "--max-tokens", "6", "Hi")
    auto = run_r1("run", path, "--verbose", *common, env=env)
    explicit = run_r1("run", path, "--quant", scheme, *common, env=env)
    dense = run_r1("run", path, "--verbose", "--dtype", "bfloat16", *common, env=env)
    assert auto.returncode == explicit.returncode == dense.returncode == 0, auto.stderr
    assert auto.stdout == explicit.stdout  # the same weights as --quant SCHEME
    header, notice = auto.stderr.splitlines()[:2]
    assert (" · int4 g32 · " if scheme == "int4" else f" · {scheme} · ") in header
    assert notice.startswith(f"r1: --quant {scheme}: ") and "--quant none dequantizes it" in notice
    assert " · int" not in dense.stderr.splitlines()[0] and "--quant" not in dense.stderr


def test_r1_show_says_how_run_loads_the_file_here(tmp_path):
    scheme = cpu.auto_scheme(4)[0]
    out = run_r1("show", FIXTURES / "llama-Q4_K_M.gguf", env=r1_env(tmp_path)).stdout
    line = next(x for x in out.splitlines() if x.startswith("dtype"))
    assert ("dequantized to bfloat16," if scheme == "none" else f"kept as --quant {scheme},") in line


def test_a_gguf_draft_takes_the_same_rule(tmp_path):
    """--draft-quant auto: a 4-bit GGUF draft stays quantized as the model would; the output is plain decoding's."""
    env = r1_env(tmp_path, R1_COMPILE="0")
    scheme = cpu.auto_scheme(4)[0]
    common = ("--temperature", "0", "--max-tokens", "6", "Hi")
    target = FIXTURES / "llama-Q5_K_M.gguf"
    drafted = run_r1("run", target, "--verbose", "--draft", FIXTURES / "llama-Q4_K_M.gguf", *common, env=env)
    plain = run_r1("run", target, *common, env=env)
    assert drafted.returncode == plain.returncode == 0, drafted.stderr
    draft_line = next(x for x in drafted.stderr.splitlines() if x.startswith("draft "))
    assert (" · " not in draft_line) if scheme == "none" else draft_line.endswith(f" · {scheme}")
    assert drafted.stdout == plain.stdout
