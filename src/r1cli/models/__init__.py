"""Model families: dense.py (Llama, Qwen2) and deepseek.py (DeepSeek-V2/V3/R1), on the skeleton in base.py;
`build_model`, the one constructor. What a model weighs is sizes.py's."""

from __future__ import annotations

from ..config import ModelArgs
from .base import CausalLM
from .cache import Cache


def build_model(args: ModelArgs, shard=None, mtp: bool = False) -> CausalLM:
    """Construct the architecture (call under `torch.device("meta")` to allocate nothing). With a
    parallel.Shard of more than one rank: this rank's part only (its sizes checked first by the caller:
    parallel.check_sizes). `mtp`: DeepSeek's multi-token-prediction layer too (`model.mtp`, the speculative draft)."""
    if shard is not None and shard.world == 1:
        shard = None
    if args.is_deepseek:
        from .deepseek import DeepSeekLM

        return DeepSeekLM(args, shard, mtp=mtp)
    from .dense import DenseLM

    return DenseLM(args, shard)


__all__ = ["Cache", "CausalLM", "build_model"]
