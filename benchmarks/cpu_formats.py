"""Which weight format decodes fastest on this CPU: r1 bf16, float32, int8 and int4 (g32) on SmolLM2-135M, side by
side in one process, alternating the formats round after round so that drift (other jobs on a shared machine)
hits each alike. Prints the CPU class (r1cli.cpu) beside the rates: the figures set the rule for that class.

    python benchmarks/cpu_formats.py [--folder CONVERTED_SMOLLM2] [--tokens 64] [--rounds 3] [--threads 2]
                                     [--decode-mode compile|eager]

Each format is opened as the command line opens it (`--quant int4`: with its int8 head) and decoded with the CPU
default's step (compile: the compiled step, its build waited for before timing) unless --decode-mode says eager.
"""

from __future__ import annotations

import argparse

import torch
from common import add_smollm2_arg, add_threads_arg, decode_rate, set_threads, smollm2_folder


def main() -> None:
    ap = argparse.ArgumentParser()
    add_smollm2_arg(ap)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    add_threads_arg(ap)
    ap.add_argument("--decode-mode", default="compile", help="compile (the CPU default's compiled step) or eager")
    a = ap.parse_args()
    set_threads(a.threads)
    from r1cli import cpu
    from r1cli.generate import Decoder
    from r1cli.loader import load_model
    from r1cli.options import head_int8

    folder = smollm2_folder(a.folder)
    formats = {"bf16": ("bfloat16", "none"), "float32": ("float32", "none"), "int8": ("bfloat16", "int8"),
               "int4 g32": ("bfloat16", "int4")}
    gens = {k: Decoder(load_model(folder, dtype=d, quant=q, group_size=32, cache=False, quant_head=head_int8(q, None)),
                       max_len=32 + a.tokens + 8, decode_mode=a.decode_mode) for k, (d, q) in formats.items()}
    for gen in gens.values():  # the compiled step built or loaded, untimed
        decode_rate(gen, 4, turns=1)
    rates: dict[str, list[float]] = {k: [] for k in formats}
    for r in range(a.rounds):
        for k, gen in gens.items():
            rates[k].append(decode_rate(gen, a.tokens))
            print(f"round {r + 1} {k}: {rates[k][-1]:.1f}", flush=True)
    features = cpu.features()
    print(f"SmolLM2-135M decode tokens/s, {a.tokens} new, {a.decode_mode}, best of {a.rounds} alternating rounds, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; CPU class {features.cpu_class} "
          f"({', '.join(features.flags_seen)})")
    best = {k: max(v) for k, v in rates.items()}
    for k, v in best.items():
        print(f"  {k:<10} {v:6.1f}  ({v / best['bf16']:.2f}x bf16; all rounds: {', '.join(f'{x:.1f}' for x in rates[k])})")


if __name__ == "__main__":
    main()
