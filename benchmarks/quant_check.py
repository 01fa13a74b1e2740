"""The packed int8/int4 kernels on this device against the float reference of the same codes: one matrix-vector
and one 16-row product per shape, and, for int4, a joined (q|k|v-style) weight. Written for the GPU, whose
tinygemm int4 layout CI cannot run; on a CPU it checks the CPU layouts the same way.

    python benchmarks/quant_check.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from r1cli.quant_formats import Int4Weight, Int8Weight, dequantize_int4, quantize_int4, quantize_int8  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    device = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    ok = True
    for n, k in ((2048, 1536), (1536, 8960), (256, 4096)):
        w = torch.randn(n, k, generator=g) * 0.02
        for rows in (1, 16):
            x = torch.randn(rows, k, generator=g).bfloat16()
            q, scale = quantize_int8(w)
            want = x.float() @ (q.float() * scale[:, None]).T
            got = Int8Weight(q.to(device), scale.to(device)).matmul(x.to(device)).float().cpu()
            ok &= report(f"int8 {n}x{k} rows {rows}", got, want)
            for group in (32, 128):
                codes, scales, zeros = quantize_int4(w, group)
                ref = dequantize_int4(codes, scales, zeros)
                want = x.float() @ ref.T
                w4 = Int4Weight.from_codes(codes, scales, zeros, group, device)
                got = w4.matmul(x.to(device)).float().cpu()
                ok &= report(f"int4 g{group} {n}x{k} rows {rows} ({w4.layout} layout)", got, want)
    # a joined weight: three parts' codes side by side, as the loader joins q|k|v
    parts = [torch.randn(r, 1536, generator=g) * 0.02 for r in (1536, 256, 256)]
    quantized = [quantize_int4(p, 32) for p in parts]
    w4s = [Int4Weight.from_codes(*qz, 32, device) for qz in quantized]
    joined = w4s[0].join(w4s)
    x = torch.randn(1, 1536, generator=g).bfloat16()
    if joined is None:
        print(f"int4 join: not joined on the {w4s[0].layout} layout (parts stay apart)")
    else:
        want = x.float() @ torch.cat([dequantize_int4(*qz) for qz in quantized]).T
        ok &= report("int4 joined 1536+256+256", joined.matmul(x.to(device)).float().cpu(), want)
    print("all match" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


def report(what: str, got: torch.Tensor, want: torch.Tensor) -> bool:
    # bf16 activations and outputs: errors of a few bf16 ulps of the output's scale are expected
    err = ((got - want).abs().max() / want.abs().max()).item()
    good = err < 2e-2
    print(f"{what}: max error {err:.2e} of the largest output {'ok' if good else 'WRONG'}", flush=True)
    return good


if __name__ == "__main__":
    main()
