"""Aggregate decode tokens/s with 1, 4, 8, 16 concurrent streams: r1's batched engine (batch.py) against
transformers' batched `generate` on the same weights, plus r1's batch-1 Decoder for the single-stream figure.

    python benchmarks/batch_decode.py --model /path/to/smollm2            # real weights (tests/smollm2.py OUT)
    python benchmarks/batch_decode.py --config DeepSeek-R1-Distill-Qwen-1.5B --layers 4
    python benchmarks/batch_decode.py ... --device cuda --streams 1,8,32,64   # a GPU (unmeasured so far)

Greedy, distinct random prompts of --prompt tokens, --new-tokens decoded per stream (no early stop). Only the
decode is timed (from the step after every stream has its first token). The engines alternate, round by round,
so drift on a shared machine hits both alike; the best round of each is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from common import add_device_args, add_shape_args, device_and_dtype, hf_twin, shape_config, sync

from r1cli.batch import BatchEngine
from r1cli.config import args_from_dict
from r1cli.generate import Decoder, SamplingParams


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 30000), (n, length), generator=g).tolist()


@torch.inference_mode()
def ours_batched(model, ps, new_tokens, device) -> float:
    engine = BatchEngine(model, max_batch=len(ps), max_len=len(ps[0]) + new_tokens + 8, prefill_chunk=1 << 20)
    params = SamplingParams(temperature=0, max_tokens=new_tokens + 1)
    seqs = [engine.submit(p, params) for p in ps]
    while not all(s.pending is not None for s in seqs):
        engine.step()
    sync(device)
    t = time.perf_counter()
    before = sum(len(s.tokens) for s in seqs)
    while not engine.idle:
        engine.step()
    sync(device)
    return (sum(len(s.tokens) for s in seqs) - before) / (time.perf_counter() - t)


@torch.inference_mode()
def ours_single(model, p, new_tokens, device) -> float:
    gen = Decoder(model, max_len=len(p) + new_tokens + 8, decode_mode="eager")  # eager steps, as the batched engine runs
    it = gen.generate(p, SamplingParams(temperature=0, max_tokens=new_tokens + 1))
    next(it)
    sync(device)
    t = time.perf_counter()
    n = sum(1 for _ in it)
    sync(device)
    return n / (time.perf_counter() - t)


@torch.inference_mode()
def hf_batched(hf, ps, new_tokens, device) -> float:
    ids = torch.tensor(ps, device=device)
    mask = torch.ones_like(ids)

    def run(n):
        sync(device)
        t = time.perf_counter()
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=0)
        sync(device)
        return time.perf_counter() - t

    one = run(1)
    full = run(new_tokens + 1)
    return len(ps) * new_tokens / max(full - one, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a safetensors folder (real weights)")
    add_shape_args(ap)
    ap.add_argument("--streams", default="1,4,8,16")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    add_device_args(ap)
    ap.add_argument("--no-hf", action="store_true")
    a = ap.parse_args()
    if not (a.model or a.config):
        ap.error("give --model or --config")
    cfg = shape_config(a.model or a.config, a.layers)
    args = args_from_dict(cfg)
    dev, dtype = device_and_dtype(a.device, a.dtype, args)
    hf, model = hf_twin(cfg, dtype, dev, folder=a.model)
    streams = [int(s) for s in a.streams.split(",")]
    rows = {}
    for _ in range(a.rounds):
        for n in streams:
            ps = prompts(n, a.prompt, args.vocab_size)
            r = rows.setdefault(n, {"ours": 0.0, "hf": 0.0, "single": 0.0})
            r["ours"] = max(r["ours"], ours_batched(model, ps, a.new_tokens, dev))
            if not a.no_hf:
                r["hf"] = max(r["hf"], hf_batched(hf, ps, a.new_tokens, dev))
            if n == 1:
                r["single"] = max(r["single"], ours_single(model, ps[0], a.new_tokens, dev))
            print(f"# round: {n} streams {r}", file=sys.stderr, flush=True)  # progress on a slow machine
    single = rows.get(1, {}).get("single") or None
    what = Path(a.model).name if a.model else f"{Path(a.config).name} (random weights)"
    print(f"{what}{f', {a.layers} layers' if a.layers else ''} · {dev} {str(dtype).removeprefix('torch.')} · "
          f"prompt {a.prompt}, {a.new_tokens} new tokens per stream, threads {torch.get_num_threads()}, "
          f"best of {a.rounds} interleaved rounds")
    print("| streams | r1 batched tok/s | per stream | vs r1 batch-1 Decoder | transformers generate tok/s | r1/hf |")
    print("|---|---|---|---|---|---|")
    for n, r in rows.items():
        ratio = f"{r['ours'] / single:.2f}x" if single else "-"
        hf_ratio = f"{r['ours'] / r['hf']:.2f}x" if r["hf"] else "-"
        print(f"| {n} | {r['ours']:.1f} | {r['ours'] / n:.1f} | {ratio} | {r['hf']:.1f} | {hf_ratio} |")
    if single:
        print(f"r1 batch-1 Decoder, single stream: {single:.1f} tok/s")
    if os.environ.get("BATCH_BENCH_JSON"):
        Path(os.environ["BATCH_BENCH_JSON"]).write_text(json.dumps({"rows": rows, "single": single}, indent=2))


if __name__ == "__main__":
    main()
