"""On a GPU: the packed int8 and int4 kernels (tinygemm's int4 layout, which no CPU runs) against the float
reference of the same codes: a matrix-vector and a 16-row product per shape, group sizes 32 and 128, and an int4
weight joined from q|k|v-style parts as the loader joins them. Skipped without CUDA; run by
`python benchmarks/run.py gpu-checks`."""

from __future__ import annotations

import pytest
import torch

from r1cli.quant_formats import Int4Weight, Int8Weight, dequantize_int4, quantize_int4, quantize_int8

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")
SHAPES = [(2048, 1536), (1536, 8960), (256, 4096)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    # bf16 activations and outputs: a few bf16 ulps of the output's scale are expected
    return ((got.float().cpu() - want).abs().max() / want.abs().max()).item()


def weight_and_rows(n, k, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02, torch.randn(rows, k, generator=g).bfloat16()


@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_int8_kernel_matches_the_float_reference(n, k, rows):
    w, x = weight_and_rows(n, k, rows)
    q, scale = quantize_int8(w)
    want = x.float() @ (q.float() * scale[:, None]).T
    got = Int8Weight(q.to(CUDA), scale.to(CUDA)).matmul(x.to(CUDA))
    assert relative_error(got, want) < 2e-2


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_int4_kernel_matches_the_float_reference(n, k, rows, group):
    w, x = weight_and_rows(n, k, rows)
    codes, scales, zeros = quantize_int4(w, group)
    want = x.float() @ dequantize_int4(codes, scales, zeros).T
    w4 = Int4Weight.from_codes(codes, scales, zeros, group, CUDA)
    assert relative_error(w4.matmul(x.to(CUDA)), want) < 2e-2, w4.layout


def test_joined_int4_weight_matches_its_parts():
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(r, 1536, generator=g) * 0.02 for r in (1536, 256, 256)]
    quantized = [quantize_int4(p, 32) for p in parts]
    w4s = [Int4Weight.from_codes(*qz, 32, CUDA) for qz in quantized]
    joined = w4s[0].join(w4s)
    if joined is None:
        pytest.skip(f"the {w4s[0].layout} layout keeps parts apart (nothing joined to check)")
    x = torch.randn(1, 1536, generator=g).bfloat16()
    want = x.float() @ torch.cat([dequantize_int4(*qz) for qz in quantized]).T
    assert relative_error(joined.matmul(x.to(CUDA)), want) < 2e-2
