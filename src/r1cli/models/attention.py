"""The attention call shared by every architecture: the boolean masks (causal, sliding window, left padding) and
`sdpa`, PyTorch's fused kernels (with `masked_gqa` where CUDA's fused kernels refuse a masked grouped-query call)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    # (one query on a CPU too: its flash kernel with enable_gqa is several times slower than the query heads as
    # rows of their key/value head, in bf16: docs/performance.md)
    if gqa and (mask is not None and q.device.type == "cuda" or q.shape[2] == 1 and q.device.type == "cpu"):
        return masked_gqa(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def masked_gqa(q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
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
