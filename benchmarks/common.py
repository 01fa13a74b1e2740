"""What every benchmark script shares: the repository's paths on sys.path, the command-line options that name a
model shape, a device and a dtype, building random-weight models from a config (and transformers' twin on the same
weights), the SmolLM2 folder, and the timing helpers (device sync, per-call microseconds, a decode rate).

A script in this folder starts with `import common` (its own folder is sys.path[0] when run as
`python benchmarks/NAME.py`), which puts src/ and tests/ on the path before anything imports r1cli.

Config names: `--config NAME` takes a folder or config.json path, or a bare name looked up in
src/r1cli/hub_configs (every alias's Hub config, the one source) and then benchmarks/configs (shapes r1 has no
alias for, e.g. Qwen2.5-0.5B).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
SRC = ROOT / "src"
TESTS = ROOT / "tests"
RESULTS = BENCHMARKS / "results"
for _p in (str(TESTS), str(SRC)):  # src first: this checkout's r1cli, not an installed one
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

CONFIG_DIRS = (SRC / "r1cli" / "hub_configs", BENCHMARKS / "configs")
SMOLLM2_DIR = Path(tempfile.gettempdir()) / "r1-bench-smollm2"


# --- options ---------------------------------------------------------------------------------------------------------


def add_shape_args(ap: argparse.ArgumentParser, required: bool = False, dense_layers: bool = False,
                   help: str = "a config name, folder or config.json: random weights in its shape",
                   aliases: tuple[str, ...] = ()) -> None:
    """--config (and `aliases`, older names of it), --layers (keep the first N layers) and, for DeepSeek shapes,
    --dense-layers."""
    ap.add_argument("--config", *aliases, dest="config", required=required, help=help)
    ap.add_argument("--layers", type=int, help="keep only the first N layers")
    if dense_layers:
        ap.add_argument("--dense-layers", type=int, help="DeepSeek: make the first N layers dense")


def add_device_args(ap: argparse.ArgumentParser, device: str = "auto", dtype: str = "auto") -> None:
    ap.add_argument("--device", default=device, help="auto|cpu|cuda|mps")
    ap.add_argument("--dtype", default=dtype, help="auto|bfloat16|float16|float32")


def add_threads_arg(ap: argparse.ArgumentParser, default: int = 2) -> None:
    ap.add_argument("--threads", type=int, default=default,
                    help="CPU threads (1 on a machine shared with other jobs: no spin-waits)")


def add_smollm2_arg(ap: argparse.ArgumentParser, flag: str = "--folder", default: str | None = None) -> None:
    ap.add_argument(flag, default=default,
                    help="SmolLM2-135M converted to safetensors (tests/smollm2.py); converted there if absent")


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


# --- configs and models ----------------------------------------------------------------------------------------------


def config_dir(spec: str | Path) -> Path:
    """The folder holding config.json for a path (folder or the file itself) or a bare config name."""
    path = Path(spec)
    if path.name == "config.json":
        path = path.parent
    if (path / "config.json").is_file():
        return path
    for base in CONFIG_DIRS:
        if (base / str(spec) / "config.json").is_file():
            return base / str(spec)
    names = sorted(p.name for base in CONFIG_DIRS for p in base.iterdir() if (p / "config.json").is_file())
    sys.exit(f"no config.json at {spec}; known names: {', '.join(names)}")


def shape_config(spec: str | Path, layers: int | None = None, dense_layers: int | None = None) -> dict:
    """The config.json as a dict, with the first `layers` layers kept and `dense_layers` dense (DeepSeek)."""
    from r1cli.config import read_config_json

    cfg = dict(read_config_json(config_dir(spec)))
    if layers:
        cfg["num_hidden_layers"] = layers
    if dense_layers is not None:
        cfg["first_k_dense_replace"] = dense_layers
    return cfg


def device_and_dtype(device: str, dtype: str, args) -> tuple[torch.device, torch.dtype]:
    """r1's own choice for 'auto' (pick_device, pick_dtype), else the named device and dtype."""
    from r1cli.loader import pick_device, pick_dtype

    dev = pick_device(device)
    return dev, pick_dtype(dtype, args, dev)


def random_shape_model(a: argparse.Namespace, mtp: bool = False):
    """(model, args, cfg, device, dtype) from the parsed --config/--layers/--dense-layers/--device/--dtype:
    random weights in the config's shape (r1cli.bench.random_model), allocated on the device."""
    from r1cli.bench import random_model
    from r1cli.config import args_from_dict

    cfg = shape_config(a.config, getattr(a, "layers", None), getattr(a, "dense_layers", None))
    args = args_from_dict(cfg)
    dev, dtype = device_and_dtype(a.device, a.dtype, args)
    return random_model(args, dev, dtype, mtp=mtp), args, cfg, dev, dtype


def hf_twin(cfg: dict, dtype: torch.dtype, device: torch.device, folder: str | Path | None = None):
    """transformers' model (random weights from `cfg`, or the real ones in `folder`) and r1's model viewing its
    tensors (r1cli.bench.share_hf_weights): the same weights for a side-by-side race."""
    from transformers import AutoModelForCausalLM

    from r1cli.bench import hf_config_from, share_hf_weights
    from r1cli.config import args_from_dict

    if folder:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=str(device))
    else:
        torch.manual_seed(0)
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(hf_config_from(cfg, dtype), dtype=dtype)
    hf.eval()
    return hf, share_hf_weights(args_from_dict(cfg), hf)


def smollm2_folder(folder: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (tests/smollm2.py), converted on first use."""
    folder = Path(folder) if folder else SMOLLM2_DIR
    if not (folder / "config.json").exists():
        from smollm2 import convert_smollm2

        folder.mkdir(parents=True, exist_ok=True)
        convert_smollm2(folder)
    return folder


# --- timing ----------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_call_us(fn, calls: int, warmup: int = 3) -> float:
    """Microseconds per call of `fn` (CPU), over `calls` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def decode_rate(gen, tokens: int, prompt: list[int] | None = None, turns: int = 2) -> float:
    """Best decode tokens/s (prefill excluded: the Decoder's own stats) of `turns` greedy turns on `gen`, a
    Decoder kept across calls so that a compiled or captured step is reused. The prompt: 32 seeded random ids.
    No repetition guard: a random-weight model repeats itself, and every turn decodes `tokens` tokens."""
    from r1cli.generate import SamplingParams

    if prompt is None:
        prompt = torch.randint(0, gen.model.args.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    best = 0.0
    for _ in range(turns):
        gen.reset()
        for _ in gen.generate(prompt, SamplingParams(temperature=0, max_tokens=tokens, repeat_guard=False)):
            pass
        best = max(best, gen.stats.decode_tokens_per_s)
    return best
