"""Where a decode step's time goes: torch.profiler over a few decode steps of a random model, the ops ranked by
device time (self CPU time on a CPU), with their input shapes. `--step static` (the default) is the fixed-shape
step a GPU captures as a graph, so on a GPU this says what the graph replays; `--step eager` is a CPU's default.

    python benchmarks/step_profile.py --config DeepSeek-R1-Distill-Qwen-1.5B --device cuda
    python benchmarks/step_profile.py --config DeepSeek-R1-Distill-Qwen-1.5B --device cpu \
        --step eager --quant int8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import add_device_args, add_shape_args, add_threads_arg, random_shape_model, set_threads, sync
from torch.profiler import ProfilerActivity, profile

from r1cli.generate import StaticDecoder
from r1cli.quant import quantize_model

def main() -> None:
    ap = argparse.ArgumentParser()
    add_shape_args(ap, required=True)
    add_device_args(ap, device="cuda", dtype="bfloat16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--context", type=int, default=128, help="cached tokens before the profiled steps")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--step", choices=("static", "eager"), default="static")
    ap.add_argument("--quant", choices=("none", "int8", "int4"), default="none")
    add_threads_arg(ap)
    a = ap.parse_args()
    set_threads(a.threads)
    model, args, _, device, dtype = random_shape_model(a)
    if a.quant != "none":
        quantize_model(model, a.quant, 32)
    max_len = a.context + a.steps + 8
    model.ensure_rope(max_len)
    cache = model.new_cache(1, max_len)
    if a.step == "static":
        step = StaticDecoder(model, cache, "static")
    else:
        def step(token, pos):
            return model(token, start_pos=pos, cache=cache, last_only=True)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        model(torch.randint(0, args.vocab_size, (1, a.context), device=device), cache=cache, last_only=True)
        for i in range(3):  # warm-up
            step(token, a.context + i)
        sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=True) as prof:
            for i in range(a.steps):
                step(token, a.context + i)
            sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{Path(a.config).name}, {args.n_layers} layers, {device} {dtype}, quant {a.quant}: {a.steps} {a.step} "
          f"decode steps at {a.context} cached tokens; totals over all steps")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=a.rows, max_name_column_width=40))

if __name__ == "__main__":
    main()
