"""How far the compiled CPU decode step's logits are from the eager step's, token by token: the rounding noise
that aot_step's first-tokens check (CHECK_TOLERANCE, CHECK_TOKENS, CHECK_MEAN_TOLERANCE) must let through. Greedy
decoding of --tokens tokens after a short prompt; at each position the compiled step (an AOTInductor package
built here into a temporary file, the CPU default's options) and the eager step run on the same cache, and the
relative L2 difference of their logits and KL(eager || compiled) are printed (median, max, each position).

    python benchmarks/compiled_vs_eager.py FILE.gguf|FOLDER [--quant none,int8,int4] [--tokens 54]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import avx2_emulation
import torch
from common import add_threads_arg, set_threads

from r1cli import aot_step, compile_cache
from r1cli.loader import load


def errors(path: str, quant: str, tokens: int, prompt: str) -> tuple[list[float], list[float]]:
    model, tok = load(path, dtype="bfloat16", **({} if quant == "none" else {"quant": quant}))
    ids = tok.encode(prompt)
    max_len = len(ids) + tokens + 1
    model.ensure_rope(max_len + 8)
    with torch.inference_mode(False):  # as Decoder allocates it: one spare slot, not inference tensors
        cache = model.new_cache(1, max_len + 1)
    cache.max_len = max_len
    step = aot_step.StepModule(model, cache)
    with tempfile.TemporaryDirectory() as tmp:
        package = torch._inductor.aoti_compile_and_package(
            aot_step.export_step(step, max_len), package_path=str(Path(tmp) / "step.pt2"),
            inductor_configs=compile_cache.aot_options())
        runner, _bound = aot_step.load(package, step)
    rel, kl = [], []
    with torch.no_grad():
        model(torch.tensor([ids]), start_pos=0, cache=cache)
        token, span, slot = ids[-1], torch.empty(max_len), torch.zeros(1, dtype=torch.long)
        for pos in range(len(ids), len(ids) + tokens):
            t = torch.tensor([[token]])
            slot.fill_(pos)
            got = runner(t, slot, span).float().clone()
            want = model(t, start_pos=pos, cache=cache, last_only=True)[:, -1].float()  # eager writes the slot last
            rel.append(float((got - want).norm() / want.norm()))
            p, q = want.log_softmax(-1), got.log_softmax(-1)
            kl.append(float((p.exp() * (p - q)).sum()))
            token = int(want.argmax())
    return rel, kl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="a GGUF file or a checkpoint folder")
    ap.add_argument("--quant", default="none,int8,int4", help="weight formats, comma-separated (none: bf16)")
    ap.add_argument("--tokens", type=int, default=54)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--emulate-avx2", action="store_true", help="torch restricted to AVX2 (re-executes)")
    add_threads_arg(ap)
    a = ap.parse_args()
    if a.emulate_avx2:
        avx2_emulation.enter(None)
    set_threads(a.threads)
    print(f"{Path(a.model).name}, torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}"
          + (" (AVX2 emulated)" if avx2_emulation.active() else "") + f", {a.tokens} greedy positions")
    print("format | relative L2 median | max | KL median | max | relative L2 at each position")
    for quant in a.quant.split(","):
        rel, kl = errors(a.model, quant, a.tokens, a.prompt)
        print(f"{quant} | {statistics.median(rel):.4f} | {max(rel):.4f} | {statistics.median(kl):.5f} | "
              f"{max(kl):.5f} | " + " ".join(f"{e:.3f}" for e in rel), flush=True)


if __name__ == "__main__":
    main()
