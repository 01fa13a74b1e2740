"""Quantized weight formats: int8 (symmetric, one scale per output channel) and int4 (asymmetric groups of
32/64/128 along the input dim), as modules living inside a `Linear` or an `Experts` (`QuantWeight`, `Int8Weight`,
`Int4Weight`), their codes (quantize_int8/quantize_int4, nibble packing), and which of PyTorch's packed kernels
multiplies them (the CPU int8 kernel chosen once per process). Quantizing a model while it loads, and the disk
cache of quantized weights, are quant.py's.

int4 convention (shared with the GGUF importer, and exactly that of torch's int4 kernels): codes q in 0..15,
w = (q - 8) * scale + zero per group; scales and zeros [N, K/g] float32. In memory the scales and zeros are kept
as the kernel wants them: [K/g, N, 2] bfloat16.

Layouts of an int4 weight:
- "cpu": torch._convert_weight_to_int4pack_for_cpu (blocked by ISA; only the kernel reads it), bf16 activations.
- "cuda": tinygemm (torch._convert_weight_to_int4pack), bf16 activations.
- "plain": two codes per byte, low nibble first, [.., N, K/2] uint8: the on-disk cache format, and the
  dequantize-per-matmul fallback on other devices (and for gathered MoE experts on a GPU).

int8 on a CPU has two kernels (Int8Weight.kernel): "pack", torch._weight_int8pack_mm (int8 weights, bf16
activations, float math); and "dynamic", fbgemm's dynamic int8 linear (torch.ops.quantized.linear_dynamic): each
one-row input is quantized to 8 bits per call (per column group, Int8Weight.groups) and multiplied with the CPU's
integer dot-product instructions (VNNI), as llama.cpp's Q8 activations are. The codes and scales are the same in
both; only the activation rounding differs. Which layers take which kernel is a policy chosen once per process from
the CPU's features and the quality bar (choose_int8_kernel): "pack", "dynamic" (every layer), or "mixed" (the
dynamic kernel only where its rounding costs little quality and it is faster: place_int8_kernels).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

# Rows (tokens) from which a CPU int8 matmul dequantizes the weight to float32 instead of running the packed
# kernel: where dequantizing became the faster of the two on an AVX2 CPU (docs/performance.md).
CPU_INT8_DEQUANT_ROWS = 64


# --- quantizers (pure functions on float weights) ---------------------------------------------------------------


def _row_chunks(w: torch.Tensor):
    """Row slices of about 1M elements: float32 temporaries stay small and alike in size, so the allocator reuses
    them instead of growing the heap (without this, test_quantized_load_peak_memory's bound is exceeded)."""
    rows = w.shape[-2]
    step = max(1, (1 << 20) // max(w.shape[-1], 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [.., N, K] -> (q int8 [.., N, K], scale float32 [.., N]) with w ~= q * scale."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[:-1], dtype=torch.float32, device=w.device)
    for rows in _row_chunks(w):
        c = w[..., rows, :].to(torch.float32, copy=True)  # modified in place below
        s = (c.abs().amax(dim=-1) / 127).clamp(min=1e-10)
        q[..., rows, :] = c.div_(s.unsqueeze(-1)).round_().clamp_(-127, 127)
        scale[..., rows] = s
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [.., N, K] -> (codes int32 0..15 [.., N, K], scales, zeros float32 [.., N, K/g]) with
    w ~= (q - 8) * scale + zero: the group's min maps to 0 and its max to 15."""
    *lead, n, k = w.shape
    codes = torch.empty(w.shape, dtype=torch.int32, device=w.device)
    scales = torch.empty(*lead, n, k // group_size, dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    for rows in _row_chunks(w):
        g = w[..., rows, :].to(torch.float32, copy=True)
        g = g.reshape(*g.shape[:-1], k // group_size, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scale = ((hi - lo) / 15).clamp(min=1e-10)
        c = g.sub_(lo.unsqueeze(-1)).div_(scale.unsqueeze(-1)).round_().clamp_(0, 15)
        codes[..., rows, :] = c.reshape(*c.shape[:-2], k)
        scales[..., rows, :], zeros[..., rows, :] = scale, lo + 8 * scale
    return codes, scales, zeros


def pack_nibbles(codes: torch.Tensor, even_high: bool = False) -> torch.Tensor:
    """int codes 0..15 [.., K] -> uint8 [.., K/2], low nibble = even k (high with even_high, as tinygemm wants)."""
    c = codes.to(torch.uint8)
    even, odd = c[..., 0::2], c[..., 1::2]
    return (even << 4) | odd if even_high else even | (odd << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [.., K/2] -> int32 codes [.., K]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2).to(torch.int32)


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The reference: codes [.., N, K], scales/zeros [.., N, K/g] -> w [.., N, K]."""
    *lead, n, k = codes.shape
    groups = scales.shape[-1]
    q = codes.float().reshape(*lead, n, groups, k // groups)
    return ((q - 8) * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)).reshape(*lead, n, k).to(dtype)


def int4_supported(n: int, k: int, group_size: int, device: torch.device) -> bool:
    """Can the packed kernel of this device take an [n, k] weight? (else the layer stays unquantized)"""
    if k % group_size:
        return False
    if device.type == "cpu":
        return n % 16 == 0 and k % 2 == 0
    if device.type == "cuda":
        return n % 8 == 0 and k % (8 * 16) == 0  # tinygemm with inner_k_tiles = 8
    return k % 2 == 0


# --- weight formats (live inside a Linear or an Experts module) -------------------------------------------------


class QuantWeight(nn.Module):
    """Base: `matmul(x, bias)` is y = x W^T (+ b); `dequantize(dtype, index)` the dense weight (of expert
    `index` when stacked); `export()` the device-independent tensors the disk cache stores."""

    scheme = "none"

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, index=None) -> torch.Tensor:
        y = F.linear(x, self.dequantize(x.dtype, index))
        return y if bias is None else y + bias

    def join(self, parts: list[QuantWeight]) -> QuantWeight | None:
        """The weights of `parts` (this one first) stacked along the output rows, as one; None if they cannot be
        (layers.fuse_linears then keeps them apart)."""
        return None


# --- the int8 kernel of this CPU ----------------------------------------------------------------------------------

INT8_KERNELS = ("pack", "dynamic", "mixed")  # the per-process policies (R1_INT8_KERNEL)


def fastest_int8_kernel(has_vnni: bool) -> str:
    """The int8 one-row kernel to use on a CPU with (or without) integer dot products for 8-bit activations
    (AVX512-VNNI / AVX-VNNI): fbgemm's dynamic int8 linear with them (faster than the packed kernel at the
    R1-Distill-Qwen-1.5B shapes on an AVX512-VNNI CPU, docs/performance.md); else the packed kernel (fbgemm's
    AVX2 path saturates 16-bit pair sums unless activations take 7 bits, which miss the int8 bar:
    docs/quantization.md)."""
    return "dynamic" if has_vnni else "pack"


def cpu_has_vnni() -> bool:
    """Integer dot-product instructions (cpu.py, the one reader of the CPU's features), and fbgemm in this torch
    build to use them."""
    from .cpu import features

    return "fbgemm" in torch.backends.quantized.supported_engines and features().vnni


# Whether the dynamic kernel in every layer keeps the int8 quality bar (mean KL < 0.01 against bf16, SmolLM2-135M
# decoded token by token, tests/test_quant.py): it did not: one 8-bit scale per activation row is too coarse for
# the outlier channels of real hidden states (llama.cpp's Q8 activations take one scale per 32 values). The error
# is spread over q|k|v, gate|up and down (o_proj adds almost none), so the "mixed" policy keeps the bar instead:
# gate|up dynamic, down dynamic over column groups where that is still faster than the packed kernel, the rest
# (q|k|v, o, the head) packed (docs/quantization.md). All-dynamic stays opt-in (R1_INT8_KERNEL=dynamic).
DYNAMIC_INT8_KEEPS_QUALITY = False


# The dynamic kernel does not export (fbgemm's packed weights are an opaque object): a model with a dynamic layer
# decodes eagerly even where the CPU step would be compiled (aot_step.py, the default). Measured with the compiled
# step on: eager "mixed" decoded the R1-Distill-Qwen-1.5B shape faster than the compiled packed step, SmolLM2-135M
# slower (docs/quantization.md). So with a compiled step, "mixed" places the dynamic kernel only in models with at
# least this many int8 weights (between the two measured sizes; the crossover itself was not located).
MIXED_MIN_WEIGHTS_WHEN_COMPILED = 1_000_000_000


def head_int8_kernel() -> str:
    """The kernel of an int8 output head (--quant int4's default head, quant.quantize_head): "intmm" where the CPU
    multiplies 8-bit integers (VNNI) and this torch has oneDNN, which reads a one-row head faster than the packed
    kernel there (docs/performance.md) and, unlike fbgemm's, compiles into the CPU decode step; else "pack"."""
    from .cpu import features

    return "intmm" if features().vnni and torch.backends.mkldnn.is_available() else "pack"


def uses_onednn(model: nn.Module) -> bool:
    """Does the model multiply with oneDNN at decode (int8 weights on the "intmm" kernel)? Then a decode step must
    keep oneDNN on (cpu.one_token_step)."""
    return any(isinstance(m, Int8Weight) and m.kernel == "intmm" for m in model.modules())


def choose_int8_kernel(has_vnni: bool) -> str:
    """The policy a process uses: the fastest one that keeps the quality bar."""
    fastest = fastest_int8_kernel(has_vnni)
    if fastest == "dynamic" and not DYNAMIC_INT8_KEEPS_QUALITY:
        return "mixed"
    return fastest


def int8_kernel_reason(kernel: str) -> str:
    """Why this process's int8 policy was chosen, in a few words (`r1 show`)."""
    if os.environ.get("R1_INT8_KERNEL", "") in INT8_KERNELS:
        return f"{kernel}, set by R1_INT8_KERNEL"
    if kernel == "mixed":
        return ("mixed: 8-bit activations and integer dot products (VNNI) for gate|up and the wide down "
                "projections, bf16 activations elsewhere, within the int8 quality bar (with the compiled decode "
                f"step, in models of {MIXED_MIN_WEIGHTS_WHEN_COMPILED / 1e9:g}B int8 weights or more: it does not "
                "compile, and smaller ones decode faster packed and compiled)")
    if kernel == "dynamic":
        return "dynamic: 8-bit activations and integer dot products (VNNI) in every layer"
    return "pack: bf16 activations (no VNNI, or no fbgemm in this torch)"


_int8_kernel: str | None = None


def int8_kernel() -> str:
    """This process's CPU int8 policy, decided once at first use (R1_INT8_KERNEL=pack|dynamic|mixed overrides it,
    for benchmarks, tests and trying the dynamic kernel everywhere)."""
    global _int8_kernel
    if _int8_kernel is None:
        forced = os.environ.get("R1_INT8_KERNEL", "")
        _int8_kernel = forced if forced in INT8_KERNELS else choose_int8_kernel(cpu_has_vnni())
    return _int8_kernel


# Roles of a layer (the last part of its module name) in the "mixed" policy: where the dynamic kernel's activation
# rounding was measured to cost little KL per layer (tests/test_quant.py, docs/quantization.md).
MIXED_DYNAMIC_LAYERS = ("gate_up_proj", "gate_proj", "up_proj")
MIXED_GROUPED_LAYERS = ("down_proj",)  # its input (the SiLU-gated product) has outliers: one 8-bit scale per group
DOWN_GROUPS = 4
# down_proj takes the grouped dynamic kernel from this input width: with fewer columns the per-group calls cost
# more than the packed kernel (measured at SmolLM2's 1536 and the 1.5B's 8960 columns, docs/quantization.md).
DOWN_GROUPED_MIN_K = 4096


def mixed_kernel_for(name: str, k: int, grouped_min_k: int = DOWN_GROUPED_MIN_K) -> tuple[str, int]:
    """(kernel, groups) of a 2-D int8 weight named `name` (a module path) with k input columns, under "mixed"."""
    role = name.rsplit(".", 1)[-1]
    if role in MIXED_DYNAMIC_LAYERS:
        return "dynamic", 1
    if role in MIXED_GROUPED_LAYERS and k >= grouped_min_k and k % DOWN_GROUPS == 0:
        return "dynamic", DOWN_GROUPS
    return "pack", 1


@functools.lru_cache(maxsize=1)
def dynamic_reduce_range() -> bool:
    """Does fbgemm's dynamic kernel round activations to 7 bits here? Without VNNI its kernel multiplies 8-bit pairs
    into 16-bit sums that saturate (AVX2's vpmaddubsw: 255 x 127 x 2 overflows), which made SmolLM2 decode garbage
    under AVX2 (docs/quantization.md); 7-bit activations cannot overflow them. VNNI sums into 32 bits: 8 bits."""
    return not cpu_has_vnni()


def _fbgemm_prepack(q: torch.Tensor, scale: torch.Tensor):
    """fbgemm's packed form of int8 codes q [N, K] with per-row scales (zero points 0): its own copy of the codes,
    laid out for its integer kernel. (torch marks the quantized-tensor API deprecated and warns: hence the filter.)"""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qt = torch._make_per_channel_quantized_tensor(q.contiguous(), scale.double(),
                                                      torch.zeros(q.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qt, None)


class Int8Weight(QuantWeight):
    """int8 codes q [.., N, K] and float32 scales [.., N]: w = q * scale. kernel "pack" keeps q as a buffer;
    kernel "dynamic" (2-D weights on a CPU) keeps only fbgemm's packed copies of it, one per column group (`groups`
    slices of K, each row slice of the activation quantized with its own 8-bit scale, the products summed), and `q`
    unpacks on demand. A new weight takes "dynamic" under the all-dynamic policy, else "pack" ("mixed" places the
    dynamic kernel afterwards, by layer name: place_int8_kernels). Kernel "intmm" (the int8 output head's, where
    head_int8_kernel() says so) keeps q as "pack" does and multiplies one row as 8-bit integers (`torch._int_mm`, oneDNN:
    an op torch.export takes, unlike fbgemm's), several rows as "pack"."""

    scheme = "int8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, kernel: str | None = None, groups: int = 1):
        super().__init__()
        if kernel is None:
            kernel = "dynamic" if q.device.type == "cpu" and q.dim() == 2 and int8_kernel() == "dynamic" else "pack"
        self.kernel, self.groups = kernel, groups if kernel == "dynamic" else 1
        self._packed = None
        if kernel == "dynamic":
            k = q.shape[-1]
            step = -(-k // self.groups)
            self._slices = [slice(i, min(k, i + step)) for i in range(0, k, step)]
            self._packed = [_fbgemm_prepack(q[:, cols].contiguous(), scale.float()) for cols in self._slices]
            self._seven_bit = dynamic_reduce_range()  # (this CPU's, decided once)
            self._shape = q.shape
            self.register_buffer("_q", None)
        else:
            self.register_buffer("_q", q)
        self.register_buffer("scale", scale.float())
        self.register_buffer("scale_bf16", self.scale.bfloat16(), persistent=False)  # what the CPU kernel takes

    @property
    def q(self) -> torch.Tensor:
        """The int8 codes (a copy unpacked from fbgemm's layout with the dynamic kernel)."""
        if self._packed is None:
            return self._q
        return torch.cat([torch.ops.quantized.linear_unpack(p)[0].int_repr() for p in self._packed], dim=1)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # the codes under the same name whatever the kernel keeps (memory probes count a state_dict's bytes)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "_q", None)
        destination[prefix + "q"] = self.q

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Int8Weight:
        return cls(*quantize_int8(w))

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor) -> Int8Weight:
        """q int8 [.., N, K], scale [.., N] (w = q * scale), e.g. repacked GGUF Q8_0 rows."""
        return cls(q.to(torch.int8), scale)

    @property
    def shape(self):
        return self._shape if self._packed is not None else self._q.shape

    def join(self, parts: list[Int8Weight]) -> Int8Weight | None:
        if any(len(p.shape) != 2 or p.kernel != self.kernel or p.groups != self.groups for p in parts):
            return None
        return Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), self.kernel,
                          self.groups)

    def dequantize(self, dtype: torch.dtype, index=None) -> torch.Tensor:
        q, s = (self.q, self.scale) if index is None else (self.q[index], self.scale[index])
        return (q.float() * s.unsqueeze(-1)).to(dtype)

    def matmul(self, x, bias=None, index=None):
        rows = x.numel() // x.shape[-1]
        if self._packed is not None:
            if rows == 1:  # decode: one row, so the activation's 8-bit scale is that row's own (or its group's)
                x1 = x.reshape(1, -1).float()
                seven_bit = self._seven_bit
                if len(self._packed) == 1:
                    y = torch.ops.quantized.linear_dynamic(x1, self._packed[0], seven_bit)
                else:
                    first = x1[:, self._slices[0]].contiguous()
                    y = torch.ops.quantized.linear_dynamic(first, self._packed[0], seven_bit)
                    for cols, packed in zip(self._slices[1:], self._packed[1:]):
                        y += torch.ops.quantized.linear_dynamic(x1[:, cols].contiguous(), packed, seven_bit)
                y = y.view(*x.shape[:-1], -1).to(x.dtype)
                return y if bias is None else y + bias
            # several rows would share one activation scale: the float kernels below
            q, s = self.q, self.scale
        elif self.kernel == "intmm" and rows == 1 and index is None:
            return self._int_mm_row(x, bias)
        else:
            q, s = (self._q, self.scale) if index is None else (self._q[index], self.scale[index])
        if x.device.type == "cpu" and q.dim() == 2:
            if rows < CPU_INT8_DEQUANT_ROWS:
                # the packed kernel is vectorised for bf16 activations only (float32: far slower, docs/quantization.md)
                s16 = self.scale_bf16 if index is None else self.scale_bf16[index]
                y = torch._weight_int8pack_mm(x.reshape(rows, -1).bfloat16(), q, s16)
                y = y.view(*x.shape[:-1], -1).to(x.dtype)
            else:  # a prompt: dequantize once, then a float32 GEMM
                y = F.linear(x.float(), q.float() * s.unsqueeze(-1)).to(x.dtype)
        else:  # dequant-in-matmul: one fused expression torch.compile turns into one kernel
            y = F.linear(x, q.to(x.dtype)) * s.to(x.dtype)
        return y if bias is None else y + bias

    def _int_mm_row(self, x, bias):
        """One activation row rounded to 8 bits with its own scale, times the int8 codes in integer arithmetic."""
        x1 = x.reshape(1, -1).float()
        x_scale = x1.abs().amax().clamp(min=1e-12) / 127
        xq = (x1 / x_scale).round().to(torch.int8)
        y = (torch._int_mm(xq, self._q.t()).float() * (x_scale * self.scale)).view(*x.shape[:-1], -1).to(x.dtype)
        return y if bias is None else y + bias

    def export(self) -> dict[str, torch.Tensor]:
        return {"q": self.q, "scale": self.scale}

    @classmethod
    def from_export(cls, t: dict[str, torch.Tensor], group_size: int, device) -> Int8Weight:
        return cls(t["q"].to(device), t["scale"].to(device))


class Int4Weight(QuantWeight):
    """Packed int4 codes + [.., K/g, N, 2] bf16 scales_and_zeros; stacked experts carry a leading E dim."""

    scheme = "int4"

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, layout: str,
                 shape: tuple[int, ...]):
        super().__init__()
        self.group_size, self.layout, self._shape = group_size, layout, torch.Size(shape)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    @property
    def shape(self):
        return self._shape

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int, device=None) -> Int4Weight:
        codes, scales, zeros = quantize_int4(w, group_size)
        return cls.from_codes(codes, scales, zeros, group_size, device or w.device)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   device=None) -> Int4Weight:
        """codes 0..15 [.., N, K], scales and zeros [.., N, K/g] (w = (q - 8) * scale + zero), e.g. repacked
        GGUF blocks: Q4_0 (w = d (q - 8): scale d, zero 0), Q4_1 (w = d q + m: scale d, zero m + 8 d)."""
        device = torch.device(device or codes.device)
        *lead, n, k = codes.shape
        sz = torch.stack([scales, zeros], dim=-1).transpose(-3, -2).to(torch.bfloat16)  # [.., K/g, N, 2]
        layout = device.type if device.type in ("cpu", "cuda") and int4_supported(n, k, group_size, device) else "plain"
        flat = codes.reshape(-1, n, k)
        if layout == "cpu":
            packed = torch.stack([torch._convert_weight_to_int4pack_for_cpu(c.to(torch.int32).contiguous(), 1)
                                  for c in flat.to(device)])
        elif layout == "cuda":
            # tinygemm takes the even k in the high nibble, as torchao packs it (GPU status: docs/quantization.md)
            packed = torch.stack([torch._convert_weight_to_int4pack(pack_nibbles(c.to(device), even_high=True), 8)
                                  for c in flat])
        else:
            packed = pack_nibbles(flat.to(device))
        packed = packed.reshape(*lead, *packed.shape[1:])
        return cls(packed, sz.contiguous().to(device), group_size, layout, codes.shape)

    def join(self, parts: list[Int4Weight]) -> Int4Weight | None:
        """Output rows are the packed tensor's first dim in the plain layout. The CPU kernel's layout interleaves
        rows in blocks of 4 float vectors (32 rows with AVX2, 64 with AVX512): parts join when every part but the
        last fills whole 64-row blocks (measured on AVX2: 48 + 16 rows joined wrongly, 64 + 16 exactly).
        tinygemm's CUDA layout tiles rows by 8: joinable in principle, but never run here, so left apart."""
        if any(p.layout != self.layout or p.group_size != self.group_size or p.packed.dim() != 2 for p in parts):
            return None
        if self.layout not in ("cpu", "plain") or (self.layout == "cpu" and any(p.shape[0] % 64 for p in parts[:-1])):
            return None
        shape = (sum(p.shape[0] for p in parts), self.shape[1])
        return Int4Weight(torch.cat([p.packed for p in parts]), torch.cat([p.scales_and_zeros for p in parts], dim=-2),
                          self.group_size, self.layout, shape)

    def dequantize(self, dtype: torch.dtype, index=None) -> torch.Tensor:
        packed = self.packed if index is None else self.packed[index]
        sz = self.scales_and_zeros if index is None else self.scales_and_zeros[index]
        if self.layout == "plain":
            scales, zeros = sz[..., 0].transpose(-1, -2), sz[..., 1].transpose(-1, -2)
            return dequantize_int4(unpack_nibbles(packed), scales, zeros, dtype)
        # A kernel layout is opaque: recover W by multiplying the identity (rare: tests, a dense_weight call).
        if packed.dim() > 2 or (index is not None and not isinstance(index, int)):
            n = packed.shape[0] if packed.dim() > 2 else 1
            return torch.stack([self._kernel_mm(torch.eye(self._shape[-1], dtype=torch.bfloat16, device=packed.device),
                                                packed[i], sz[i]).T for i in range(n)]).to(dtype)
        eye = torch.eye(self._shape[-1], dtype=torch.bfloat16, device=packed.device)
        return self._kernel_mm(eye, packed, sz).T.to(dtype).contiguous()

    def _kernel_mm(self, x2d, packed, sz):
        if self.layout == "cpu":
            return torch._weight_int4pack_mm_for_cpu(x2d, packed, self.group_size, sz)
        return torch._weight_int4pack_mm(x2d, packed, self.group_size, sz)

    def matmul(self, x, bias=None, index=None):
        packed = self.packed if index is None else self.packed[index]
        if self.layout == "plain" or packed.dim() != (2 if self.layout == "cpu" else 4):
            return super().matmul(x, bias, index)
        sz = self.scales_and_zeros if index is None else self.scales_and_zeros[index]
        # bf16 activations: the kernels take nothing else (on a CPU float32 would also be far slower). Contiguous:
        # the CPU kernel reads rows densely whatever the strides say (a strided view gave wrong products).
        x2d = x.reshape(-1, x.shape[-1]).bfloat16().contiguous()
        y = self._kernel_mm(x2d, packed, sz).view(*x.shape[:-1], -1).to(x.dtype)
        return y if bias is None else y + bias

    @classmethod
    def from_export(cls, t: dict[str, torch.Tensor], group_size: int, device) -> Int4Weight:
        sz = t["scales_and_zeros"].float()
        scales, zeros = sz[..., 0].transpose(-1, -2), sz[..., 1].transpose(-1, -2)
        return cls.from_codes(unpack_nibbles(t["packed"]), scales, zeros, group_size, device)


def int4_export(codes, scales, zeros) -> dict[str, torch.Tensor]:
    """The device-independent form the disk cache stores: plain nibbles and bf16 scales_and_zeros."""
    sz = torch.stack([scales, zeros], dim=-1).transpose(-3, -2).to(torch.bfloat16).contiguous()
    return {"packed": pack_nibbles(codes).contiguous(), "scales_and_zeros": sz}


def use_int8_kernel(model: nn.Module, kernel: str, grouped_min_k: int | None = None) -> int:
    """Rebuild the 2-D CPU int8 weights of a loaded model for policy `kernel` ("pack", "dynamic" or "mixed"), the
    same codes and scales; returns how many changed. The loader applies this process's policy (place_int8_kernels);
    benchmarks and tests compare policies in one process. `grouped_min_k` overrides DOWN_GROUPED_MIN_K (a test
    runs the grouped kernel on a model narrower than that)."""
    min_k = DOWN_GROUPED_MIN_K if grouped_min_k is None else grouped_min_k
    count = 0
    for name, module in model.named_modules():
        qw = getattr(module, "qweight", None)
        if not isinstance(qw, Int8Weight) or len(qw.shape) != 2 or qw.scale.device.type != "cpu":
            continue
        if kernel == "mixed" and qw.kernel == "intmm":
            continue  # the head's own kernel (head_int8_kernel), placed when it was quantized
        if kernel == "mixed":
            want, groups = mixed_kernel_for(name, qw.shape[1], min_k)
        else:
            want, groups = kernel, 1
        if (qw.kernel, qw.groups) != (want, groups if want == "dynamic" else 1):
            module.qweight = Int8Weight(qw.q, qw.scale, want, groups)
            count += 1
    return count


def place_int8_kernels(model: nn.Module) -> nn.Module:
    """A loaded model's int8 layers under this process's "mixed" policy, when it is that (else as they are); with
    the compiled CPU decode step on, only in a model of MIXED_MIN_WEIGHTS_WHEN_COMPILED int8 weights or more."""
    if int8_kernel() != "mixed":
        return model
    from .cpu import compiled_cpu_default

    weights = sum(m.qweight.shape.numel() for m in model.modules()
                  if isinstance(getattr(m, "qweight", None), Int8Weight) and len(m.qweight.shape) == 2)
    if not compiled_cpu_default() or weights >= MIXED_MIN_WEIGHTS_WHEN_COMPILED:
        use_int8_kernel(model, "mixed")
    return model
