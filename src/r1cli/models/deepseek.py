"""DeepSeek-V3/R1 and V2: Multi-head Latent Attention over a compressed cache, and a mixture of experts with
group-limited routing and shared experts.

Einsum indices: b batch, t query tokens, s key slots, h heads, d head dims, c latent (kv_lora_rank),
r rope dims, e experts, f expert hidden dims, p (token, expert) pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelArgs
from .base import Block, CausalLM, static_slots
from .cache import Cache
from .attention import attention_mask, sdpa
from .layers import MLP, Linear, RMSNorm, column_linear, dequantize_fp8, kv_cache_dtype, linear, row_linear
from .rope import Rotation, apply_rope

# q_a_layernorm and kv_a_layernorm use transformers' default eps whatever rms_norm_eps says.
LORA_NORM_EPS = 1e-6


class MLA(nn.Module):
    """Queries through a low-rank bottleneck (or q_proj when q_lora_rank is null); keys and values from one
    normalised latent per token plus one rope key shared by every head. The cache stores only those two."""

    def __init__(self, args: ModelArgs, layer_id: int, shard=None):
        super().__init__()
        self.layer_id = layer_id
        # Tensor parallel: heads split across ranks (q_b/q and kv_b rows, o columns); the latent path is replicated.
        self.n_heads = args.n_heads // (shard.world if shard is not None else 1)
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.rank = args.kv_lora_rank
        self.scale = args.softmax_scale
        self.mode = "auto"  # auto | naive | absorbed (tests pin one form)
        qk = args.qk_head_dim
        if args.q_lora_rank:
            self.q_a_proj = Linear(args.dim, args.q_lora_rank, args.attention_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = column_linear(args.q_lora_rank, args.n_heads * qk, False, shard)
        else:
            self.q_proj = column_linear(args.dim, args.n_heads * qk, False, shard)
        self.kv_a_proj_with_mqa = Linear(args.dim, self.rank + self.rope, args.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, LORA_NORM_EPS)
        self.kv_b_proj = column_linear(self.rank, args.n_heads * (self.nope + self.v_dim), False, shard)
        self.o_proj = row_linear(args.n_heads * self.v_dim, args.dim, args.attention_bias, shard)

    def forward(self, x: torch.Tensor, start_pos: int, rot, mask, cache: Cache | None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(bsz, seqlen, self.n_heads, -1).split([self.nope, self.rope], dim=-1)
        q_rope = apply_rope(q_rope, rot)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rope = apply_rope(k_rope.unsqueeze(2), rot).squeeze(2)
        if cache is not None:
            latent, k_rope = cache.write(self.layer_id, start_pos, latent, k_rope)
        absorbed = self.mode == "absorbed" or (self.mode == "auto" and cache is not None and seqlen <= 16)
        attend = self._absorbed if absorbed else self._naive
        out = attend(q_nope, q_rope, latent, k_rope, mask)
        return self.o_proj(out.flatten(2))

    def _naive(self, q_nope, q_rope, latent, k_rope, mask):
        """Expand the latent into per-head keys and values, then fused attention (best for prefill)."""
        bsz, slots = latent.shape[:2]
        latent, k_rope = latent.to(q_nope.dtype), k_rope.to(q_nope.dtype)  # (a float32 cache: see _absorbed)
        kv = self.kv_b_proj(latent).view(bsz, slots, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale)
        return out.transpose(1, 2)

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask):
        """Attend in latent space: W_UK folded into the query, W_UV applied after (best for decode: reads the
        compressed cache only, never expands it per head)."""
        # The weights multiply in the model's dtype; what reads the cache runs in the cache's (float32 on a CPU
        # without bf16 math: kv_cache_dtype).
        w = self.kv_b_proj.dense_weight(q_nope.dtype).view(self.n_heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk).to(latent.dtype)
        q_rope = q_rope.to(k_rope.dtype)
        scores = torch.einsum("bthc,bsc->bhts", q_latent, latent) + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)
        scores = scores.float() * self.scale
        if mask is None and scores.shape[2] > 1:  # None means causal here too (queries are the last T slots)
            t, s = scores.shape[2:]
            mask = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(latent.dtype)
        out_latent = torch.einsum("bhts,bsc->bthc", probs, latent).to(w_uv.dtype)
        return torch.einsum("bthc,hdc->bthd", out_latent, w_uv)


class Gate(nn.Module):
    """The router, in float32. V3 (noaux_tc): sigmoid scores; the correction bias only chooses; groups ranked by
    the sum of their two best biased scores. V2: softmax scores; greedy, or groups ranked by their best score."""

    keep_float32 = True  # the loader keeps the router's weight and bias in float32

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = args.n_activated_experts, args.n_group, args.topk_group
        self.method, self.scoring = args.topk_method, args.scoring_func
        self.norm_topk_prob, self.scaling = args.norm_topk_prob, args.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, dtype=torch.float32))
        if self.method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim] -> (weights [N, k] float32, expert indices [N, k])."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if self.method == "noaux_tc" else scores
        if self.method in ("noaux_tc", "group_limited_greedy") and self.n_group > 1:
            grouped = choice.view(x.shape[0], self.n_group, -1)
            if self.method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, indices


class Experts(nn.Module):
    """Routed experts stacked per layer: gate_proj/up_proj [E, f, dim], down_proj [E, dim, f]. The loader fills
    them from the per-expert checkpoint tensors; FP8 scales, when kept, are stacked the same way.

    Expert parallel (a shard): this rank holds experts `first ..< first + E_local` only (parallel.Shard.experts) and
    returns its partial sum over the pairs routed to them; the MoE reduces across ranks."""

    def __init__(self, args: ModelArgs, shard=None):
        super().__init__()
        e, f, d = args.n_routed_experts, args.moe_inter_dim, args.dim
        self.shard = shard
        if shard is not None:
            local = shard.experts(e)
            self.first, e = local.start, len(local)
        self.gate_proj = nn.Parameter(torch.empty(e, f, d))
        self.up_proj = nn.Parameter(torch.empty(e, f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))
        for name in ("gate_proj", "up_proj", "down_proj"):  # stacked block scales, when the weights stay FP8
            self.register_buffer(f"{name}_scale_inv", None)
        # (token, expert) pairs up to which a GPU gathers the chosen experts' weights (decode); more take grouped
        # GEMMs (prefill). Both without a host sync, so the decode step can be graph-captured. See path().
        self.gather_limit = 64
        # where grouped GEMMs do not apply: gathered up to a speculative verify's pairs (9 tokens x R1's 8 experts),
        # whose captured step cannot take the sorted path's host sync
        self.verify_gather_limit = 72
        self.n_experts = e
        # name -> a stacked quant_formats.QuantWeight replacing that parameter (int8/int4, quantized per expert)
        self.quant = nn.ModuleDict()

    def quantize(self, name: str, qweight: nn.Module) -> None:
        setattr(self, name, None)
        setattr(self, f"{name}_scale_inv", None)
        self.quant[name] = qweight

    def weights(self, name: str, index, dtype: torch.dtype) -> torch.Tensor:
        if name in self.quant:  # gather, then dequantize only the chosen experts
            return self.quant[name].dequantize(dtype, index)
        w = getattr(self, name)[index]
        scale = getattr(self, f"{name}_scale_inv")
        return w.to(dtype) if scale is None else dequantize_fp8(w, scale[index], dtype)

    def matmul(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """x @ W_e^T for one expert: the packed kernels when quantized."""
        if name in self.quant:
            return self.quant[name].matmul(x, None, e)
        return linear(x, self.weights(name, e, x.dtype))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.shard is not None:
            weights, indices = self.localize(weights, indices)
        return getattr(self, self.path(x, indices))(x, weights, indices)

    def path(self, x: torch.Tensor, indices: torch.Tensor) -> str:
        """A CPU is synchronous, so the sorted loop costs it no stall, and it converts one expert at a time to
        float32 for prompts (bf16 matmuls are far slower on CPUs without bf16 math). A GPU takes paths without a
        host sync: gathered for a few pairs (decode), grouped GEMMs for more (prefill), where the kernel applies."""
        if x.device.type == "cpu":
            return "_sorted"
        if indices.numel() <= self.gather_limit:
            return "_gathered"
        if self.groupable(x):
            return "_grouped"
        return "_gathered" if indices.numel() <= self.verify_gather_limit else "_sorted"

    def groupable(self, x: torch.Tensor) -> bool:
        """F.grouped_mm on CUDA takes bf16 on SM80+; quantized and FP8-kept experts use their own kernels."""
        if self.quant or any(getattr(self, f"{n}_scale_inv") is not None for n in ("gate_proj", "up_proj", "down_proj")):
            return False
        aligned = x.shape[-1] % 8 == 0 and self.gate_proj.shape[1] % 8 == 0  # 16-byte strides
        return aligned and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)

    def localize(self, weights, indices):
        """Expert parallel: pairs routed to other ranks' experts get weight 0 and the slot past the local experts
        (so the sorted path puts them last and never computes them)."""
        n_local = self.n_experts
        local = (indices >= self.first) & (indices < self.first + n_local)
        return weights * local, torch.where(local, indices - self.first, n_local)

    def _gathered(self, x, weights, indices):
        """Decode: read only the chosen experts' weights, no per-expert loop and no host sync."""
        n, k = indices.shape
        flat = indices.reshape(-1)
        if self.shard is not None:
            flat = flat.clamp(max=self.n_experts - 1)  # other ranks' pairs: any expert, weight 0
        xp = x.repeat_interleave(k, dim=0)  # [p, dim]
        h = F.silu(torch.einsum("pd,pfd->pf", xp, self.weights("gate_proj", flat, x.dtype)))
        h = h * torch.einsum("pd,pfd->pf", xp, self.weights("up_proj", flat, x.dtype))
        y = torch.einsum("pf,pdf->pd", h, self.weights("down_proj", flat, x.dtype))
        return (y.view(n, k, -1).float() * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)

    def _grouped(self, x, weights, indices):
        """Prefill on a GPU: the pairs sorted by expert, each projection one grouped GEMM over all experts.
        No per-expert loop and no host sync (the group ends come from a search on the device)."""
        n, k = indices.shape
        flat = indices.reshape(-1)
        order = flat.argsort()
        # ends[e] = pairs routed to experts <= e; pairs past ends[-1] belong to other ranks' experts
        ends = torch.searchsorted(flat[order], torch.arange(self.n_experts, device=x.device), right=True)
        ends = ends.to(torch.int32)
        token_of_pair = order // k
        xs = x[token_of_pair]
        h = F.silu(F.grouped_mm(xs, self.gate_proj.transpose(1, 2), offs=ends))
        h = h * F.grouped_mm(xs, self.up_proj.transpose(1, 2), offs=ends)
        out = F.grouped_mm(h, self.down_proj.transpose(1, 2), offs=ends)
        pair_weights = weights.reshape(-1)[order].unsqueeze(-1)
        computed = (torch.arange(flat.numel(), device=x.device) < ends[-1]).unsqueeze(-1)
        # rows past the last group are left unwritten by the kernel: select, so that no NaN leaks through a 0 weight
        contrib = torch.where(computed, out.float() * pair_weights, 0.0)
        y = torch.zeros(n, x.shape[-1], dtype=torch.float32, device=x.device)
        y.index_add_(0, token_of_pair, contrib)
        return y.to(x.dtype)

    def _sorted(self, x, weights, indices):
        """The CPU's path, and a GPU's for quantized or FP8-kept experts: group the (token, expert) pairs by
        expert and run each expert once on its tokens (the packed kernels when quantized)."""
        n, k = indices.shape
        flat = indices.reshape(-1)
        order = flat.argsort()
        n_local = self.n_experts
        counts = torch.bincount(flat, minlength=n_local).tolist()[:n_local]  # one sync per layer
        token_of_pair = order // k
        xs = x[token_of_pair]
        out = torch.empty_like(xs)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            h = F.silu(self.matmul("gate_proj", e, xs[rows])) * self.matmul("up_proj", e, xs[rows])
            out[rows] = self.matmul("down_proj", e, h)
            start += count
        pair_weights = weights.reshape(-1)[order].unsqueeze(-1)
        y = torch.zeros(n, x.shape[-1], dtype=torch.float32, device=x.device)
        # rows past `start` are pairs for other ranks' experts (expert parallel): never computed, left out
        y.index_add_(0, token_of_pair[:start], out[:start].float() * pair_weights[:start])
        return y.to(x.dtype)


class MoE(nn.Module):
    """With a shard: the router is replicated, routed experts are split by expert, shared experts like a dense MLP;
    both partial sums are reduced by one all-reduce."""

    def __init__(self, args: ModelArgs, shard=None):
        super().__init__()
        self.shard = shard
        self.gate = Gate(args)
        self.experts = Experts(args, shard)
        self.shared_experts = (
            MLP(args.dim, args.moe_inter_dim * args.n_shared_experts, shard=shard, reduce=False)
            if args.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices = self.gate(flat)
        y = self.experts(flat, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)  # shared experts are not weighted
        if self.shard is not None:
            y = self.shard.all_reduce(y)
        return y.view(shape)


class MTPLayer(Block):
    """DeepSeek-V3/R1's multi-token-prediction module (checkpoint `model.layers.{n_layers}.*`): position i joins
    the main model's final hidden state h_i with the embedding of token i+1,
    eh_proj([enorm(embed(t_{i+1})) | hnorm(h_i)]), runs one full decoder block, and predicts token i+2 through
    shared_head.norm and the main model's head. The checkpoint's own copies of the embedding and head
    (`embed_tokens`, `shared_head.head`) equal the main ones and are not loaded. Attention is layer 0 of its own
    one-layer cache."""

    def __init__(self, args: ModelArgs, shard=None):
        mlp = MoE(args, shard) if args.is_moe_layer(args.n_layers) else MLP(args.dim, args.inter_dim, shard=shard)
        super().__init__(args, MLA(args, 0, shard), mlp)
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = Linear(2 * args.dim, args.dim, False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(args.dim, args.norm_eps)


class DeepSeekLM(CausalLM):
    rope_interleaved = True

    def __init__(self, args: ModelArgs, shard=None, mtp: bool = False):
        layers = [
            Block(args, MLA(args, i, shard),
                  MoE(args, shard) if args.is_moe_layer(i) else MLP(args.dim, args.inter_dim, shard=shard))
            for i in range(args.n_layers)
        ]
        super().__init__(args, layers, shard)
        self.mtp = MTPLayer(args, shard) if mtp else None  # loaded from model.layers.{n_layers}.* (weights.py)

    def new_mtp_cache(self, max_len: int) -> Cache:
        a = self.args
        device = self.model.embed_tokens.weight.device
        dtype = kv_cache_dtype(self.model.embed_tokens.weight.dtype, device)
        layer = (torch.zeros(1, max_len, a.kv_lora_rank, dtype=dtype, device=device),
                 torch.zeros(1, max_len, a.qk_rope_head_dim, dtype=dtype, device=device))
        return Cache([layer], max_len, slot_dim=1)

    def mtp_forward(self, tokens: torch.Tensor, hidden: torch.Tensor, start_pos: int, cache: Cache):
        """The MTP layer at slots start_pos..: `tokens` [1, T] are tokens i+1, `hidden` [1, T, dim] the final
        hidden states at i (`keep_hidden`, or this layer's own output when it drafts further). Returns the
        logits [1, T, vocab] for tokens i+2 and the layer's output hidden states.
        A tensor start_pos (1 element): fixed shapes over the cache's `view_len` slots, as `CausalLM.forward`'s
        static step (the caller sizes the rotary table)."""
        seqlen = tokens.shape[1]
        mtp = self.mtp
        emb = self.model.embed_tokens(tokens)
        if isinstance(start_pos, torch.Tensor):
            start_pos, _, valid = static_slots(seqlen, start_pos, cache)  # start_pos: the T slots now
            rot = Rotation(self.freqs[start_pos].unsqueeze(0), self.rope_interleaved)
            mask = valid[:, None]
            # position 0 sees no embedding (below), without a host sync
            emb = emb.masked_fill((start_pos == 0)[None, :, None], 0)
        else:
            end = start_pos + seqlen
            self.ensure_rope(end)
            rot = Rotation(self.freqs[start_pos:end].unsqueeze(0), self.rope_interleaved)
            mask = attention_mask(start_pos, seqlen, None, tokens.device, None)
            if start_pos == 0:  # position 0 sees no embedding, as vLLM and SGLang run it
                emb[:, 0] = 0
        h = mtp.eh_proj(torch.cat([mtp.enorm(emb), mtp.hnorm(hidden.to(emb.dtype))], dim=-1))
        h = mtp(h, start_pos, rot, mask, cache)
        return self.lm_head(mtp.shared_head.norm(h)).float(), h

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> Cache:
        a = self.args
        device = device or self.model.embed_tokens.weight.device
        dtype = dtype or kv_cache_dtype(self.model.embed_tokens.weight.dtype, device)
        layers = [
            (
                torch.zeros(batch_size, max_len, a.kv_lora_rank, dtype=dtype, device=device),
                torch.zeros(batch_size, max_len, a.qk_rope_head_dim, dtype=dtype, device=device),
            )
            for _ in range(a.n_layers)
        ]
        return Cache(layers, max_len, slot_dim=1)
