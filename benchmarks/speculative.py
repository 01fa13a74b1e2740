"""Speculative decoding speed, side by side in one process (runs interleaved, so a shared CPU's drift hits both).

  python benchmarks/speculative.py smollm2          # real weights: SmolLM2-135M bf16 target, its int4 copy as draft
  python benchmarks/speculative.py shapes --target DeepSeek-R1-Distill-Qwen-7B --draft DeepSeek-R1-Distill-Qwen-1.5B \
      --layers 2,6 --draft-layers 4,12               # per-step costs at the real shapes (random weights)
  python benchmarks/speculative.py shapes ... --device cuda   # the same on a GPU (full depth: --layers 0)
                                                             # through CUDA graphs (--decode-mode, default graph there)

`smollm2` decodes a real prompt greedily with plain decoding and with the draft, and reports tokens/s, the
acceptance rate and tokens per target step. `shapes` times one decode step, one verify forward of k+1 tokens
(k = 1..8) and one draft step at a cache position of --position tokens; with --layers A,B it builds the first A
and B layers and extrapolates linearly to the real depth (cost = fixed + per layer x layers), which keeps a 7B
target within a small machine's memory. --decode-mode: 'eager' (the CPU's default: int positions, as a CPU's
speculative decoding runs) or the fixed-shape step r1 takes on a GPU (`generate.StaticDecoder`: 'static', 'graph',
the CUDA default, one graph per (tokens, bucket), captured before timing, or 'compile'). From those costs it prints the speedup at each acceptance rate a:
max over k of E(a, k) x decode / (k x draft + verify(k)), E = (1 - a^(k+1)) / (1 - a) tokens per step."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from common import add_device_args, add_smollm2_arg, config_dir, smollm2_folder, sync


def timed(fn, device, repeats=5) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)  # a shared CPU only ever slows a run down


def decode_mode(opts) -> str:
    return opts.decode_mode if opts.decode_mode != "auto" else ("graph" if opts.device == "cuda" else "eager")


@torch.inference_mode()
def step_costs(model, device, position: int, max_k: int, repeats: int, mode: str = "eager") -> dict:
    """Seconds for a 1-token decode and for verify forwards of k+1 tokens, at `position` cached tokens."""
    vocab = model.args.vocab_size
    cache = model.new_cache(1, position + max_k + 2)
    model.ensure_rope(position + max_k + 2)
    model(torch.randint(0, vocab, (1, position), device=device), cache=cache, last_only=True)
    return step_costs_on(model, cache, device, position, max_k, repeats, mode)


def step_runner(model, cache, device, mode: str, forward=None):
    """run(T, *inputs): one step of T tokens at a fixed position, eager or through StaticDecoder (whose graphs
    the first call of each T captures: call each T once before timing)."""
    vocab = model.args.vocab_size
    if mode == "eager":
        fn = forward or (lambda tokens, start_pos, cache: model(tokens, start_pos=start_pos, cache=cache,
                                                                 last_only=tokens.shape[1] == 1))
        return lambda T, pos, *inputs: fn(torch.randint(0, vocab, (1, T), device=device), *inputs, start_pos=pos,
                                          cache=cache)
    from r1cli.generate import StaticDecoder

    step = StaticDecoder(model, cache, mode, forward=forward)
    return lambda T, pos, *inputs: step(torch.randint(0, vocab, (1, T), device=device), pos, *inputs)


def step_costs_on(model, cache, device, position, max_k, repeats, mode: str = "eager") -> dict:
    """The same on a cache already filled to `position`."""
    run = step_runner(model, cache, device, mode)
    for T in range(1, max_k + 2):  # warm up: capture (graph) or compile each shape before it is timed
        run(T, position)
    out = {"decode": timed(lambda: run(1, position), device, repeats)}
    for k in range(1, max_k + 1):
        out[f"verify{k}"] = timed(lambda: run(k + 1, position), device, repeats)
    return out


def speedups(costs_target: dict, draft_step: float, max_k: int) -> dict:
    out = {}
    for a in (0.5, 0.6, 0.7, 0.8, 0.9):
        best = max(((1 - a ** (k + 1)) / (1 - a) * costs_target["decode"]
                    / (k * draft_step + costs_target[f"verify{k}"]), k) for k in range(1, max_k + 1))
        out[a] = {"speedup": round(best[0], 3), "k": best[1]}
    return out


def shapes(opts):
    from r1cli.bench import random_model
    from r1cli.config import load_config

    device = torch.device(opts.device)
    dtype = getattr(torch, opts.dtype)
    target_args = load_config(config_dir(opts.target))
    draft_args = load_config(config_dir(opts.draft))
    results = {}
    models, per_depth = {}, {}
    for name, args, spec in (("target", target_args, opts.layers), ("draft", draft_args, opts.draft_layers)):
        use = [int(x) for x in spec.split(",")]
        use = [args.n_layers] if use == [0] else use
        model = random_model(dataclasses.replace(args, n_layers=max(use)), device, dtype)
        models[name] = (model, model.model.layers, use, args)
        per_depth[name] = {}
    for _round in range(opts.rounds):  # both models and every depth, interleaved
        for name, (model, layers, use, args) in models.items():
            for d in use:
                model.model.layers = layers[:d]
                c = step_costs(model, device, opts.position, opts.max_k, opts.repeats, decode_mode(opts))
                for key, v in c.items():
                    per_depth[name].setdefault(d, {}).setdefault(key, []).append(v)
    for name, (model, layers, use, args) in models.items():
        med = {d: {k: min(v) for k, v in c.items()} for d, c in per_depth[name].items()}
        if len(use) == 1:
            full = med[use[0]]
        else:  # cost = fixed + per_layer * layers, through the two depths
            a, b = use[0], use[-1]
            full = {k: med[a][k] + (med[b][k] - med[a][k]) / (b - a) * (args.n_layers - a) for k in med[a]}
        results[name] = {"measured": med, "at_full_depth": full, "layers": args.n_layers}
    t, d = results["target"]["at_full_depth"], results["draft"]["at_full_depth"]
    results["speedup_by_acceptance"] = speedups(t, d["decode"], opts.max_k)
    results["device"] = str(device)
    results["decode_mode"] = decode_mode(opts)
    results["threads"] = torch.get_num_threads()
    print(json.dumps(results, indent=1))


@torch.inference_mode()
def mtp_shape(opts):
    """DeepSeek-R1's shapes, --layers layers (the first 3 dense, as in R1) and the MTP layer, random weights:
    decode, verify(k) and one MTP draft step (its block, eh_proj and the head), and the speedup they imply for
    the model as built (at 61 layers a draft step is a far smaller share of a model step than here)."""
    from r1cli.bench import random_model
    from r1cli.config import load_config

    device, dtype = torch.device(opts.device), getattr(torch, opts.dtype)
    full = load_config(config_dir("DeepSeek-R1"))
    changes = {"n_layers": opts.layers}
    if opts.experts:
        changes["n_routed_experts"] = opts.experts
        changes["n_group"] = min(full.n_group, opts.experts // full.n_activated_experts) or 1
        changes["topk_group"] = min(full.topk_group, changes["n_group"])
    args = dataclasses.replace(full, **changes)
    model = random_model(args, device, dtype, mtp=True)
    position = opts.position
    cache = model.new_cache(1, position + opts.max_k + 2)
    mcache = model.new_mtp_cache(position + opts.max_k + 2)
    model.ensure_rope(position + opts.max_k + 2)
    vocab = args.vocab_size
    model(torch.randint(0, vocab, (1, position), device=device), cache=cache, last_only=True)
    hidden = torch.randn(1, 1, args.dim, device=device, dtype=dtype)
    mode = decode_mode(opts)
    runs = {}
    for _round in range(opts.rounds):
        c = step_costs_on(model, cache, device, position, opts.max_k, opts.repeats, mode)
        mtp = step_runner(model, mcache, device, mode, forward=model.mtp_forward)
        mtp(1, position, hidden)  # warm up (capture)
        c["mtp_step"] = timed(lambda: mtp(1, position, hidden), device, opts.repeats)
        for k, v in c.items():
            runs.setdefault(k, []).append(v)
    measured = {k: min(v) for k, v in runs.items()}
    print(json.dumps({"layers_built": opts.layers, "experts": args.n_routed_experts, "measured": measured,
                      "speedup_by_acceptance": speedups(measured, measured["mtp_step"], opts.max_k),
                      "device": str(device), "decode_mode": mode, "threads": torch.get_num_threads()}, indent=1))


def smollm2(opts):
    from r1cli.chat_format import build_prompt, family_for
    from r1cli.generate import Decoder, SamplingParams
    from r1cli.loader import Checkpoint
    from r1cli.speculative import ModelDraft, SpeculativeDecoder

    checkpoint = Checkpoint(smollm2_folder(opts.folder))
    tokenizer = checkpoint.tokenizer()
    target = checkpoint.load_model(dtype=opts.dtype)
    draft = checkpoint.load_model(dtype=opts.dtype, quant=opts.draft_quant, cache=False)
    prompt = build_prompt(tokenizer, [{"role": "user", "content": opts.prompt}], family=family_for(tokenizer)).ids
    params = SamplingParams(temperature=0.0, max_tokens=opts.tokens)
    plain = Decoder(target, 2048)
    spec = SpeculativeDecoder(Decoder(target, 2048), ModelDraft(draft, 2048))
    rates = {"plain": [], "speculative": []}
    for _ in range(opts.rounds):
        for name, gen in (("plain", plain), ("speculative", spec)):
            gen.reset()
            out = list(gen.generate(prompt, params))
            s = gen.stats
            rates[name].append(s.decode_tokens_per_s)
            if name == "speculative":
                acc, per_step = s.acceptance_rate, s.tokens_per_step
                # bf16 logits tie often; a k+1-token verify rounds differently from a 1-token step, so a tie may
                # break the other way (float32 output is identical: tests/test_speculative.py)
                same = next((i for i, (x, y) in enumerate(zip(ref, out)) if x != y), len(ref))
            else:
                ref = out
    best = {k: max(v) for k, v in rates.items()}
    print(json.dumps({"target": f"SmolLM2-135M {opts.dtype}", "draft": f"SmolLM2-135M {opts.draft_quant}",
                      "tokens": len(ref), "decode_tokens_per_s": rates, "best": best,
                      "speedup": round(best["speculative"] / best["plain"], 3), "acceptance_rate": round(acc, 3),
                      "tokens_per_step": round(per_step, 2), "identical_tokens": same, "threads": torch.get_num_threads()}, indent=1))


def main():
    p = argparse.ArgumentParser()
    steps = argparse.ArgumentParser(add_help=False)  # what `shapes` and `mtp` share: where and how they time a step
    add_device_args(steps, device="cpu", dtype="bfloat16")
    steps.add_argument("--position", type=int, default=512, help="cached tokens before the timed steps")
    steps.add_argument("--repeats", type=int, default=5)
    steps.add_argument("--rounds", type=int, default=2)
    steps.add_argument("--decode-mode", default="auto", choices=["auto", "eager", "static", "graph", "compile"],
                       help="how each step runs (auto: graph on cuda, eager elsewhere)")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("shapes", parents=[steps])
    s.add_argument("--target", default="DeepSeek-R1-Distill-Qwen-7B")
    s.add_argument("--draft", default="DeepSeek-R1-Distill-Qwen-1.5B")
    s.add_argument("--layers", default="2,6", help="depths to build and extrapolate from; 0 = the real depth")
    s.add_argument("--draft-layers", default="4,12", help="the same for the draft")
    s.add_argument("--max-k", type=int, default=8)
    r = sub.add_parser("mtp", parents=[steps])
    r.add_argument("--layers", type=int, default=4)
    r.add_argument("--experts", type=int, default=0, help="routed experts per MoE layer (0: R1's 256)")
    r.add_argument("--max-k", type=int, default=3)
    m = sub.add_parser("smollm2")
    add_smollm2_arg(m)
    m.add_argument("--dtype", default="bfloat16")
    m.add_argument("--draft-quant", default="int4")
    m.add_argument("--tokens", type=int, default=128)
    m.add_argument("--rounds", type=int, default=3)
    m.add_argument("--prompt", default="Explain step by step why the sum of two odd numbers is always even.")
    opts = p.parse_args()
    {"shapes": shapes, "mtp": mtp_shape, "smollm2": smollm2}[opts.what](opts)


if __name__ == "__main__":
    main()
