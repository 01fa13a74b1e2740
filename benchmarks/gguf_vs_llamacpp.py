"""GGUF files side by side with llama.cpp (llama-cpp-python) on the same file: load seconds, resident weights and
decode tokens/s of r1 (dequantized to bfloat16, and with --quant int4) against llama.cpp's own, for each file
given. Runs alternate r1 and llama.cpp turn by turn in one process, best of --rounds, on --threads threads.

    python benchmarks/gguf_vs_llamacpp.py FILE.gguf [FILE.gguf ...] --tokens 64 --rounds 3

Make the files with tests/test_llamacpp.py's fixture (the real SmolLM2 weights as F16, quantized by llama.cpp).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from r1cli.generate import Decoder, SamplingParams  # noqa: E402
from r1cli.loader import load  # noqa: E402


def r1_decode(model, prompt: list[int], tokens: int) -> float:
    gen = Decoder(model, max_len=len(prompt) + tokens + 8)
    it = gen.generate(prompt, SamplingParams(temperature=0, max_tokens=tokens))
    next(it)  # prefill and first token
    t = time.perf_counter()
    n = sum(1 for _ in it)
    return n / (time.perf_counter() - t)


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
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"file | MB on disk | r1 load s | r1 bf16 tok/s | r1 int4 tok/s | llama.cpp tok/s (best of {a.rounds}, "
          f"{a.tokens} tokens, {a.threads} threads)")
    for path in a.files:
        t = time.perf_counter()
        model, tok = load(path, dtype="bfloat16")
        load_s = time.perf_counter() - t
        int4, _ = load(path, dtype="bfloat16", quant="int4")
        llm = llama_cpp.Llama(path, n_ctx=512, n_threads=a.threads, verbose=False)
        prompt = tok.encode("The capital of France is")
        best = {"bf16": 0.0, "int4": 0.0, "llama.cpp": 0.0}
        for _ in range(a.rounds):
            best["bf16"] = max(best["bf16"], r1_decode(model, prompt, a.tokens))
            best["llama.cpp"] = max(best["llama.cpp"], llama_decode(llm, prompt, a.tokens))
            best["int4"] = max(best["int4"], r1_decode(int4, prompt, a.tokens))
        print(f"{Path(path).name} | {Path(path).stat().st_size / 1e6:.0f} | {load_s:.2f} | {best['bf16']:.1f} | "
              f"{best['int4']:.1f} | {best['llama.cpp']:.1f}", flush=True)
        del model, int4, llm


if __name__ == "__main__":
    main()
