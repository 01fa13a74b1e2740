"""`--decode-mode compile` across cache buckets: the seconds each turn takes (its first turn in a bucket includes
any compiling) and the decode rate, for prompts that land in the 256-, 512- and 1024-slot buckets. With --ab, the
decode rates of a static compile (dynamic=False: one compile per bucket) and of the dynamic one r1 uses, both
compiled in one process and alternated turn by turn.

    rm -rf /tmp/torchinductor_$USER   # a cold compile, as on a first run
    python benchmarks/compile_buckets.py --folder SMOLLM2_DIR
    python benchmarks/compile_buckets.py --folder SMOLLM2_DIR --ab
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_smollm2_arg, add_threads_arg, set_threads, smollm2_folder

from r1cli.generate import Decoder, SamplingParams, StaticDecoder
from r1cli.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    add_smollm2_arg(ap)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ab", action="store_true", help="static vs dynamic compile, alternating, best of 3 turns")
    add_threads_arg(ap)
    a = ap.parse_args()
    set_threads(a.threads)
    model = load_model(smollm2_folder(a.folder), dtype=torch.bfloat16)
    if a.ab:
        return ab(model, a.tokens)
    gen = Decoder(model, max_len=2048, decode_mode="compile")
    print(f"torch {torch.__version__}; prompt tokens, bucket, turn seconds (includes compiling), decode tok/s")
    for prompt_len, bucket in ((32, 256), (300, 512), (700, 1024)):
        for turn in range(2):
            gen.reset()
            t = time.perf_counter()
            for _ in gen.generate(list(range(100, 100 + prompt_len)), SamplingParams(temperature=0, max_tokens=a.tokens)):
                pass
            print(f"{prompt_len:>5} {bucket:>5}  turn {turn}: {time.perf_counter() - t:6.1f} s  "
                  f"{gen.stats.decode_tokens_per_s:5.1f} tok/s", flush=True)


def ab(model, tokens: int) -> None:
    gens = {}
    for name, dynamic in (("static", False), ("dynamic", True)):
        gen = Decoder(model, max_len=2048, decode_mode="compile")
        gen._ensure_cache()
        gen._step = StaticDecoder(model, gen.cache, "static")
        gen._step.forward = torch.compile(model, dynamic=dynamic)
        gens[name] = gen
    print(f"torch {torch.__version__}; decode tok/s, best of 3 alternating turns after a warm-up (each turn's rate)")
    for prompt_len in (32, 300, 700):
        rates = {name: [] for name in gens}
        for turn in range(4):
            for name, gen in gens.items():
                gen.reset()
                for _ in gen.generate(list(range(100, 100 + prompt_len)), SamplingParams(temperature=0, max_tokens=tokens)):
                    pass
                if turn:
                    rates[name].append(gen.stats.decode_tokens_per_s)
        print(f"prompt {prompt_len:>4}: " + "  ".join(
            f"{name} {max(r):.1f} ({' '.join(f'{v:.1f}' for v in r)})" for name, r in rates.items()), flush=True)


if __name__ == "__main__":
    main()
