"""What a model weighs, counted from its config on the meta device (no memory, no weights): parameters (total and
activated), the bytes of its weights as loaded (any dtype, int8/int4, FP8 kept, one rank's share), the bytes its
KV cache takes per token, and the bytes a decode step reads. `r1 show`, the multi-GPU planner (planner.py), the
engine and `r1 bench` all count here.
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import ModelArgs

# Bytes per weight of a checkpoint's dtype (config.json's torch_dtype, or "fp8"; the block scales are negligible).
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1}

# per(name, meta parameter, default bytes per element) -> bytes per element: how a quantized format counts.
BytesPerParam = Callable[[str, torch.Tensor, float], float]


def _meta_model(args: ModelArgs, gpus: int = 1, mtp: bool = False):
    """The model built on the meta device; with gpus > 1, rank 0's share (the fullest: the row-parallel biases,
    the extra expert). The sizes must divide across the ranks (parallel.check_sizes, checked by the caller)."""
    from .models import build_model

    shard = None
    if gpus > 1:
        from .parallel import Shard

        shard = Shard(rank=0, world=gpus)
    with torch.device("meta"):
        return build_model(args, shard, mtp=mtp)


def count_parameters(args: ModelArgs) -> tuple[int, int]:
    """(total, activated per token).
    Activated counts everything but the routed experts a token does not use and the routers' correction bias
    (it only steers the choice), which is how DeepSeek's 37.6B for R1 is counted."""
    model = _meta_model(args)
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


def bytes_per_param(quant: str, group_size: int = 32, head_int8: bool = False) -> BytesPerParam:
    """The per-element size of each (sharded, meta) parameter once loaded with `quant`: the weights quant.py
    quantizes (every decoder Linear but quant.FULL_PRECISION_LINEARS, and the stacked routed experts) at 1 byte
    plus a float32 scale per row (int8), or half a byte plus a bf16 scale and zero per group (int4, where the
    kernel takes the shape); the output head at 1 byte plus a float32 scale per row with `head_int8`
    (options.head_int8); anything else keeps `default`."""
    from .quant import FULL_PRECISION_LINEARS

    def per(name: str, p: torch.Tensor, default: float) -> float:
        module_name, _, leaf = name.rpartition(".")
        last = module_name.rsplit(".", 1)[-1]
        stacked = module_name.endswith(".experts")
        if head_int8 and name == "lm_head.weight":
            return 1 + 4 / p.shape[-1]
        # the embedding, head and router are no Linear of the decoder: never quantized
        if quant == "none" or p.dim() < 2 or last in FULL_PRECISION_LINEARS or last in ("embed_tokens", "lm_head", "gate"):
            return default
        if not (stacked or leaf == "weight"):
            return default
        k = p.shape[-1]
        if quant == "int8":
            return 1 + 4 / k
        return default if k % group_size else 0.5 + 4 / group_size

    return per


def weight_bytes(args: ModelArgs, quant: str = "none", group_size: int = 32, dtype_bytes: int = 2, gpus: int = 1,
                 fp8_kept: bool = False, per_param: BytesPerParam | None = None, head_int8: bool = False) -> int:
    """Bytes of the weights in memory once loaded (on the fullest GPU of `gpus`): parameters at `dtype_bytes`,
    the router at 4 (it stays float32: CausalLM.float32_parameters), FP8 weights at one byte plus a float32 scale
    per block when `fp8_kept` (a distributed run keeps them), quantized ones as `quant` stores them
    (bytes_per_param); with `head_int8` the head as int8 (a tied embedding keeps its table beside that int8 copy).
    `per_param` replaces the quantized count with another one."""
    from .models.deepseek import Experts
    from .models.layers import Linear

    model = _meta_model(args, gpus)
    per = per_param or bytes_per_param(quant, group_size, head_int8)
    float32 = model.float32_parameters()
    fp8 = set()
    if fp8_kept and args.fp8_block:
        fp8 = {f"{mod_name}.{p_name}" for mod_name, mod in model.named_modules() if isinstance(mod, (Linear, Experts))
               for p_name, _ in mod.named_parameters(recurse=False) if p_name != "bias"}
    block = args.fp8_block[0] * args.fp8_block[1] if args.fp8_block else 1
    total = 0.0
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if head_int8 and name == "lm_head.weight":  # quant.quantize_head: a separate int8 copy, tied or not
            total += p.numel() * per(name, p, dtype_bytes)
            continue
        if args.tie_embeddings and name == "lm_head.weight" or id(p) in seen:
            continue
        seen.add(id(p))
        default = 4 if name in float32 else 1 + 4 / block if name in fp8 else dtype_bytes
        total += p.numel() * per(name, p, default)
    return int(total)


def quantized_weight_bytes(args: ModelArgs, dtype_bytes: int) -> dict[str, int]:
    """`r1 show`'s "quantized_weights": the weights' bytes with --quant int8, int4 g32 and int4 g128, each with the
    head as that scheme loads it by default (options.head_int8)."""
    from .options import head_int8

    return {"int8": weight_bytes(args, "int8", 32, dtype_bytes, head_int8=head_int8("int8", None)),
            **{f"int4 g{g}": weight_bytes(args, "int4", g, dtype_bytes, head_int8=head_int8("int4", None))
               for g in (32, 128)}}


def kv_cache_bytes_per_token(args: ModelArgs, bytes_per_value: int = 2) -> int:
    """One token's keys and values over every layer: MLA caches its latent and rope key, others k and v per
    key/value head."""
    if args.is_deepseek:
        return args.n_layers * (args.kv_lora_rank + args.qk_rope_head_dim) * bytes_per_value
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * bytes_per_value


def kv_cache_bytes_per_gpu(args: ModelArgs, gpus: int, bytes_per_value: int = 2) -> int:
    """One token's KV cache on each of `gpus` ranks: MLA's latent cache is whole on every rank; others are split
    by key/value heads (copied when there are more GPUs than heads)."""
    kv = kv_cache_bytes_per_token(args, bytes_per_value)
    if args.is_deepseek:
        return kv
    return kv * max(args.n_kv_heads // gpus, 1) // args.n_kv_heads


def show_memory(args: ModelArgs, ctx: int, dtype: str, parameters: int) -> dict:
    """`r1 show`'s "memory": the `parameters` at the checkpoint's `dtype` (a DTYPE_BYTES name), the KV cache at
    `ctx` tokens (16 bits, or 32 for a float32 model), and on a machine that keeps a 16-bit model's cache in
    float32 (cpu.kv_cache_dtype) that figure too, as "kv_cache_here"."""
    weights = parameters * DTYPE_BYTES.get(dtype, 2)
    kv_per_token = kv_cache_bytes_per_token(args, 4 if dtype == "float32" else 2)
    memory = {"context": ctx, "weights": weights, "kv_cache": kv_per_token * ctx, "kv_cache_per_token": kv_per_token,
              "total": weights + kv_per_token * ctx}
    if dtype != "float32":
        memory.update(_kv_here(args, ctx))
    return memory


def _kv_here(args: ModelArgs, ctx: int) -> dict:
    """On a machine without a GPU whose CPU lacks bf16 math, a 16-bit model keeps its KV cache in float32
    (cpu.kv_cache_dtype): twice the bytes of the 16-bit figure. Empty elsewhere."""
    from .cpu import kv_cache_dtype

    if torch.cuda.is_available() or kv_cache_dtype(torch.bfloat16, torch.device("cpu")) != torch.float32:
        return {}
    return {"kv_cache_here": kv_cache_bytes_per_token(args, 4) * ctx, "kv_cache_here_dtype": "float32"}


def decode_bytes_per_token(args: ModelArgs, dtype_bytes: int, quant: str = "none", group_size: int = 32) -> float:
    """Weight bytes one decode step reads: every activated parameter except the embedding table (one row of it);
    with `quant` on a dense model, every weight as quantized (an MoE's quantized experts are left at dtype_bytes)."""
    _, activated = count_parameters(args)
    embedding = 0 if args.tie_embeddings else args.vocab_size * args.dim  # tied: the table is read whole as the head
    if quant != "none" and not args.is_moe_layer(args.n_layers - 1):  # dense: every quantized byte is read
        return weight_bytes(args, quant, group_size, dtype_bytes) - embedding * dtype_bytes
    return (activated - embedding + args.dim) * dtype_bytes
