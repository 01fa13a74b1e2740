"""Model families: dense.py (Llama, Qwen2) and deepseek.py (DeepSeek-V2/V3/R1), on the skeleton in base.py."""

from __future__ import annotations

import torch

from ..config import ModelArgs
from .base import CausalLM
from .cache import Cache


def build_model(args: ModelArgs, shard=None, mtp: bool = False) -> CausalLM:
    """Construct the architecture (call under `torch.device("meta")` to allocate nothing). With a
    parallel.Shard of more than one rank: this rank's part only (sizes checked first, see parallel.check_sizes).
    `mtp`: DeepSeek's multi-token-prediction layer too (`model.mtp`, the speculative draft)."""
    if shard is not None and shard.world == 1:
        shard = None
    if shard is not None:
        from ..parallel import check_sizes

        check_sizes(args, shard)
    if args.is_deepseek:
        from .deepseek import DeepSeekLM

        return DeepSeekLM(args, shard, mtp=mtp)
    from .dense import DenseLM

    return DenseLM(args, shard)


def count_parameters(args: ModelArgs) -> tuple[int, int]:
    """(total, activated per token), counted on the meta device: no memory, no weights needed.
    Activated counts everything but the routed experts a token does not use and the routers' correction bias
    (it only steers the choice), which is how DeepSeek's 37.6B for R1 is counted."""
    with torch.device("meta"):
        model = build_model(args)
    total = sum(p.numel() for p in model.parameters())
    if args.tie_embeddings:
        total -= model.lm_head.weight.numel()
    inactive = 0
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            per_expert = sum(p[0].numel() for p in experts.parameters())
            inactive += per_expert * (args.n_routed_experts - args.n_activated_experts)
            bias = getattr(layer.mlp.gate, "e_score_correction_bias", None)
            inactive += bias.numel() if bias is not None else 0
    return total, total - inactive


__all__ = ["Cache", "CausalLM", "build_model", "count_parameters"]
