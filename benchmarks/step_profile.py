"""Where a decode step's time goes: torch.profiler over a few static (uncaptured) decode steps of a random model,
the kernels ranked by device time (self CPU time on a CPU). On a GPU this says what the graph replays.

    python benchmarks/step_profile.py --config benchmarks/configs/DeepSeek-R1-Distill-Qwen-1.5B --device cuda
    python benchmarks/step_profile.py --config benchmarks/configs/DeepSeek-R1-Distill-Qwen-1.5B --layers 2 --device cpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from r1cli.bench import _sync, random_model  # noqa: E402
from r1cli.config import args_from_dict, read_config_json  # noqa: E402
from r1cli.generate import StaticDecoder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--context", type=int, default=128, help="cached tokens before the profiled steps")
    ap.add_argument("--rows", type=int, default=25)
    a = ap.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    cfg = read_config_json(a.config)
    if a.layers:
        cfg = dict(cfg, num_hidden_layers=a.layers)
    args = args_from_dict(cfg)
    model = random_model(args, device, dtype)
    max_len = a.context + a.steps + 8
    model.ensure_rope(max_len)
    cache = model.new_cache(1, max_len)
    step = StaticDecoder(model, cache, "static")
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        model(torch.randint(0, args.vocab_size, (1, a.context), device=device), cache=cache, last_only=True)
        for i in range(3):  # warm-up
            step(token, a.context + i)
        _sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for i in range(a.steps):
                step(token, a.context + i)
            _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{Path(a.config).name}, {args.n_layers} layers, {device} {dtype}, {a.steps} static decode steps at "
          f"{a.context} cached tokens; totals over all steps")
    print(prof.key_averages().table(sort_by=key, row_limit=a.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
