"""One-row products (batch-1 decode) at the real shapes, each weight format and int8 kernel side by side in one
process, alternating rounds (the CPU may be shared: every cell keeps its best round): bf16 `F.linear`, int8
`_weight_int8pack_mm` ("pack"), int8 fbgemm dynamic ("dynamic": 8-bit activations, integer dot products), int8
as the "mixed" policy places that layer (quant_formats.mixed_kernel_for: pack, dynamic, or dynamic over column
groups), int4 g32
`_weight_int4pack_mm_for_cpu`. Each is called as a layer calls it (Int8Weight/Int4Weight.matmul on a bf16 row,
conversions included). us per call and GB/s of the weight bytes that format reads.

    python benchmarks/cpu_kernels.py [--rounds 5] [--threads 2]
    python benchmarks/cpu_kernels.py --shapes grid     # the N x K grid of the earlier kernels.py (8192 x 4096 ...)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import add_threads_arg, per_call_us, set_threads

from r1cli.quant_formats import Int4Weight, Int8Weight, cpu_has_vnni, mixed_kernel_for, quantize_int8

# (name, N, K): R1-Distill-Qwen-1.5B (hidden 1536, intermediate 8960, q|k|v joined 2048, gate|up joined 17920,
# vocabulary 151936) and SmolLM2-135M (576 wide, intermediate 1536, q|k|v 960, vocabulary 49152)
SHAPES = [
    ("1.5B q|k|v", 2048, 1536), ("1.5B gate or up", 8960, 1536), ("1.5B gate|up", 17920, 1536),
    ("1.5B down", 1536, 8960), ("1.5B head", 151936, 1536),
    ("SmolLM2 q|k|v", 960, 576), ("SmolLM2 gate|up", 3072, 576), ("SmolLM2 down", 576, 1536),
    ("SmolLM2 head", 49152, 576),
]
# the layer each named shape is, for the "mixed" int8 policy (grid shapes have none: packed)
ROLES = {"q|k|v": "qkv_proj", "up": "gate_up_proj", "gate|up": "gate_up_proj", "down": "down_proj", "head": "lm_head"}
# SmolLM2, Qwen2.5-0.5B and 1.5B matrices and an 8192 x 4096 one (a 7B-class projection), by size alone
GRID = [(f"{n} x {k}", n, k) for n, k in ((576, 576), (960, 576), (3072, 576), (576, 1536), (896, 896), (9728, 896),
                                          (896, 4864), (2048, 1536), (17920, 1536), (1536, 8960), (8192, 4096),
                                          (49152, 576))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", choices=("named", "grid"), default="named",
                    help="named: the 1.5B and SmolLM2 layers; grid: matrices by size")
    add_threads_arg(ap)
    a = ap.parse_args()
    set_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, VNNI {cpu_has_vnni()}; best of {a.rounds} alternating rounds")
    kinds = ("bf16", "int8 pack", "int8 dynamic", "int8 mixed", "int4 g32")
    print(f"{'shape':<18} {'N x K':>14} " + " ".join(f"{k:>20}" for k in kinds) + "   dynamic/pack")
    g = torch.Generator().manual_seed(0)
    for name, n, k in SHAPES if a.shapes == "named" else GRID:
        w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
        x = torch.randn(1, k, generator=g).bfloat16()
        q, s = quantize_int8(w)
        w8p, w8d, w4 = Int8Weight(q, s, "pack"), Int8Weight(q, s, "dynamic"), Int4Weight.from_float(w, 32)
        w8m = Int8Weight(q, s, *mixed_kernel_for(ROLES.get(name.split()[-1], name), k))
        calls = {"bf16": (lambda: F.linear(x, w), 2 * n * k), "int8 pack": (lambda: w8p.matmul(x), n * k),
                 "int8 dynamic": (lambda: w8d.matmul(x), n * k), "int8 mixed": (lambda: w8m.matmul(x), n * k),
                 "int4 g32": (lambda: w4.matmul(x), n * k // 2)}
        reps = max(5, min(200, int(2e8 // (n * k))))
        best = {kind: float("inf") for kind in kinds}
        for _ in range(a.rounds):
            for kind in kinds:
                best[kind] = min(best[kind], per_call_us(calls[kind][0], reps))
        cells = [f"{best[kd]:9.1f} ({calls[kd][1] / best[kd] / 1e3:5.1f})" for kd in kinds]
        print(f"{name:<18} {f'{n} x {k}':>14} " + " ".join(f"{c:>20}" for c in cells)
              + f"   {best['int8 pack'] / best['int8 dynamic']:.2f}x  mixed/pack "
              f"{best['int8 pack'] / best['int8 mixed']:.2f}x ({w8m.kernel}, {w8m.groups} group(s))", flush=True)
        del w8p, w8d, w8m, w4, w, q


if __name__ == "__main__":
    main()
