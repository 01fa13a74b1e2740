"""cpu.features() under ATEN_CPU_CAPABILITY (the AVX2 emulation of benchmarks/avx2_emulation.py): r1's CPU choices
follow the level torch itself was told to use, not the hardware flags that /proc/cpuinfo and cpuinfo still show."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch
from helpers import r1_env
from paths import ROOT

from r1cli import cpu

X86 = platform.machine().lower() in ("x86_64", "amd64")


def under_avx2_emulation(probe: str) -> dict:
    """What a Python snippet prints (one JSON line), run in a process with the AVX2 emulation's environment
    (benchmarks/avx2_emulation.py)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from avx2_emulation import ENV

    out = subprocess.run([sys.executable, "-c", probe], env=r1_env(**ENV), capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out)


@pytest.fixture
def fresh_features():
    cpu.features.cache_clear()
    yield cpu.features
    cpu.features.cache_clear()


@pytest.mark.skipif(not X86, reason="ATEN_CPU_CAPABILITY's x86 levels")
def test_aten_capability_caps_the_features_r1_chooses_by(monkeypatch, fresh_features):
    from r1cli.quant_formats import cpu_has_vnni

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    hw = fresh_features()
    # unrestricted: the hardware as torch's cpuinfo probes see it
    assert (hw.avx2, hw.avx512, hw.vnni) == (torch.cpu._is_avx2_supported(), torch.cpu._is_avx512_supported(),
                                              torch.cpu._is_vnni_supported())
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "AVX2")
    fresh_features.cache_clear()
    f = fresh_features()
    assert (f.avx512, f.avx512_bf16, f.amx, f.vnni) == (False, False, False, False)
    assert f.avx2 == torch.cpu._is_avx2_supported()
    assert f.cpu_class == ("avx2" if f.avx2 else "other")
    assert not [x for x in f.flags_seen if x.startswith(("avx512", "amx", "avx_vnni"))]
    assert not cpu_has_vnni()  # so the int8 policy is the packed kernel, as on an AVX2-only CPU
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    fresh_features.cache_clear()
    assert fresh_features().cpu_class == "other" and "avx2" not in fresh_features().flags_seen


@pytest.mark.slow
@pytest.mark.skipif(not X86, reason="ATEN_CPU_CAPABILITY's x86 levels")
def test_the_avx2_emulation_environment_makes_r1_choose_as_on_an_avx2_cpu():
    probe = ("import json, torch; from r1cli import cpu; from r1cli.quant_formats import cpu_has_vnni, "
             "choose_int8_kernel; f = cpu.features(); print(json.dumps({'torch': torch.backends.cpu.get_cpu_capability(),"
             " 'onednn_bf16': torch.ops.mkldnn._is_mkldnn_bf16_supported(), 'class': f.cpu_class, 'cap': f.capability,"
             " 'kv': str(cpu.kv_cache_dtype(torch.bfloat16, 'cpu')), 'int8': choose_int8_kernel(cpu_has_vnni()),"
             " 'upcast': cpu.BF16_UPCAST_ROWS}))")
    got = under_avx2_emulation(probe)
    if not torch.cpu._is_avx2_supported():
        pytest.skip("no AVX2 here")
    # torch itself obeys the environment: ATen's kernels at AVX2, oneDNN without bf16 math
    assert got["torch"] == got["cap"] == "AVX2" and got["onednn_bf16"] is False
    # and r1 chooses as for an AVX2 CPU: float32 KV cache and prompt upcast (no bf16 math), the packed int8 kernel
    assert got["class"] == "avx2" and got["kv"] == "torch.float32" and got["upcast"] == 32 and got["int8"] == "pack"


@pytest.mark.skipif(not X86 or not torch.cpu._is_avx2_supported() or
                    "fbgemm" not in torch.backends.quantized.supported_engines, reason="fbgemm's AVX2 kernel")
def test_the_dynamic_int8_kernel_does_not_saturate_without_vnni():
    """fbgemm without VNNI (its AVX2 kernel, forced here as benchmarks/avx2_emulation.py does) sums pairs of 8-bit
    products in 16 bits, which saturate: an all-ones row times codes of 127 gives half the product with 8-bit
    activations. R1_INT8_KERNEL=dynamic (or "mixed") there must round activations to 7 bits and stay exact."""
    probe = ("import json, torch; from r1cli.quant_formats import Int8Weight, dynamic_reduce_range\n"
             "q, s = torch.full((64, 256), 127, dtype=torch.int8), torch.full((64,), 0.01)\n"
             "x, w = torch.ones(1, 256), Int8Weight(q, s, 'dynamic')\n"
             "want = x @ (q.float() * s[:, None]).T\n"
             "def err(y): return float(((y - want).abs().max() / want.abs().max()))\n"
             "eight_bit = torch.ops.quantized.linear_dynamic(x, w._packed[0], False)\n"
             "print(json.dumps({'rr': dynamic_reduce_range(), 'err': err(w.matmul(x)), 'err8': err(eight_bit)}))")
    got = under_avx2_emulation(probe)
    assert got["err8"] > 0.3  # the saturation the test guards against (fbgemm's AVX2 path is in use)
    assert got["rr"] is True and got["err"] < 0.01, got
