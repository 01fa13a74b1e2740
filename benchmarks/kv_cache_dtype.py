"""Decode speed against the number of cached tokens, with the KV cache in bf16 and in float32 (what r1 keeps on a
CPU without bf16 math, `layers.kv_cache_dtype`), in one process: SmolLM2-135M (real weights, bf16), or random
weights in a config's shape (MLA's latent cache for DeepSeek configs).

    python benchmarks/kv_cache_dtype.py [--folder CONVERTED_SMOLLM2]
    python benchmarks/kv_cache_dtype.py --shape benchmarks/configs/DeepSeek-V2-Lite --layers 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


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
    ap.add_argument("--folder", help="SmolLM2 converted to safetensors (tests/smollm2.py); made in a temp dir if absent")
    ap.add_argument("--shape", help="a folder with a config.json: random weights in its shape instead")
    ap.add_argument("--layers", type=int, help="with --shape: keep the first N layers")
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.shape:
        from r1cli.bench import random_model
        from r1cli.config import args_from_dict, read_config_json

        cfg = read_config_json(a.shape)
        if a.layers:
            cfg["num_hidden_layers"] = a.layers
        model = random_model(args_from_dict(cfg), torch.device("cpu"), torch.bfloat16)
        label = f"{Path(a.shape).name} shape ({cfg['num_hidden_layers']} layers, random weights)"
    else:
        from r1cli.loader import load_model

        folder = Path(a.folder) if a.folder else None
        if folder is None or not (folder / "config.json").exists():
            from smollm2 import convert_smollm2

            folder = convert_smollm2(Path(a.folder or tempfile.mkdtemp()))
        model = load_model(folder, dtype="bfloat16")
        label = "SmolLM2-135M"
    print(f"{label} bf16 decode tokens/s by cached tokens (torch {torch.__version__}, 2 threads)")
    for filled in (64, 1024, 2048, 4096):
        r16, r32 = rate(model, torch.bfloat16, filled), rate(model, torch.float32, filled)
        print(f"  {filled:>5} cached: bf16 cache {r16:5.1f}  float32 cache {r32:5.1f}  ({r32 / r16:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
