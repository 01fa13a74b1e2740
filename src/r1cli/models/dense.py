"""Llama and Qwen2 (the R1-Distill models): grouped-query attention with half-split RoPE and a SwiGLU MLP.
Qwen2 differs only in its q/k/v biases (and an optional sliding window, handled by the mask)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelArgs
from .base import Block, CausalLM
from .cache import Cache
from .attention import sdpa
from .layers import MLP, Linear, column_linear, join_projections, kv_cache_dtype, row_linear
from .rope import apply_rope


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, shard=None):
        super().__init__()
        self.layer_id = layer_id
        world = shard.world if shard is not None else 1  # heads split across ranks (parallel.py)
        # more ranks than key/value heads: each rank holds a copy of the one its query heads share
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads // world, max(args.n_kv_heads // world, 1), args.head_dim
        self.scale = args.softmax_scale
        qkv_bias = args.qkv_bias or args.attention_bias
        self.q_proj = column_linear(args.dim, args.n_heads * args.head_dim, qkv_bias, shard)
        self.k_proj = Linear(args.dim, self.n_kv_heads * args.head_dim, qkv_bias)
        self.v_proj = Linear(args.dim, self.n_kv_heads * args.head_dim, qkv_bias)
        self.o_proj = row_linear(args.n_heads * args.head_dim, args.dim, args.attention_bias, shard)
        self.qkv_proj = None  # q, k and v in one matmul once loaded (fuse)

    def fuse(self) -> None:
        """After loading (the checkpoint names q, k and v apart): one matmul for the three."""
        join_projections(self, "qkv_proj", ("q_proj", "k_proj", "v_proj"))

    def forward(self, x: torch.Tensor, start_pos: int, rot, mask, cache: Cache | None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        nq, nkv = self.n_heads, self.n_kv_heads
        # q and k leave the rotation in the cache's dtype (float32 on a CPU without bf16 math: kv_cache_dtype)
        dtype = cache.layers[self.layer_id][0].dtype if cache is not None else x.dtype
        if self.qkv_proj is not None:
            h = self.qkv_proj(x).view(bsz, seqlen, nq + 2 * nkv, self.head_dim)
            q, k = apply_rope(h[:, :, : nq + nkv], rot, dtype).split([nq, nkv], dim=2)  # one rotation
            v = h[:, :, nq + nkv :]
        else:
            q = apply_rope(self.q_proj(x).view(bsz, seqlen, nq, self.head_dim), rot, dtype)
            k = apply_rope(self.k_proj(x).view(bsz, seqlen, nkv, self.head_dim), rot, dtype)
            v = self.v_proj(x).view(bsz, seqlen, nkv, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.write(self.layer_id, start_pos, k, v)
        out = sdpa(q, k, v, mask, self.scale).to(x.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class DenseLM(CausalLM):
    def __init__(self, args: ModelArgs, shard=None):
        layers = [
            Block(args, Attention(args, i, shard), MLP(args.dim, args.inter_dim, args.mlp_bias, shard))
            for i in range(args.n_layers)
        ]
        super().__init__(args, layers, shard)

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> Cache:
        a = self.args
        device = device or self.model.embed_tokens.weight.device
        dtype = dtype or kv_cache_dtype(self.model.embed_tokens.weight.dtype, device)
        shape = (batch_size, self.model.layers[0].self_attn.n_kv_heads, max_len, a.head_dim)  # this rank's heads
        layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(a.n_layers)
        ]
        return Cache(layers, max_len, slot_dim=2)
