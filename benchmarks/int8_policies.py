"""The int8 kernel policies side by side on this CPU: each policy's quality (mean KL against the bf16 model,
SmolLM2-135M decoding the quality tests' text token by token, as tests/test_quant.py does; int8's bar 0.01, int4's
0.05) and the one-row microseconds it takes for the R1-Distill-Qwen-1.5B gate|up and down projections (best of
--rounds alternating rounds). `--emulate-avx2` runs it with torch and fbgemm restricted to AVX2 code
(benchmarks/avx2_emulation.py): fbgemm's kernel then has no VNNI and r1 rounds its activations to 7 bits
(quant_formats.dynamic_reduce_range).

    python benchmarks/int8_policies.py [--emulate-avx2] [POLICY ...]

A POLICY is `pack`, `mixed`, `dynamic` (quant_formats.use_int8_kernel), or `LAYERS:G`: fbgemm's dynamic kernel
over G column groups of the input in the layers named (comma-separated roles, e.g. gate_up_proj,down_proj),
`pack` elsewhere.
"""

from __future__ import annotations

import argparse

import avx2_emulation
import torch
from common import add_smollm2_arg, add_threads_arg, per_call_us, set_threads, smollm2_folder

from r1cli import quant_formats as qf

DEFAULT_POLICIES = ["pack", "mixed", "dynamic", "gate_up_proj:8", "gate_up_proj,down_proj:16"]
SHAPES = {"gate_up_proj": (17920, 1536), "down_proj": (1536, 8960)}  # the 1.5B's joined gate|up, and down


def kernel_for(policy: str, role: str, k: int) -> tuple[str, int]:
    """(kernel, column groups) policy gives a 2-D int8 layer of this role with k input columns."""
    if policy in ("pack", "dynamic"):
        return policy, 1
    if policy == "mixed":
        return qf.mixed_kernel_for(role, k)
    layers, groups = policy.split(":")
    return ("dynamic", int(groups)) if role in layers.split(",") else ("pack", 1)


def place(model, policy: str) -> None:
    for name, module in model.named_modules():
        qw = getattr(module, "qweight", None)
        if isinstance(qw, qf.Int8Weight) and len(qw.shape) == 2:
            kernel, groups = kernel_for(policy, name.rsplit(".", 1)[-1], qw.shape[1])
            module.qweight = qf.Int8Weight(qw.q, qw.scale, kernel, groups)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("policies", nargs="*", default=DEFAULT_POLICIES)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--emulate-avx2", action="store_true", help="torch and fbgemm restricted to AVX2 (re-executes)")
    add_smollm2_arg(ap)
    add_threads_arg(ap)
    a = ap.parse_args()
    if a.emulate_avx2:
        avx2_emulation.enter(None)
    set_threads(a.threads)
    from test_quant import TEXT, decoded_kl

    from r1cli.loader import load_model
    from r1cli.tokenizer import Tokenizer

    folder = smollm2_folder(a.folder)
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, fbgemm VNNI "
          f"{qf.cpu_has_vnni()}, 7-bit activations {qf.dynamic_reduce_range()}, {torch.get_num_threads()} threads"
          + (" (AVX2 emulated)" if avx2_emulation.active() else ""))
    tokens = torch.tensor([Tokenizer.from_folder(folder).encode(TEXT)[:520]])
    with torch.no_grad():
        ref = {"none": load_model(folder, dtype="bfloat16", cache=False)(tokens).float().log_softmax(-1)[0]}
    model = load_model(folder, dtype="bfloat16", quant="int8", cache=False)
    weights = {role: qf.quantize_int8(torch.randn(n, k) * 0.02) for role, (n, k) in SHAPES.items()}
    x = {role: torch.randn(1, k, dtype=torch.bfloat16) for role, (_, k) in SHAPES.items()}
    layers = {(p, role): qf.Int8Weight(*weights[role], *kernel_for(p, role, SHAPES[role][1]))
              for p in a.policies for role in SHAPES}
    best = {key: float("inf") for key in layers}
    for _ in range(a.rounds):
        for key, layer in layers.items():
            best[key] = min(best[key], per_call_us(lambda: layer.matmul(x[key[1]]), 20))
    print("policy | SmolLM2 mean KL vs bf16 (decoded) | 1.5B gate|up us | 1.5B down us")
    for p in a.policies:
        place(model, p)
        kl = decoded_kl(folder, model, ref)
        print(f"{p} | {kl:.4f} | {best[(p, 'gate_up_proj')]:.0f} | {best[(p, 'down_proj')]:.0f}", flush=True)


if __name__ == "__main__":
    main()
