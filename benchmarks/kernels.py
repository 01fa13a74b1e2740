"""One-row matrix products (batch-1 decode) on this CPU: bf16 F.linear, int8 `_weight_int8pack_mm` and int4
`_weight_int4pack_mm_for_cpu` (group 32), in microseconds and in GB/s of the weight bytes each reads.

    python benchmarks/kernels.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from r1cli.quant_formats import Int4Weight, Int8Weight  # noqa: E402

SHAPES = [(576, 576), (960, 576), (3072, 576), (576, 1536), (896, 896), (9728, 896), (896, 4864),
          (2048, 1536), (17920, 1536), (1536, 8960), (8192, 4096), (49152, 576)]


def per_call_us(fn, rows: int) -> float:
    n = 30 if rows > 8000 else 200
    for _ in range(10):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; us per product (GB/s of weight bytes)")
    print(f"{'N x K':>12} {'bf16':>18} {'int8':>18} {'int4 g32':>18}")
    for n, k in SHAPES:
        w = torch.randn(n, k, dtype=torch.bfloat16)
        x = torch.randn(1, k, dtype=torch.bfloat16)
        w8, w4 = Int8Weight.from_float(w), Int4Weight.from_float(w, 32)
        cells = []
        for fn, nbytes in ((lambda: F.linear(x, w), 2 * n * k), (lambda: w8.matmul(x), n * k),
                           (lambda: w4.matmul(x), n * k // 2)):
            us = per_call_us(fn, n)
            cells.append(f"{us:9.1f} ({nbytes / us / 1e3:4.1f})")
        print(f"{n:>6} x {k:<5} " + " ".join(f"{c:>18}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
