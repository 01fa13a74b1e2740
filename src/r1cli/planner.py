"""The per-GPU memory plan of a tensor/expert-parallel run: the weights on the fullest GPU and the KV cache at a
context, against the GPU's memory less a reserve (`r1 show --gpus N`, and the engine before a multi-GPU load
refuses what cannot fit). The counting itself is sizes.py's; where each tensor is split, parallel.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import ModelArgs
from .sizes import BytesPerParam, kv_cache_bytes_per_gpu, weight_bytes


@dataclass(frozen=True)
class MemoryPlan:
    gpus: int
    context: int
    weights: int  # bytes on the fullest GPU (rank 0: the row-parallel biases, the extra expert)
    kv_cache: int  # bytes per GPU at `context` tokens
    gpu_mem: int | None
    reserve: int  # kept free for activations, the CUDA context and NCCL buffers
    fp8: bool

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_mem is None else self.total + self.reserve <= self.gpu_mem


RESERVE_FRACTION = 0.08  # an estimate (docs/distributed.md says what was measured)


def plan_memory(args: ModelArgs, gpus: int, context: int, gpu_mem: int | None = None, dtype_bytes: int = 2,
                bytes_per_param: BytesPerParam | None = None) -> MemoryPlan:
    """Weights and KV cache per GPU for `gpus` ranks at `context` tokens (bytes), counted on the meta device.
    The sizes must divide across the ranks: the caller checks them first (parallel.check_sizes).

    FP8 checkpoints are planned as loaded by a distributed run: FP8 weights stay FP8 (one byte, plus a float32
    scale per 128x128 block). `bytes_per_param(name, meta_tensor, default)` may override any parameter's size
    per element (quantized formats plug in there: sizes.bytes_per_param)."""
    weights = weight_bytes(args, dtype_bytes=dtype_bytes, gpus=gpus, fp8_kept=True,
                           per_param=bytes_per_param or (lambda name, p, default: default))
    kv = kv_cache_bytes_per_gpu(args, gpus, dtype_bytes)
    reserve = int(gpu_mem * RESERVE_FRACTION) if gpu_mem else 0
    return MemoryPlan(gpus, context, weights, kv * context, gpu_mem, reserve, bool(args.fp8_block))


def describe_plan(plan: MemoryPlan, fmt: Callable[[float], str]) -> str:
    line = (f"weights {fmt(plan.weights)} + KV cache {fmt(plan.kv_cache)} @{plan.context} tokens = "
            f"{fmt(plan.total)} per GPU")
    if plan.gpu_mem is not None:
        verdict = "fits" if plan.fits else "does not fit"
        line += f"; {verdict} in {fmt(plan.gpu_mem)} (keeping {fmt(plan.reserve)} free)"
    return line
