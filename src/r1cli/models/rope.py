"""Rotary position embeddings: the frequencies (plain, linear, llama3 and YaRN scaling), the table of rotations
grown on demand by the model, and their application to queries and keys (`Rotation`, `apply_rope`)."""

from __future__ import annotations

import math

import torch

from ..config import ModelArgs, RopeArgs, yarn_mscale


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
