"""`r1 bench`: load time, peak memory, prefill and decode speed, achieved bandwidth, and (with --compare hf)
transformers on the same weights in the same process, alternating runs. Figures are printed, never asserted."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import ModelArgs, args_from_dict, read_config_json
from .generate import Decoder, SamplingParams
from .loader import pick_device, pick_dtype
from .models import CausalLM, build_model
from .models.base import fuse_when_loaded
from .sizes import count_parameters, decode_bytes_per_token


@dataclass
class BenchResult:
    engine: str
    load_s: float = 0.0
    peak_memory_gb: float = 0.0
    prefill_tokens_per_s: dict[int, float] = field(default_factory=dict)
    ttft_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    bandwidth_gb_s: float = 0.0
    bandwidth_ratio: float = 0.0
    acceptance_rate: float | None = None  # speculative decoding (--draft, --mtp)
    tokens_per_step: float | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024 / 1e9


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written), the ceiling decode is held to."""
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 512 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int = 0, mtp: bool = False) -> CausalLM:
    """Random weights in the real shapes (normal, std 0.02; norms at 1), allocated straight on the device in
    their final dtype (the router in float32), so a model that fills most of a GPU fits once. `mtp`: DeepSeek's
    multi-token-prediction layer too."""
    with torch.device("meta"):
        model = build_model(args, mtp=mtp)
    float32 = model.float32_parameters()
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()):
            prefix, _, leaf = name.rpartition(".")
            t = torch.empty(p.shape, dtype=torch.float32 if name in float32 else dtype, device=device)
            if "norm" in name:
                t.fill_(1.0)
            elif leaf in ("bias", "e_score_correction_bias"):
                t.zero_()
            else:
                t.normal_(0.0, 0.02, generator=g)
            model.get_submodule(prefix)._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
            fuse_when_loaded(model, prefix)  # q|k|v and gate|up joined as the loader joins them, layer by layer
    model.reset_rope(device)
    return model.eval()


def share_hf_weights(args: ModelArgs, hf_model) -> CausalLM:
    """Our model viewing transformers' tensors (no copy): same weights for a side-by-side race.
    transformers 5 keeps routed experts fused (gate_up_proj [E, 2f, d]); ours are stacked separately."""
    with torch.device("meta"):
        model = build_model(args)
    hf = dict(hf_model.named_parameters())
    hf.update(dict(hf_model.named_buffers()))
    for name, p in list(model.named_parameters()):
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith(".experts") and leaf in ("gate_proj", "up_proj"):
            fused = hf[f"{prefix}.gate_up_proj"]
            f = fused.shape[1] // 2
            tensor = fused[:, :f] if leaf == "gate_proj" else fused[:, f:]
        elif name == "lm_head.weight" and args.tie_embeddings:
            tensor = hf["model.embed_tokens.weight"]
        else:
            tensor = hf[name]
        module = model.get_submodule(prefix)
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    model.reset_rope(hf["model.embed_tokens.weight"].device)
    return model.eval().fuse_projections()  # as the loader does (a copy of the joined weights)


def hf_config_from(cfg: dict, dtype: torch.dtype):
    from transformers import AutoConfig

    cfg = {k: v for k, v in cfg.items() if k not in ("auto_map", "quantization_config")}
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def _time(fn, device, repeats=3) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def _best_decode(gen, prompt: list[int], params: SamplingParams):
    """The faster of two greedy runs' stats (the first warms up, and captures or compiles the decode step)."""
    best = None
    for _ in range(2):
        gen.reset()
        for _ in gen.generate(prompt, params):
            pass
        if best is None or gen.stats.decode_tokens_per_s > best.decode_tokens_per_s:
            best = gen.stats
    return best


@torch.inference_mode()
def bench_ours(model: CausalLM, prompt_lengths, new_tokens: int, decode_mode: str, device) -> BenchResult:
    r = BenchResult(engine=f"r1 ({decode_mode})")
    vocab = model.args.vocab_size
    for n in prompt_lengths:
        tokens = torch.randint(0, vocab, (1, n), device=device)
        cache = model.new_cache(1, n)
        r.prefill_tokens_per_s[n] = n / _time(lambda: model(tokens, cache=cache, last_only=True), device)
    prompt = torch.randint(0, vocab, (prompt_lengths[0],)).tolist()
    gen = Decoder(model, max_len=len(prompt) + new_tokens + 8, decode_mode=decode_mode)
    r.engine = f"r1 ({gen.decode_mode})"  # what auto chose: the default that r1 run and chat decode with
    # Random weights often loop: the repetition guard is off, so that every token is timed.
    params = SamplingParams(temperature=0, max_tokens=new_tokens, repeat_guard=False)
    best = _best_decode(gen, prompt, params)
    r.ttft_ms = best.prefill_s * 1000
    r.decode_tokens_per_s = best.decode_tokens_per_s
    return r


def bench_speculative(model: CausalLM, draft, prompt_len: int, new_tokens: int, device) -> BenchResult:
    """Greedy decode with a draft (speculative.py) on the prompt bench_ours decodes from."""
    from .speculative import SpeculativeDecoder

    r = BenchResult(engine="r1 + draft" if draft is not None else "r1 + mtp")
    prompt = torch.randint(0, model.args.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    gen = SpeculativeDecoder(Decoder(model, max_len=len(prompt) + new_tokens + 8), draft)
    best = _best_decode(gen, prompt, SamplingParams(temperature=0, max_tokens=new_tokens, repeat_guard=False))
    r.ttft_ms = best.prefill_s * 1000
    r.decode_tokens_per_s = best.decode_tokens_per_s
    r.acceptance_rate, r.tokens_per_step = best.acceptance_rate, best.tokens_per_step
    return r


@torch.inference_mode()
def bench_hf(hf_model, prompt_lengths, new_tokens: int, device) -> BenchResult:
    r = BenchResult(engine="transformers")
    vocab = hf_model.config.vocab_size
    for n in prompt_lengths:
        tokens = torch.randint(0, vocab, (1, n), device=device)
        r.prefill_tokens_per_s[n] = n / _time(lambda: hf_model(tokens, logits_to_keep=1), device)
    prompt = torch.randint(0, vocab, (1, prompt_lengths[0]), device=device)
    stamps: list[float] = []

    def clock(input_ids, scores):  # a logits processor: called once per generated token, after its forward
        _sync(device)
        stamps.append(time.perf_counter())
        return scores

    from transformers import LogitsProcessorList

    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, logits_processor=LogitsProcessorList([clock]))
    best_rate, best_ttft = 0.0, float("inf")
    for _ in range(2):
        stamps.clear()
        _sync(device)
        t0 = time.perf_counter()
        hf_model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        best_ttft = min(best_ttft, stamps[0] - t0)
        best_rate = max(best_rate, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    r.ttft_ms = best_ttft * 1000
    r.decode_tokens_per_s = best_rate
    return r


def run_bench(
    model_name: str | None = None,
    config: str | None = None,
    layers: int | None = None,
    dense_layers: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    prompt_lengths: tuple[int, ...] = (128, 1024, 4096),
    new_tokens: int = 128,
    compare_hf: bool = False,
    decode_mode: str = "auto",
    quant: str = "none",
    group_size: int = 32,
    draft: str | None = None,
    mtp: bool = False,
) -> dict:
    from .quant import check_scheme, quantize_model

    check_scheme(quant, group_size)
    if (draft or mtp) and (config or compare_hf):
        from .errors import UsageError

        raise UsageError("--draft and --mtp measure real weights: give a MODEL, without --config or --compare")
    dev = pick_device(device)
    if config:
        cfg = read_config_json(Path(config).parent if Path(config).name == "config.json" else config)
    else:
        from .loader import locate_model

        folder = locate_model(model_name)
        if folder.is_file():
            from .errors import UsageError

            raise UsageError("r1 bench runs safetensors models, not GGUF files: give a folder, alias or repo id")
        cfg = read_config_json(folder)
    if layers:
        cfg = dict(cfg, num_hidden_layers=layers)
    if dense_layers is not None:
        cfg = dict(cfg, first_k_dense_replace=dense_layers)
    args = args_from_dict(cfg)
    torch_dtype = pick_dtype(dtype, args, dev)
    prompt_lengths = tuple(n for n in prompt_lengths if n + new_tokens < args.max_seq_len)

    t = time.perf_counter()
    hf_model = None
    if compare_hf:
        from transformers import AutoModelForCausalLM

        if config:
            with torch.device(dev):
                hf_model = AutoModelForCausalLM.from_config(hf_config_from(cfg, torch_dtype), dtype=torch_dtype)
        else:
            hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, device_map=str(dev))
        hf_model.eval()
        model = share_hf_weights(args, hf_model)
    elif config:
        model = random_model(args, dev, torch_dtype)
    else:
        from .loader import load_model

        model = load_model(folder, device=dev, dtype=torch_dtype, quant=quant, group_size=group_size, mtp=mtp)
    if quant != "none" and (config or compare_hf):
        quantize_model(model, quant, group_size)
    _sync(dev)
    load_s = time.perf_counter() - t

    bandwidth = measure_copy_bandwidth(dev)
    per_token = decode_bytes_per_token(args, torch.finfo(torch_dtype).bits // 8, quant, group_size)
    runs: dict[str, list[BenchResult]] = {"ours": [], "hf": []}
    drafter = None
    if draft or mtp:
        from .loader import Checkpoint, locate_model
        from .speculative import open_speculative

        room = Decoder(model, prompt_lengths[0] + new_tokens + 8)  # the draft's cache is as long as this
        spec = open_speculative(room, Checkpoint(folder).tokenizer(), draft, mtp, lambda ref, name: locate_model(name),
                                dev, dtype, "none", group_size)
        drafter = spec.draft
        runs["hf"] = []
    for _ in range(2 if compare_hf or drafter is not None else 1):  # alternate the engines so drift hits both alike
        runs["ours"].append(bench_ours(model, prompt_lengths, new_tokens, decode_mode, dev))
        if hf_model is not None:
            runs["hf"].append(bench_hf(hf_model, prompt_lengths, new_tokens, dev))
        if drafter is not None:
            runs["hf"].append(bench_speculative(model, drafter, prompt_lengths[0], new_tokens, dev))

    def best(rs: list[BenchResult]) -> BenchResult:
        out = max(rs, key=lambda r: r.decode_tokens_per_s)
        out.prefill_tokens_per_s = {n: max(r.prefill_tokens_per_s[n] for r in rs) for n in prompt_lengths
                                    if all(n in r.prefill_tokens_per_s for r in rs)}  # (none with a draft)
        out.ttft_ms = min(r.ttft_ms for r in rs)
        out.bandwidth_gb_s = per_token * out.decode_tokens_per_s / 1e9
        out.bandwidth_ratio = out.bandwidth_gb_s / bandwidth
        return out

    results = [best(runs["ours"])] + ([best(runs["hf"])] if runs["hf"] else [])
    results[0].load_s = load_s
    results[0].peak_memory_gb = peak_memory_gb(dev)
    total, activated = count_parameters(args)
    report = {
        "model": model_name or str(config),
        "architecture": args.architecture,
        "layers": args.n_layers,
        "parameters": total,
        "activated_parameters": activated,
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "dtype": str(torch_dtype).removeprefix("torch.") + ("" if quant == "none" else f" {quant}" + (f" g{group_size}" if quant == "int4" else "")),
        "new_tokens": new_tokens,
        "weight_bytes_per_token": per_token,
        "copy_bandwidth_gb_s": bandwidth,
        "torch": torch.__version__,
        "results": [asdict(r) for r in results],
    }
    if drafter is not None:
        report["ratios"] = {"decode_with_draft": results[1].decode_tokens_per_s / results[0].decode_tokens_per_s}
    elif len(results) == 2:
        ours, hf = results
        report["ratios"] = {
            "decode": ours.decode_tokens_per_s / hf.decode_tokens_per_s,
            **{f"prefill_{n}": ours.prefill_tokens_per_s[n] / hf.prefill_tokens_per_s[n] for n in prompt_lengths},
        }
    return report


def format_report(report: dict) -> str:
    lines = [
        f"{report['model']}: {report['architecture']}, {report['layers']} layers, "
        f"{report['parameters'] / 1e9:.2f}B parameters ({report['activated_parameters'] / 1e9:.2f}B active), "
        f"{report['dtype']} on {report['device']} ({report['threads']} threads), torch {report['torch']}",
        f"copy bandwidth {report['copy_bandwidth_gb_s']:.1f} GB/s; "
        f"{report['weight_bytes_per_token'] / 1e9:.3f} GB of weights read per token",
    ]
    for r in report["results"]:
        prefill = ", ".join(f"{n}: {v:.0f}" for n, v in r["prefill_tokens_per_s"].items())
        extra = f"load {r['load_s']:.1f} s, peak {r['peak_memory_gb']:.2f} GB; " if r["load_s"] else ""
        lines.append(
            f"  {r['engine']:<16} {extra}prefill tok/s {{{prefill}}}; ttft {r['ttft_ms']:.0f} ms; "
            f"decode {r['decode_tokens_per_s']:.1f} tok/s = {r['bandwidth_gb_s']:.1f} GB/s "
            f"({100 * r['bandwidth_ratio']:.0f}% of copy bandwidth)"
            + (f"; draft {100 * r['acceptance_rate']:.0f}% accepted, {r['tokens_per_step']:.2f} tokens/step"
               if r.get("acceptance_rate") is not None else "")
        )
    if "ratios" in report:
        label = "with the draft / without" if "decode_with_draft" in report["ratios"] else "r1 / transformers"
        lines.append(f"  {label}: " + ", ".join(f"{k} {v:.2f}x" for k, v in report["ratios"].items()))
    return "\n".join(lines)

