"""The decoder skeleton every architecture shares: embedding, pre-norm blocks, final norm, output head.

Module names follow the Hugging Face checkpoints (`model.layers.N.self_attn.q_proj`...), so a tensor in the
safetensors files lands on the parameter of the same name; only routed experts are stacked (see deepseek.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelArgs
from .cache import Cache
from .attention import attention_mask
from .layers import RMSNorm, VocabParallelEmbedding, VocabParallelHead
from .rope import Rotation, rope_table


def fuse_when_loaded(model: nn.Module, module_name: str) -> None:
    """Join the projections of the attention or MLP that owns linear `module_name` (q|k|v, gate|up: see
    `CausalLM.fuse_projections`) as soon as all its weights are in. Loaders call this after each tensor lands:
    fused layer by layer, the memory the parts free is reused by the next layer's parts; one pass at the end would
    leave holes the size of every part (the peak tests/test_load_memory.py bounds would then be exceeded)."""
    owner = module_name.rpartition(".")[0]
    module = model.get_submodule(owner) if owner else model
    if hasattr(module, "fuse") and not any(p.is_meta for p in module.parameters()):
        module.fuse()


def static_slots(seqlen: int, pos: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For T = seqlen queries from slot `pos` (a 1-element tensor) over the first `cache.view_len` slots: their
    slots `at` [T], the attended slots [S], and the causal mask [1, T, S] (query t sees slots <= pos+t)."""
    # one token keeps the decode step's own graph (the AOT step exports it): `at` is `pos` itself
    at = pos if seqlen == 1 else pos + torch.arange(seqlen, device=pos.device)
    slots = torch.arange(cache.view_len or cache.max_len, device=pos.device)
    return at, slots, (slots[None, :] <= at[:, None])[None]


class Block(nn.Module):
    def __init__(self, args: ModelArgs, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, start_pos, rot, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), start_pos, rot, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs, layers: list[Block], shard=None):
        super().__init__()
        if shard is None:
            # _weight skips the random init (on the meta device it would pull in torch's decomposition tables).
            self.embed_tokens = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        else:
            self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.dim, shard)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.dim, args.norm_eps)


class CausalLM(nn.Module):
    """`model(tokens)` -> float32 logits [B, T, vocab], a full forward from position 0.

    Incremental use (the generator): `cache = model.new_cache(B, max_len)`, then
    `model(tokens, start_pos=p, cache=cache)` for the prompt and each new token. `padding_mask` [B, T] (True = real
    token) supports left-padded batches; rotary positions then count real tokens only, as transformers does.

    `shard` (parallel.Shard, None for one process): this rank's part of a tensor-parallel model; every rank then
    runs the same forward in lockstep and returns the same full logits."""

    rope_interleaved = False  # RoPE's pairs: (x_i, x_{i+D/2}) (Llama, Qwen) or (x_2i, x_2i+1) (DeepSeek)
    keep_hidden = False  # keep the final normed hidden states of every position in `self.hidden` (the MTP draft reads them)

    def __init__(self, args: ModelArgs, layers: list[Block], shard=None):
        super().__init__()
        self.args = args
        self.shard = shard
        self.model = Backbone(args, layers, shard)
        if shard is None:
            self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        else:
            self.lm_head = VocabParallelHead(args.dim, args.vocab_size, shard)
        # Rotary table, grown on demand; not a checkpoint tensor.
        self.register_buffer("freqs", torch.empty(0, 0, 2), persistent=False)

    def float32_parameters(self) -> set[str]:
        """The parameters kept in float32 whatever the model's dtype: those of modules that say `keep_float32`
        (the router, deepseek.Gate). Every loader and every size count asks here."""
        return {f"{mod_name}.{p}" for mod_name, mod in self.named_modules() if getattr(mod, "keep_float32", False)
                for p, _ in mod.named_parameters(recurse=False)}

    def reset_rope(self, device: torch.device | str) -> None:
        """Once the weights are on `device`: the rotary table (built on demand, see ensure_rope) starts empty
        there. A model built on the meta device holds a meta table until then."""
        self.freqs = torch.empty(0, 0, 2, device=device)

    # The generator may pre-size the table before compiling the decode step.
    def ensure_rope(self, length: int) -> None:
        if self.freqs.shape[0] >= length:
            return
        size = max(length, 2 * self.freqs.shape[0], 4096)
        device = self.model.embed_tokens.weight.device
        self.freqs = rope_table(self.args, size).to(device)

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> Cache:
        raise NotImplementedError

    def fuse_projections(self) -> CausalLM:
        """Join the projections that read the same input (q|k|v, gate|up) into one matmul each: a batch-1 decode
        pays per matmul call. The checkpoint names them apart; the loaders join them as each layer's weights
        arrive (fuse_when_loaded) and this pass catches the rest (a no-op on what is joined)."""
        for module in list(self.modules()):
            if hasattr(module, "fuse"):
                module.fuse()
        return self

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        cache: Cache | None = None,
        padding_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        if isinstance(start_pos, torch.Tensor):
            return self._static_decode(tokens, start_pos, cache)
        bsz, seqlen = tokens.shape
        end = start_pos + seqlen
        if cache is not None:
            key_valid = cache.mark_valid(start_pos, padding_mask)
        elif start_pos == 0:
            key_valid = padding_mask
        else:
            raise ValueError("a forward from start_pos > 0 needs the cache that holds the earlier tokens")
        self.ensure_rope(end)
        if key_valid is None:
            freqs = self.freqs[start_pos:end].unsqueeze(0)
        else:
            positions = (key_valid[:, :end].long().cumsum(-1) - 1).clamp(min=0)[:, start_pos:end]
            freqs = self.freqs[positions]
        masks = {
            window: attention_mask(start_pos, seqlen, key_valid, tokens.device, window)
            for window in {self._window(i) for i in range(self.args.n_layers)}
        }
        return self._layers(tokens, start_pos, freqs, masks, cache, last_only)

    def decode_rows(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """One token per row, each row at its own slot (a batch of independent sequences: batch.py).
        tokens [R, 1], positions [R] (long, on the device), cache a `cache.RowCache` of R rows -> logits [R, vocab].
        Row b attends over its slots 0..positions[b] only. The caller sizes the rotary table first."""
        freqs = self.freqs[positions].unsqueeze(1)  # [R, 1, D/2, 2]
        slots = torch.arange(cache.attend_len, device=tokens.device)[None, :]
        pos = positions[:, None]
        masks = {}
        for window in {self._window(i) for i in range(self.args.n_layers)}:
            m = slots <= pos if window is None else (slots <= pos) & (pos - slots < window)
            masks[window] = m[:, None, None, :]
        return self._layers(tokens, positions, freqs, masks, cache, last_only=False)[:, -1]

    def _window(self, layer: int) -> int | None:
        return self.args.sliding_window if self.args.uses_sliding_window(layer) else None

    def _layers(self, tokens, start_pos, freqs, masks, cache, last_only) -> torch.Tensor:
        h = self.model.embed_tokens(tokens)
        rot = Rotation(freqs, self.rope_interleaved)  # once per forward, shared by the layers
        for i, layer in enumerate(self.model.layers):
            h = layer(h, start_pos, rot, masks[self._window(i)], cache)
        if self.keep_hidden:
            self.hidden = self.model.norm(h)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.model.norm(h)).float()

    def _static_decode(self, tokens: torch.Tensor, pos: torch.Tensor, cache: Cache) -> torch.Tensor:
        """T tokens per row at slots pos..pos+T-1 (`pos` a 1-element tensor on the device), attending over the
        first `cache.view_len` slots with a causal mask (query t sees slots <= pos+t): fixed shapes and no host
        sync, so it compiles and graph-captures. T = 1 is a decode step; T = k+1 the speculative verify. Slots past
        pos+T-1 may hold stale tokens (a rolled-back verify): the mask hides them. The caller sizes the rotary
        table first (`ensure_rope`) and picks a `view_len` that covers pos+T-1."""
        at, slots, valid = static_slots(tokens.shape[1], pos, cache)
        freqs = self.freqs[at].unsqueeze(0)  # [1, T, D/2, 2]
        if cache.key_valid is not None:
            cache.key_valid.index_fill_(1, at, True)
            valid = valid & cache.key_valid[:, None, : slots.shape[0]]
            # rotary positions count real tokens only, as in the padded prefill
            freqs = self.freqs[(valid.long().sum(-1) - 1)]  # [B, T, D/2, 2]
        masks = {}
        for window in {self._window(i) for i in range(self.args.n_layers)}:
            m = valid if window is None else valid & (at[:, None] - slots[None, :] < window)[None]
            masks[window] = m[:, None]  # [B or 1, 1, T, S]
        # Cache.write stores the T new keys and values at slots `at` (index_copy_)
        return self._layers(tokens, at, freqs, masks, cache, last_only=False)
