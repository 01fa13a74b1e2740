"""The routed experts' paths side by side on one random MoE model: the per-expert loop (`_sorted`), grouped GEMMs
(`_grouped`, F.grouped_mm) and, for decode, gathering the chosen experts' weights (`_gathered`).

It first checks that every path gives the loop's prompt logits, then alternates the paths: prefill tokens/s at
each prompt length, and decode tokens/s with decode taking the gathered path (the default on a GPU) or the
grouped one (`gather_limit = 0`). Built for a GPU (grouped GEMMs need CUDA bf16 on SM80+ to be the default), and
runs on a CPU in float32 to check the script itself:

    python benchmarks/moe_paths.py --config DeepSeek-V2-Lite --device cuda --dtype bfloat16
    python benchmarks/moe_paths.py --config DeepSeek-V2-Lite --layers 2 --device cpu \
        --dtype float32 --prompt-lengths 16 --new-tokens 4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import add_device_args, add_shape_args, random_shape_model, sync

from r1cli.generate import Decoder, SamplingParams
from r1cli.models.deepseek import Experts

def all_experts(model):
    return [m for m in model.modules() if isinstance(m, Experts)]

def force(model, path: str | None, gather_limit: int = 64) -> None:
    """Route every MoE layer through `path` (None: the model's own choice) and set the decode gather limit."""
    for e in all_experts(model):
        e.gather_limit = gather_limit
        if path is None:
            e.__dict__.pop("path", None)
        else:
            e.path = lambda x, indices, p=path: p  # an instance attribute shadows the method

def main() -> None:
    ap = argparse.ArgumentParser()
    add_shape_args(ap, required=True)
    add_device_args(ap, device="cuda", dtype="bfloat16")
    ap.add_argument("--prompt-lengths", default="128,1024,4096")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--decode-mode", default="graph")
    a = ap.parse_args()
    model, args, _, device, dtype = random_shape_model(a)
    lengths = [int(n) for n in a.prompt_lengths.split(",")]
    print(f"{Path(a.config).name}, {args.n_layers} layers, {device} {dtype}, torch {torch.__version__}", flush=True)

    with torch.inference_mode():
        tokens = torch.randint(0, args.vocab_size, (1, lengths[0]), device=device)
        logits = {}
        for path in ("_sorted", "_grouped", "_gathered"):
            force(model, path)
            logits[path] = model(tokens, cache=model.new_cache(1, lengths[0])).float()
        scale = logits["_sorted"].abs().max().item()
        for path in ("_grouped", "_gathered"):
            diff = (logits[path] - logits["_sorted"]).abs().max().item()
            print(f"prompt logits, {path} vs _sorted: max |diff| {diff:.3g} (logits up to {scale:.3g})", flush=True)

        prefill = {p: {} for p in ("_sorted", "_grouped")}
        for _ in range(2):  # alternate, keep the best
            for path in prefill:
                force(model, path)
                for n in lengths:
                    tokens = torch.randint(0, args.vocab_size, (1, n), device=device)
                    cache = model.new_cache(1, n)
                    model(tokens, cache=cache, last_only=True)  # warm-up
                    sync(device)
                    t = time.perf_counter()
                    model(tokens, cache=cache, last_only=True)
                    sync(device)
                    prefill[path][n] = max(prefill[path].get(n, 0.0), n / (time.perf_counter() - t))
        for n in lengths:
            s, g = prefill["_sorted"][n], prefill["_grouped"][n]
            print(f"prefill {n:>5} tokens: sorted {s:9.0f} tok/s  grouped {g:9.0f} tok/s  grouped/sorted {g / s:.2f}x")

    prompt = torch.randint(0, args.vocab_size, (lengths[0],)).tolist()
    params = SamplingParams(temperature=0, max_tokens=a.new_tokens)
    decode, tokens_of = {}, {}
    for _ in range(2):
        for name, limit in (("gathered", 64), ("grouped", 0)):
            force(model, None, gather_limit=limit)
            gen = Decoder(model, max_len=len(prompt) + a.new_tokens + 8, decode_mode=a.decode_mode)
            for _ in range(2):  # the first run captures or compiles the step
                gen.reset()
                tokens_of[name] = list(gen.generate(prompt, params))
            decode[name] = max(decode.get(name, 0.0), gen.stats.decode_tokens_per_s)
            del gen
    same = tokens_of["gathered"] == tokens_of["grouped"]
    print(f"decode ({a.decode_mode}): gathered {decode['gathered']:.1f} tok/s  grouped {decode['grouped']:.1f} tok/s  "
          f"grouped/gathered {decode['grouped'] / decode['gathered']:.2f}x  same greedy tokens: {same}")

if __name__ == "__main__":
    main()
