"""Decode speed against the number of cached tokens, with the KV cache in bf16 and in float32 (what r1 keeps on a
CPU without bf16 math, `layers.kv_cache_dtype`), in one process: SmolLM2-135M (real weights, bf16), or random
weights in a config's shape (MLA's latent cache for DeepSeek configs).

    python benchmarks/kv_cache_dtype.py [--folder CONVERTED_SMOLLM2]
    python benchmarks/kv_cache_dtype.py --config DeepSeek-V2-Lite --layers 4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import add_shape_args, add_smollm2_arg, add_threads_arg, random_shape_model, set_threads, smollm2_folder


@torch.inference_mode()
def rate(model, cache_dtype, filled: int, steps: int = 24) -> float:
    cache = model.new_cache(1, filled + steps + 1, dtype=cache_dtype)
    model(torch.randint(0, 1000, (1, filled)), start_pos=0, cache=cache, last_only=True)
    t = time.perf_counter()
    for i in range(steps):
        model(torch.tensor([[5]]), start_pos=filled + i, cache=cache, last_only=True)
    return steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_smollm2_arg(ap)
    add_shape_args(ap, aliases=("--shape",), help="a config name or folder: random weights in its shape instead")
    ap.add_argument("--cached", default="64,1024,2048,4096", help="cached-token counts to time decode at")
    add_threads_arg(ap)
    a = ap.parse_args()
    set_threads(a.threads)
    if a.config:
        a.device, a.dtype = "cpu", "bfloat16"
        model, args, _, _, _ = random_shape_model(a)
        label = f"{Path(a.config).name} shape ({args.n_layers} layers, random weights)"
    else:
        from r1cli.loader import load_model

        model = load_model(smollm2_folder(a.folder), dtype="bfloat16")
        label = "SmolLM2-135M"
    print(f"{label} bf16 decode tokens/s by cached tokens (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for filled in (int(n) for n in a.cached.split(",")):
        r16, r32 = rate(model, torch.bfloat16, filled), rate(model, torch.float32, filled)
        print(f"  {filled:>5} cached: bf16 cache {r16:5.1f}  float32 cache {r32:5.1f}  ({r32 / r16:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
