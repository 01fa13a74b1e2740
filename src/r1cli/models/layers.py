"""Building blocks shared by every architecture: RMSNorm, linear layers (FP8 weights kept or not, int8/int4
through quant_formats, joined projections, tensor-parallel columns and rows), the vocabulary-parallel embedding and
head, the SwiGLU MLP. Rotary embeddings are rope.py's; the attention call and its masks, attention.py's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu import BF16_UPCAST_ROWS, kv_cache_dtype  # noqa: F401  (kv_cache_dtype: imported from here by the models)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the input dtype, as the reference models do. (The mean of squares as
        # sum, divide, add in place: less time per call than pow/mean/add on a 1-token decode, same values.)
        h = x.float()
        h = h * torch.rsqrt((h * h).sum(-1, keepdim=True).div_(h.shape[-1]).add_(self.eps))
        return self.weight * h.to(x.dtype)


# --- FP8 block-quantized weights ---------------------------------------------------------------------------


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, block=(128, 128)) -> torch.Tensor:
    """w = fp8 * scale_inv[i // 128, j // 128] (a multiply, despite the name). Edge blocks may be ragged.

    Works on [out, in] and on stacked experts [E, out, in] with scales [E, ceil(out/128), ceil(in/128)]."""
    rows, cols = weight.shape[-2:]
    s = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    s = s.repeat_interleave(block[1], dim=-1)[..., :cols]
    return (weight.float() * s).to(dtype)


# Which CPUs lack bf16 math, and what follows (prompt matmuls through float32, a float32 KV cache): cpu.py.
CPU_BF16_UPCAST_ROWS = BF16_UPCAST_ROWS


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, but through float32 for prompt-sized bf16 inputs on a CPU without bf16 math."""
    # (the row count first: a decode step's one row skips the rest of the test)
    if (CPU_BF16_UPCAST_ROWS and x.numel() >= CPU_BF16_UPCAST_ROWS * x.shape[-1] and x.dtype == torch.bfloat16
            and x.device.type == "cpu"):
        return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, w, bias)


class Linear(nn.Module):
    """y = x W^T (+ b). The weight may be kept in FP8 with its block scales and dequantized per matmul,
    so a 671B FP8 checkpoint needs about one byte per parameter; or quantized to int8/int4 (`qweight`, a
    quant_formats.QuantWeight, replacing `weight`), multiplied by PyTorch's packed kernels."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        # Block scales, set by the loader when the checkpoint's weight is FP8 and stays FP8 in memory.
        self.register_buffer("weight_scale_inv", None)
        self.qweight = None

    def quantize(self, qweight: nn.Module) -> None:
        """Swap the float weight for its quantized form (quant.py)."""
        self.weight, self.weight_scale_inv, self.qweight = None, None, qweight

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.qweight is not None:
            return self.qweight.dequantize(dtype or torch.bfloat16)
        w = self.weight
        if self.weight_scale_inv is not None:
            return dequantize_fp8(w, self.weight_scale_inv, dtype or torch.bfloat16)
        return w if dtype is None else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return self.qweight.matmul(x, self.bias)
        # dense_weight's steps inline: this runs once per projection per decode step, where an extra call shows
        w = self.weight
        if self.weight_scale_inv is not None:
            w = dequantize_fp8(w, self.weight_scale_inv, x.dtype)
        elif w.dtype != x.dtype:
            w = w.to(x.dtype)
        return linear(x, w, self.bias)


def fuse_linears(parts: list[Linear]) -> Linear | None:
    """One Linear computing the parts' outputs side by side (q|k|v, gate|up): one matmul where there were three
    or two, and a batch-1 decode pays per call (a fixed cost each, and small products run below the memory
    bandwidth). None when the parts cannot be joined: FP8 weights kept in blocks, a parallel subclass, a quantized
    layout without a join (quant_formats.QuantWeight.join)."""
    first = parts[0]
    kinds = {(type(p), p.in_features, p.bias is None, type(p.qweight), p.weight_scale_inv is None) for p in parts}
    if len(kinds) != 1 or type(first) is not Linear or first.weight_scale_inv is not None:
        return None
    qweight = None
    if first.qweight is not None:
        qweight = first.qweight.join([p.qweight for p in parts])
        if qweight is None:
            return None
    with torch.device("meta"):
        fused = Linear(first.in_features, sum(p.out_features for p in parts), first.bias is not None)
    if qweight is not None:
        fused.quantize(qweight)
    else:
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


def join_projections(module: nn.Module, joined: str, parts: tuple[str, ...]) -> None:
    """Replace `module`'s linear layers `parts` by one, `joined` (fuse_linears), unless done or impossible."""
    if getattr(module, joined) is not None:
        return
    fused = fuse_linears([getattr(module, name) for name in parts])
    if fused is not None:
        setattr(module, joined, fused)
        for name in parts:
            delattr(module, name)


class RowParallelLinear(Linear):
    """Tensor parallel (parallel.py): the input features are split across ranks, so each rank's product is a partial
    sum; one all-reduce completes it. Only rank 0 holds the bias, so it is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, shard):
        super().__init__(shard.part(in_features, "row-parallel input features"), out_features, bias and shard.leader)
        self.shard = shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shard.all_reduce(super().forward(x))


def column_linear(in_features: int, out_features: int, bias: bool, shard) -> Linear:
    """Output features split across ranks (no communication); a plain Linear without a shard."""
    return Linear(in_features, out_features if shard is None else shard.part(out_features, "output features"), bias)


def row_linear(in_features: int, out_features: int, bias: bool, shard) -> Linear:
    return Linear(in_features, out_features, bias) if shard is None else RowParallelLinear(in_features, out_features, bias, shard)


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous block of vocabulary rows; tokens outside it look up zeros, an all-reduce sums."""

    def __init__(self, vocab: int, dim: int, shard):
        super().__init__()
        self.shard = shard
        self.start, rows = shard.span(vocab, "vocabulary rows")
        self.weight = nn.Parameter(torch.empty(rows, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return self.shard.all_reduce(h)


class VocabParallelHead(nn.Module):
    """Each rank scores its vocabulary rows; the logits are all-gathered, so every rank holds all of them."""

    def __init__(self, dim: int, vocab: int, shard):
        super().__init__()
        self.shard = shard
        self.weight = nn.Parameter(torch.empty(shard.part(vocab, "vocabulary rows"), dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.shard.gather_last(F.linear(h, self.weight))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). With a shard: gate/up column-parallel, down row-parallel
    (reduce=False leaves the partial sum to the caller: the MoE reduces shared and routed experts at once)."""

    def __init__(self, dim: int, inter_dim: int, bias: bool = False, shard=None, reduce: bool = True):
        super().__init__()
        self.gate_proj = column_linear(dim, inter_dim, bias, shard)
        self.up_proj = column_linear(dim, inter_dim, bias, shard)
        if shard is not None and not reduce:
            self.down_proj = Linear(shard.part(inter_dim, "hidden units"), dim, bias and shard.leader)
        else:
            self.down_proj = row_linear(inter_dim, dim, bias, shard)
        self.gate_up_proj = None  # gate and up in one matmul once loaded (fuse)

    def fuse(self) -> None:
        """After loading (the checkpoint names gate and up apart): one matmul for both."""
        join_projections(self, "gate_up_proj", ("gate_proj", "up_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)
