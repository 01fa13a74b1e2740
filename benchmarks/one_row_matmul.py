"""The two choices behind the compiled CPU decode step's bf16 speed, at a model's real shapes, each pair alternated
in one process (the CPU may be shared: every cell keeps its best round):

- one-row bf16 matmuls: ATen's `F.linear` against the same calls compiled with gemv_pass.py's rewrite (Inductor
  reductions, an OpenMP team of --threads), over every layer's matrices in turn (q|k|v, o, gate|up, down: the
  weights stream from memory as in a decode step, not from cache) and over the head; ms per pass and GB/s read.
- one-query grouped attention: SDPA's enable_gqa against the query heads as rows of their key/value head
  (attention.masked_gqa, what sdpa takes on a CPU), bf16, at a few cache lengths; us per call.

    python benchmarks/one_row_matmul.py --config DeepSeek-R1-Distill-Qwen-1.5B --layers 8
    python benchmarks/one_row_matmul.py --config /tmp/r1-bench-smollm2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import add_shape_args, add_threads_arg, set_threads, shape_config

from r1cli.config import args_from_dict
from r1cli.gemv_pass import OneRowMatmulPass
from r1cli.models.attention import masked_gqa


def best_ms(fns: dict, rounds: int, calls: int) -> dict:
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    add_shape_args(ap, required=True)
    add_threads_arg(ap)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    set_threads(a.threads)
    args = args_from_dict(shape_config(a.config, a.layers))
    g = torch.Generator().manual_seed(0)
    dim, hd, nq, nkv = args.dim, args.head_dim, args.n_heads, args.n_kv_heads
    shapes = [((nq + 2 * nkv) * hd, dim), (dim, nq * hd), (2 * args.inter_dim, dim), (dim, args.inter_dim)]
    weights = [(torch.randn(n, k, generator=g) * 0.02).bfloat16() for _ in range(args.n_layers) for n, k in shapes]
    head = (torch.randn(args.vocab_size, dim, generator=g) * 0.02).bfloat16()
    inputs = {k: torch.randn(1, k, generator=g).bfloat16() for k in {k for _, k in shapes}}

    def layers(ws):
        return [F.linear(inputs[w.shape[1]], w) for w in ws]

    def one(x, w):
        return F.linear(x, w)

    options = {"post_grad_custom_post_pass": OneRowMatmulPass(), "cpp.threads": torch.get_num_threads()}
    layers_red = torch.compile(layers, dynamic=False, fullgraph=True, options=options)
    one_red = torch.compile(one, dynamic=False, fullgraph=True, options=options)
    x = inputs[dim]
    with torch.inference_mode():
        err = max(float((p.float() - q.float()).abs().max()) for p, q in zip(layers(weights), layers_red(weights)))
        print(f"{a.config}: {args.n_layers} layers, {torch.get_num_threads()} threads; largest difference "
              f"{err:.3g} (bf16 rounding)")
        per_layers = sum(w.numel() * 2 for w in weights)
        t = best_ms({"aten": lambda: layers(weights), "reduction": lambda: layers_red(weights)}, a.rounds, 3)
        print(f"  {len(weights)} layer matmuls ({per_layers / 1e9:.3f} GB): ATen {t['aten']:.2f} ms "
              f"({per_layers / t['aten'] / 1e6:.1f} GB/s), reductions {t['reduction']:.2f} ms "
              f"({per_layers / t['reduction'] / 1e6:.1f} GB/s)")
        t = best_ms({"aten": lambda: one(x, head), "reduction": lambda: one_red(x, head)}, a.rounds, 5)
        print(f"  head {tuple(head.shape)}: ATen {t['aten']:.2f} ms, reductions {t['reduction']:.2f} ms "
              f"({head.numel() * 2 / t['reduction'] / 1e6:.1f} GB/s)")
        for span in (256, 2048):
            q = torch.randn(1, nq, 1, hd, generator=g).bfloat16()
            k, v = (torch.randn(1, nkv, span, hd, generator=g).bfloat16() for _ in range(2))
            t = best_ms({"gqa": lambda: F.scaled_dot_product_attention(q, k, v, scale=hd ** -0.5, enable_gqa=True),
                         "rows": lambda: masked_gqa(q, k, v, None, hd ** -0.5)}, a.rounds, 20)
            print(f"  attention, {nq} heads over {nkv}, {hd} wide, {span} slots: enable_gqa {t['gqa'] * 1e3:.0f} us, "
                  f"heads as rows {t['rows'] * 1e3:.0f} us")


if __name__ == "__main__":
    main()
