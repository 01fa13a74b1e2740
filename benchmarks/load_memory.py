"""Resident memory of loading a model in a real shape, streamed from safetensors files on disk: random bf16 weights
written in the checkpoint's layout (sharded, with an index, as the Hub stores them), then loaded in a fresh process
(optionally quantized as it loads) while its peak resident set is recorded. Issue #7's bar: R1-Distill-Qwen-7B at
int4 within 6.5 GB of weights.

    python benchmarks/load_memory.py --config DeepSeek-R1-Distill-Qwen-7B --quant int4 --dir /tmp/q7b
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from common import config_dir
from memprobe import measure_load
from safetensors.torch import save_file

from r1cli.config import args_from_dict, read_config_json
from r1cli.models import build_model


def write_random_checkpoint(config_dir: Path, out: Path, shard_bytes: int = 4 << 30) -> int:
    """The checkpoint's tensors (names and shapes from our model built on the meta device, which uses the Hub's
    names), normal(0, 0.02) in bf16, in shards of about `shard_bytes`. Returns the bytes written."""
    cfg = read_config_json(config_dir)
    args = args_from_dict(cfg)
    with torch.device("meta"):
        model = build_model(args)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(config_dir) / "config.json", out / "config.json")
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, total, n = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and args.tie_embeddings:
            continue
        t = torch.ones(p.shape, dtype=torch.bfloat16) if "norm" in name else (
            torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02).bfloat16()
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="a config name or folder")
    ap.add_argument("--dir", required=True, help="where to write the random checkpoint (kept for reruns)")
    ap.add_argument("--quant", default="none")
    ap.add_argument("--group-size", type=int, default=32)
    a = ap.parse_args()
    out = Path(a.dir)
    if not (out / "model.safetensors.index.json").exists():
        t = time.perf_counter()
        written = write_random_checkpoint(config_dir(a.config), out)
        print(f"wrote {written / 1e9:.2f} GB of bf16 weights in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    m = measure_load("load_model(sys.argv[1], dtype='bfloat16', quant=sys.argv[2], group_size=int(sys.argv[3]), "
                     "cache=False)", out, a.quant, a.group_size, setup="from r1cli.loader import load_model")
    print(f"{Path(a.config).name}, quant {a.quant} (group {a.group_size}): loaded in {time.perf_counter() - t:.0f} s; "
          f"weights {m['weights'] / 1e9:.2f} GB; peak resident set grew by {m['grew'] / 1e9:.2f} GB "
          f"({m['grew'] / m['weights']:.2f}x the weights), torch {torch.__version__}")


if __name__ == "__main__":
    main()
