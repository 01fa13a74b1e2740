"""This machine's CPU: its instruction-set features, read once, and every choice that depends on them (the KV cache
dtype, when prompt matmuls go through float32, which weight format decodes fastest, how the compiled decode step
computes one-row matmuls, and saying which int8 kernels quant_formats chose). The one place that asks.

Sources, all local: torch.cpu's probes (cpuinfo, what PyTorch's kernels dispatch on), the oneDNN bf16 check (what
its bf16 matmuls use), torch.backends.cpu.get_cpu_capability() (the ATen kernel level), and /proc/cpuinfo's flags
on Linux (shown to the user; also the fallback when a probe is missing from this torch build). ATEN_CPU_CAPABILITY=avx2
or default caps them at that level, as it caps torch's own kernels (the AVX2 emulation sets it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

# Flags worth naming to a user (as /proc/cpuinfo spells them on x86 Linux).
NAMED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
               "asimd", "bf16", "i8mm", "sve")


@dataclass(frozen=True)
class CpuFeatures:
    machine: str  # platform.machine(): x86_64, aarch64, arm64...
    capability: str  # ATen's kernel level: DEFAULT, AVX2, AVX512, ZVECTOR, SVE256...
    avx2: bool
    avx512: bool
    avx512_bf16: bool
    amx: bool
    vnni: bool
    neon: bool
    bf16_math: bool  # oneDNN runs bf16 matmuls natively (AVX512-BF16, AMX, or Arm bf16)
    flags: frozenset[str] = frozenset()  # /proc/cpuinfo's, when readable

    @property
    def cpu_class(self) -> str:
        """The class the advice is measured for: amx, avx512-bf16, avx512, avx2, neon, or other."""
        if self.amx:
            return "amx"
        if self.avx512_bf16:
            return "avx512-bf16"
        if self.avx512:
            return "avx512"
        if self.avx2:
            return "avx2"
        if self.neon:
            return "neon"
        return "other"

    @property
    def flags_seen(self) -> list[str]:
        """The named flags this CPU has (from /proc/cpuinfo, else from the probes)."""
        if self.flags:
            return [f for f in NAMED_FLAGS if f in self.flags]
        probed = {"avx2": self.avx2, "avx512f": self.avx512, "avx512_bf16": self.avx512_bf16, "amx_tile": self.amx,
                  "avx512_vnni": self.vnni, "asimd": self.neon}
        return [f for f, on in probed.items() if on]


def parse_cpuinfo_flags(text: str) -> frozenset[str]:
    """The feature flags of /proc/cpuinfo's first processor: `flags` on x86, `Features` on Arm."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def _probe(name: str, fallback: bool) -> bool:
    fn = getattr(torch.cpu, name, None)
    if fn is None:
        return fallback
    try:
        return bool(fn())
    except (RuntimeError, AttributeError):
        return fallback


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# --- torch told to use less than the CPU has ------------------------------------------------------------------------
# ATEN_CPU_CAPABILITY=avx2 (or default) makes torch's own kernels and Inductor's generated code use no more than that
# on any x86 CPU; the emulation of an AVX2-only CPU on an AVX512 one sets it (with ONEDNN_MAX_CPU_ISA=AVX2 and
# FBGEMM_ENABLE_INSTRUCTIONS=AVX2: benchmarks/avx2_emulation.py). The cpuinfo probes and /proc/cpuinfo still show
# the hardware, so r1's choices (int8 kernel, KV cache dtype, the advice) follow torch's restriction instead.
RESTRICTED_FLAG_PREFIXES = ("avx512", "amx", "avx_vnni")


def _aten_restricted_to() -> str:
    return os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()


def _restricted(machine: str, capability: str, flags: frozenset[str]) -> CpuFeatures:
    """An x86 CPU as torch was told to use it: no AVX512, AMX or VNNI; AVX2 only if ATEN_CPU_CAPABILITY=avx2.
    bf16 math stays oneDNN's own answer (which ONEDNN_MAX_CPU_ISA restricts, not ATEN_CPU_CAPABILITY)."""
    avx2 = _aten_restricted_to() == "avx2" and _probe("_is_avx2_supported", "avx2" in flags)
    return CpuFeatures(machine=machine, capability=capability, avx2=avx2, avx512=False, avx512_bf16=False,
                       amx=False, vnni=False, neon=False, bf16_math=_onednn_bf16(),
                       flags=frozenset(f for f in flags if not f.startswith(RESTRICTED_FLAG_PREFIXES)
                                       and (avx2 or f != "avx2")))


@functools.lru_cache(maxsize=1)
def features() -> CpuFeatures:
    """This machine's CPU features (read once per process)."""
    try:
        flags = parse_cpuinfo_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        flags = frozenset()
    machine = platform.machine().lower()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "DEFAULT"
    neon = machine in ("arm64", "aarch64") and ("asimd" in flags or not flags)  # Apple silicon has no cpuinfo
    if machine in ("x86_64", "amd64") and _aten_restricted_to() in ("avx2", "default"):
        return _restricted(machine, capability, flags)
    return CpuFeatures(
        machine=machine,
        capability=capability,
        avx2=_probe("_is_avx2_supported", "avx2" in flags),
        avx512=_probe("_is_avx512_supported", "avx512f" in flags),
        avx512_bf16=_probe("_is_avx512_bf16_supported", "avx512_bf16" in flags),
        amx=_probe("_is_amx_tile_supported", "amx_tile" in flags),
        vnni=_probe("_is_vnni_supported", bool({"avx512_vnni", "avx_vnni"} & flags)),
        neon=neon,
        bf16_math=_onednn_bf16(),
        flags=flags,
    )


# --- the choices -----------------------------------------------------------------------------------------------


def lacks_bf16_math() -> bool:
    """A CPU without native bf16 math (no AVX512-BF16/AMX): bf16 matmuls run at a fraction of the float32 rate."""
    return not features().bf16_math


# CPUs without native bf16 math run bf16 matmuls at a fraction of their float32 rate. For inputs of at least this
# many rows (a prompt) converting the weight to float32 first pays (measured on an AVX2 CPU: docs/performance.md).
# None: keep bf16.
BF16_UPCAST_ROWS = 32 if lacks_bf16_math() else None


def kv_cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the KV cache (dense k/v, MLA's latent and rope key): float32 for a bf16/fp16 model on a CPU
    without bf16 math, where attention over a half-precision cache is the slow part of a long reply (measured on
    an AVX2 CPU, dense and MLA caches: docs/performance.md); else the model's dtype."""
    device = torch.device(device)
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and BF16_UPCAST_ROWS:
        return torch.float32
    return dtype


# Decode speed by weight format, per CPU class: what was measured (docs/performance.md, "Weight formats by CPU
# class"), fastest first. A class absent here was never measured.
MEASURED_ORDER = {
    "avx2": (("int8", "int4 g32", "bf16"), "R1-Distill-Qwen-1.5B shape decode: int8 1.60x bf16, int4 1.42x"),
    "avx512-bf16": (("int4 g32", "bf16", "int8", "float32"),
                    "SmolLM2-135M decode with the compiled step, formats alternated in one process: "
                    "int4 > bf16 (int8 within a few percent of it) > float32"),
}


def fastest_format(f: CpuFeatures | None = None) -> dict:
    """{'cpu_class', 'flags', 'fastest', 'order', 'why'}: the weight format that decodes fastest on this CPU class
    (this machine's without `f`) and the measurement behind it, or fastest None where the class was never measured."""
    f = f or features()
    order, why = MEASURED_ORDER.get(f.cpu_class, ((), None))
    if not order:
        why = f"not measured on a {f.cpu_class} CPU: bf16 is the checkpoint's format; try --quant int8 and int4"
    elif f.cpu_class == "avx2":
        why += " (no bf16 math: bf16 matmuls are slow, int8's kernel reads at memory speed)"
    else:
        why += " (bf16 math in hardware: bf16 beats float32, and fewer bytes per weight win)"
    return {"cpu_class": f.cpu_class, "flags": f.flags_seen, "fastest": order[0] if order else None,
            "order": list(order), "why": why}


# The weight formats MEASURED_ORDER names, as --quant schemes, and the bits per weight each keeps.
FORMAT_SCHEMES = {"int4 g32": ("int4", 4), "int8": ("int8", 8), "bf16": ("none", 16), "float32": ("none", 32)}


def auto_scheme(file_bits: int, f: CpuFeatures | None = None) -> tuple[str, str]:
    """--quant auto for a file whose weights have `file_bits` bits (a GGUF's main type): (scheme, why). The fastest
    format measured on this CPU class among those that keep at least the file's bits (a 4-bit file: int4 or int8,
    never below what the file holds); on a class never measured, the smallest such format (closest to the file)."""
    f = f or features()
    order = [FORMAT_SCHEMES[name] for name in MEASURED_ORDER.get(f.cpu_class, ((), None))[0]]
    fits = [(scheme, bits) for scheme, bits in order if bits >= file_bits]
    keeps = f"keeps the file's {file_bits}-bit weights"
    if fits:
        return fits[0][0], f"the fastest format measured on this {f.cpu_class} CPU that {keeps}"
    fits = sorted((bits, scheme) for scheme, bits in FORMAT_SCHEMES.values() if bits >= file_bits)
    return fits[0][1], f"the smallest format that {keeps} (no speed measured on this {f.cpu_class} CPU)"


# CPU classes where the compiled decode step computes its one-row bf16 matmuls as Inductor reductions
# (gemv_pass.py) rather than ATen's matmul: measured on an AVX512-BF16 CPU (docs/performance.md). Others were not.
ONE_ROW_MATMUL_AS_REDUCTION = ("avx512-bf16",)


def one_row_matmul_as_reduction(f: CpuFeatures | None = None) -> bool:
    """Does the compiled CPU decode step rewrite its one-row bf16 matmuls into reductions (gemv_pass.py)?"""
    return (f or features()).cpu_class in ONE_ROW_MATMUL_AS_REDUCTION


# CPU classes where an eager one-token step multiplies its one-row bf16 activations faster with ATen's own kernel
# than with oneDNN's (measured on an AVX512-BF16 CPU: docs/performance.md); prompts, many rows, keep oneDNN, which
# is far faster there. Others were not measured.
ONE_ROW_MATMUL_WITHOUT_ONEDNN = ("avx512-bf16",)


@contextlib.contextmanager
def one_token_step(keep_onednn: bool = False, device: torch.device | str = "cpu",
                   f: CpuFeatures | None = None) -> Iterator[None]:
    """The context of one decode step on `device`: on this CPU, oneDNN off for its duration where
    ONE_ROW_MATMUL_WITHOUT_ONEDNN says so (a process-wide switch, flipped around the step only); elsewhere nothing.
    keep_onednn: the model's own kernels need it (quant_formats.uses_onednn)."""
    if (keep_onednn or torch.device(device).type != "cpu"
            or (f or features()).cpu_class not in ONE_ROW_MATMUL_WITHOUT_ONEDNN):
        yield
        return
    was = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(was)


def compiled_cpu_default() -> bool:
    """Does `--decode-mode auto` compile the CPU decode step? Yes, unless R1_COMPILE=0 (the test suite's setting,
    or a machine where a background compile is not wanted)."""
    return os.environ.get("R1_COMPILE", "1").strip() != "0"
