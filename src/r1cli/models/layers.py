"""Building blocks shared by every architecture: RMSNorm, RoPE, linear layers with FP8 weights, the SwiGLU MLP,
and the attention call with its masks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelArgs, RopeArgs, yarn_mscale
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
    quant.QuantWeight, replacing `weight`), multiplied by PyTorch's packed kernels."""

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
    layout without a join (quant.QuantWeight.join)."""
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


# --- Rotary position embeddings ---------------------------------------------------------------------------


def rope_inv_freq(rope: RopeArgs, dim: int) -> torch.Tensor:
    """Inverse frequencies for `dim` rotary dims, with llama3 or YaRN scaling."""
    base = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / base
    if rope.freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(rope.freq_factors, dtype=torch.float32)
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band in between blended.
        orig = rope.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        smooth = (orig / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        out = torch.where(wavelen > orig / rope.low_freq_factor, inv_freq / rope.factor, inv_freq)
        medium = (wavelen >= orig / rope.high_freq_factor) & (wavelen <= orig / rope.low_freq_factor)
        return torch.where(medium, blended, out)
    if rope.kind == "yarn":
        orig = rope.original_max_position_embeddings

        def corr_dim(rotations: float) -> float:
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

        low, high = corr_dim(rope.beta_fast), corr_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        return inv_freq / rope.factor * ramp + inv_freq * (1 - ramp)
    return inv_freq


def rope_attention_factor(rope: RopeArgs) -> float:
    """YaRN's magnitude on cos/sin (1.0 for the DeepSeek configs, whose mscale equals mscale_all_dim)."""
    if rope.kind != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    if rope.mscale and rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_mscale(rope.factor)


def rope_table(args: ModelArgs, max_len: int) -> torch.Tensor:
    """Rotations [max_len, rope_dim/2, 2] (float32): (a cos(p f), a sin(p f)) for position p and frequency f,
    the real and imaginary parts of a * exp(i p f). Kept real so torch.compile can fuse the rotation."""
    inv_freq = rope_inv_freq(args.rope, args.rope_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1) * rope_attention_factor(args.rope)


class Rotation:
    """RoPE for one forward, prepared once and shared by every layer. `freqs` [B, T, D/2, 2] holds (a cos, a sin)
    per position and frequency. interleaved: pairs are (x0, x1), (x2, x3)... (DeepSeek); else (x_i, x_{i+D/2})
    (Llama, Qwen). Each pair (u, w) becomes (u cos - w sin, w cos + u sin), computed as x * cos + swap(x) * sin
    with cos and signed sin laid out per dim: five ops a call instead of fifteen, which a batch-1 decode pays
    per op (docs/performance.md)."""

    def __init__(self, freqs: torch.Tensor, interleaved: bool):
        self.interleaved = interleaved
        cos, sin = freqs[..., 0], freqs[..., 1]
        if interleaved:  # [c0, c0, c1, c1 ...], [-s0, s0, -s1, s1 ...]
            self.cos = cos.repeat_interleave(2, dim=-1)
            self.sin = torch.stack([-sin, sin], dim=-1).flatten(-2)
        else:  # [c, c], [-s, s]
            self.cos = torch.cat([cos, cos], dim=-1)
            self.sin = torch.cat([-sin, sin], dim=-1)
        self.cos, self.sin = self.cos.unsqueeze(2), self.sin.unsqueeze(2)  # [B, T, 1, D]: broadcast over heads

    def swap(self, x: torch.Tensor) -> torch.Tensor:
        """Each pair's partner: (w, u) in place of (u, w)."""
        if self.interleaved:
            return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return x.roll(x.shape[-1] // 2, dims=-1)


def apply_rope(x: torch.Tensor, rot: Rotation, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotate x [B, T, H, D]: a complex multiplication (u + i w)(cos + i sin) per pair, in float32. The result
    is in `dtype` (default x's: a float32 KV cache takes it unrounded)."""
    xf = x.float()
    return torch.addcmul(xf * rot.cos, rot.swap(xf), rot.sin).to(dtype or x.dtype)


# --- Attention --------------------------------------------------------------------------------------------


def attention_mask(
    start_pos: int,
    seqlen: int,
    key_valid: torch.Tensor | None,
    device: torch.device,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, T, S] (True = attend) for queries at cache slots start_pos..start_pos+T-1 over
    keys at slots 0..start_pos+T-1. None when no mask is needed: a single query over a full cache, or a prompt
    from slot 0 (then `sdpa` runs plain causal attention)."""
    end = start_pos + seqlen
    if key_valid is None and sliding_window is None and (seqlen == 1 or start_pos == 0):
        return None
    q_slot = torch.arange(start_pos, end, device=device)[:, None]
    k_slot = torch.arange(end, device=device)[None, :]
    allowed = k_slot <= q_slot
    if sliding_window is not None:
        allowed = allowed & (q_slot - k_slot < sliding_window)
    mask = allowed[None, None]
    if key_valid is not None:
        # A query that is itself padding would see nothing; let it see itself so softmax stays finite.
        mask = (mask & key_valid[:, None, None, :end]) | (k_slot == q_slot)
    return mask


def sdpa(q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, S, D] -> [B, H, T, Dv] with PyTorch's fused kernels (flash on GPU).
    mask None means causal when T == S (a prompt from slot 0) and full attention when T == 1."""
    causal = mask is None and q.shape[2] > 1
    gqa = q.shape[1] != k.shape[1]
    if gqa and mask is not None and q.device.type == "cuda":
        return masked_gqa(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def masked_gqa(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Grouped-query attention with a mask, without `enable_gqa`: PyTorch's fused CUDA kernels refuse that pair
    and it falls back to the math kernel (several launches, and the T x S scores in memory): every static decode
    step and every prompt after the first turn. One query (decode): the G query heads that share a key/value head
    become G query rows of it, no copy. More queries: each key/value head repeated for its query heads."""
    b, h, t, d = q.shape
    groups = h // k.shape[1]
    if t == 1:
        out = F.scaled_dot_product_attention(q.reshape(b, k.shape[1], groups, d), k, v, attn_mask=mask, scale=scale)
        return out.reshape(b, h, 1, out.shape[-1])
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
