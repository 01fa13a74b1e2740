"""GGUF files side by side with llama.cpp (llama-cpp-python) on the same file: load seconds, resident weights and
decode tokens/s of r1 (dequantized to bfloat16, and with --quant int4) against llama.cpp's own, for each file
given. Runs alternate r1 and llama.cpp turn by turn in one process, best of --rounds, on --threads threads.

    python benchmarks/gguf_vs_llamacpp.py FILE.gguf [FILE.gguf ...] --tokens 64 --rounds 3

Make the files with tests/test_llamacpp.py's fixture (the real SmolLM2 weights as F16, quantized by llama.cpp).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import add_threads_arg, decode_rate, set_threads

from r1cli.generate import Decoder
from r1cli.loader import load


def llama_decode(llm, prompt: list[int], tokens: int) -> float:
    llm.reset()
    llm.eval(prompt)
    t = time.perf_counter()
    for _ in range(tokens - 1):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    return (tokens - 1) / (time.perf_counter() - t)


def main() -> None:
    import llama_cpp

    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    add_threads_arg(ap)
    a = ap.parse_args()
    set_threads(a.threads)
    print(f"file | MB on disk | r1 load s | r1 bf16 tok/s | r1 int4 tok/s | llama.cpp tok/s (best of {a.rounds}, "
          f"{a.tokens} tokens, {a.threads} threads)")
    for path in a.files:
        t = time.perf_counter()
        model, tok = load(path, dtype="bfloat16")
        load_s = time.perf_counter() - t
        int4, _ = load(path, dtype="bfloat16", quant="int4")  # as `--quant int4` opens it: with an int8 head
        llm = llama_cpp.Llama(path, n_ctx=512, n_threads=a.threads, verbose=False)
        prompt = tok.encode("The capital of France is")
        gens = {k: Decoder(m, max_len=len(prompt) + a.tokens + 8) for k, m in (("bf16", model), ("int4", int4))}
        best = {"bf16": 0.0, "int4": 0.0, "llama.cpp": 0.0}
        for _ in range(a.rounds):
            best["bf16"] = max(best["bf16"], decode_rate(gens["bf16"], a.tokens, prompt, turns=1))
            best["llama.cpp"] = max(best["llama.cpp"], llama_decode(llm, prompt, a.tokens))
            best["int4"] = max(best["int4"], decode_rate(gens["int4"], a.tokens, prompt, turns=1))
        print(f"{Path(path).name} | {Path(path).stat().st_size / 1e6:.0f} | {load_s:.2f} | {best['bf16']:.1f} | "
              f"{best['int4']:.1f} | {best['llama.cpp']:.1f}", flush=True)
        del model, int4, llm, gens


if __name__ == "__main__":
    main()
