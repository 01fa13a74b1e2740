"""The one-row matmuls of the compiled CPU decode step as Inductor reductions: an Inductor post-grad pass (given to
the AOT compile, compile_cache.store_package) that rewrites each `mm`/`addmm` whose input has one row, bf16, on a
CPU, into a float32 multiply-and-sum over the weight's rows. Inductor fuses that into one vectorized loop that
streams the weight once, near the memory's read speed, where ATen's bf16 matmul of one row runs at about half of it
(measured: docs/performance.md). What it computes is the matmul's sum in float32, rounded once to bf16 (ATen's
kernels also accumulate in float32): the same values up to the order of the additions.

Which CPUs get it: cpu.one_row_matmul_as_reduction.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

aten = torch.ops.aten


def _one_row_bf16(mat1: torch.fx.Node, mat2: torch.fx.Node) -> bool:
    """Static [1, K] @ [K, N] in bf16 on a CPU (the shapes of a batch-1 decode step's projections and head)."""
    a, b = (n.meta.get("val") if isinstance(n, torch.fx.Node) else None for n in (mat1, mat2))
    if a is None or b is None or a.dim() != 2 or b.dim() != 2:
        return False
    if a.device.type != "cpu" or b.device.type != "cpu" or a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return False
    return all(isinstance(s, int) for s in (*a.shape, *b.shape)) and a.shape[0] == 1


def _mm(x, w):
    return (x.float().t() * w.float()).sum(0, keepdim=True).to(x.dtype)


def _addmm(bias, x, w):
    return ((x.float().t() * w.float()).sum(0, keepdim=True) + bias.float()).to(x.dtype)


@functools.lru_cache(maxsize=1)
def _patterns():
    from torch._inductor.pattern_matcher import Arg, CallFunction, PatternMatcherPass, register_graph_pattern

    patterns = PatternMatcherPass(pass_name="r1_one_row_matmul")

    @register_graph_pattern(CallFunction(aten.mm, Arg(), Arg()), pass_dict=patterns,
                            extra_check=lambda m: _one_row_bf16(m.args[0], m.args[1]))
    def one_row_mm(match, x, w):
        match.replace_by_example(_mm, [x, w])

    @register_graph_pattern(CallFunction(aten.addmm, Arg(), Arg(), Arg()), pass_dict=patterns,
                            extra_check=lambda m: _one_row_bf16(m.args[1], m.args[2])
                            and m.args[0].meta["val"].dtype == torch.bfloat16)
    def one_row_addmm(match, bias, x, w):
        match.replace_by_example(_addmm, [bias, x, w])

    return patterns


class OneRowMatmulPass(CustomGraphPass):
    """The pass, in the form Inductor's `post_grad_custom_post_pass` option takes. `replaced`: how many matmuls
    the last call rewrote (tests)."""

    replaced = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        OneRowMatmulPass.replaced = _patterns().apply(graph)

    def uuid(self) -> str:
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
