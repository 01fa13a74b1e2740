"""Which weight format decodes fastest on this CPU: r1 bf16, float32, int8 and int4 (g32) on SmolLM2-135M, side by
side in one process, alternating the formats round after round so that drift (other jobs on a shared machine)
hits each alike. Prints the CPU class (r1cli.cpu) beside the rates: the figures set the rule for that class.

    PYTHONPATH=src python benchmarks/cpu_formats.py [--folder CONVERTED_SMOLLM2] [--tokens 64] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", help="SmolLM2 converted to safetensors (tests/smollm2.py); made in a temp dir if absent")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="1 on a machine shared with other jobs (no spin-waits)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from quant_compare import r1_decode

    from r1cli import cpu
    from r1cli.generate import Decoder
    from r1cli.loader import load_model

    folder = Path(a.folder) if a.folder else None
    if folder is None or not (folder / "config.json").exists():
        from smollm2 import convert_smollm2

        folder = convert_smollm2(Path(a.folder or tempfile.mkdtemp()))
    formats = {"bf16": ("bfloat16", "none"), "float32": ("float32", "none"), "int8": ("bfloat16", "int8"),
               "int4 g32": ("bfloat16", "int4")}
    gens = {k: Decoder(load_model(folder, dtype=d, quant=q, group_size=32, cache=False), max_len=32 + a.tokens + 8,
                         decode_mode="eager") for k, (d, q) in formats.items()}
    rates: dict[str, list[float]] = {k: [] for k in formats}
    for r in range(a.rounds):
        for k, gen in gens.items():
            rates[k].append(r1_decode(gen, a.tokens))
            print(f"round {r + 1} {k}: {rates[k][-1]:.1f}", flush=True)
    features = cpu.features()
    print(f"SmolLM2-135M decode tokens/s, {a.tokens} new, eager, best of {a.rounds} alternating rounds, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; CPU class {features.cpu_class} "
          f"({', '.join(features.flags_seen)})")
    best = {k: max(v) for k, v in rates.items()}
    for k, v in best.items():
        print(f"  {k:<10} {v:6.1f}  ({v / best['bf16']:.2f}x bf16; all rounds: {', '.join(f'{x:.1f}' for x in rates[k])})")


if __name__ == "__main__":
    main()
