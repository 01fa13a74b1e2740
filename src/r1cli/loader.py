"""`load(name)`: a model name, repo id, folder or .gguf file -> (model, tokenizer) ready on a device. Owns finding a
model locally (`locate_model`), what it is stored as (`Checkpoint`: safetensors or GGUF, its sizes checked once
per world size), the device and dtype choice, what `--quant auto` means for a checkpoint (`resolve_quant`), and the
quantized load (through quant.py's cache)."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelArgs, load_config
from .models import CausalLM, build_model
from .progress import tracker
from .weights import load_weights

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(device: str = "auto") -> torch.device:
    """auto: CUDA, then MPS, then CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype, args: ModelArgs, device: torch.device) -> torch.dtype:
    """auto: the checkpoint's own dtype (bf16 for every R1 model); float16 on MPS where bf16 is slow."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        want = args.torch_dtype if args.torch_dtype in DTYPES else "bfloat16"
        if device.type == "mps" and want == "bfloat16":
            want = "float16"
        return DTYPES[want]
    if dtype not in DTYPES:
        from .errors import UsageError

        raise UsageError(f"unknown dtype '{dtype}': use auto, bfloat16, float16 or float32")
    return DTYPES[dtype]


def locate_model(name: str | Path) -> Path:
    """A local folder or .gguf file as is; an alias or repo id -> its snapshot in the Hugging Face cache
    (`org/name:TYPE` -> the GGUF file in it). Never downloads (engine.locate_or_pull offers to)."""
    from .registry import resolve_name

    ref = resolve_name(str(name))
    if ref.path is not None:  # a folder needs no Hub code
        return ref.path
    from .hub import local_path

    return local_path(ref)


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf" and Path(path).is_file()


class Checkpoint:
    """What a model is stored as: a safetensors folder (config.json, tokenizer.json) or one GGUF file (everything
    in its metadata). The config is read at once, the weights and the tokenizer on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.gguf = None
        if is_gguf(self.path):
            from .gguf import model_args, open_gguf

            self.gguf = open_gguf(self.path)
            self.args = model_args(self.gguf)
        else:
            from .weights import check_layers

            self.args = load_config(self.path)
            check_layers(self.path, self.args)  # before anything is built from the config's sizes
        self._checked_world = 1  # the world size whose shard sizes are checked (check_shard)

    def check_shard(self, shard) -> None:
        """Refuse (parallel.ShardingError), before anything is built, a model whose sizes do not divide across
        `shard`'s ranks (parallel.check_sizes): once per checkpoint and world size, whoever asks first (the
        engine before planning, else the load)."""
        if shard is None or shard.world == self._checked_world:
            return
        from .parallel import check_sizes

        check_sizes(self.args, shard)
        self._checked_world = shard.world

    def load_model(
        self, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto", fp8: str = "dequant", shard=None,
        quant: str = "none", group_size: int = 32, cache: bool = True, quant_head: bool = False, fuse: bool = True,
        mtp: bool = False,
    ) -> CausalLM:
        """`fuse`: join q|k|v and gate|up into one matmul each (CausalLM.fuse_projections); False keeps the
        modules as the checkpoint names them. `mtp`: also load DeepSeek's multi-token-prediction layer
        (`model.mtp`, the draft of speculative.py); refused when the checkpoint has none."""
        if mtp and not self.args.n_mtp_layers:
            from .errors import UsageError

            raise UsageError(f"{self.path.name} has no multi-token-prediction layer (num_nextn_predict_layers is 0): "
                             "drop --mtp, or use --draft MODEL")
        model = self._load(device, dtype, fp8, shard, quant, group_size, cache, fuse, mtp)
        if quant_head:
            from .quant import quantize_head

            quantize_head(model, with_int4=quant == "int4")
        model = model.fuse_projections() if fuse else model
        if quant == "int8" or quant_head:  # which int8 layers take the dynamic kernel, by name (quant_formats)
            from .quant_formats import place_int8_kernels

            place_int8_kernels(model)
        return model

    def _load(self, device, dtype, fp8, shard, quant, group_size, cache, fuse, mtp=False) -> CausalLM:
        """`shard` (parallel.Shard): this rank's part of a tensor/expert-parallel model (sizes checked before loading).
        quant int8|int4: the linear layers quantized as they load (see quant.py); with `cache`, the quantized
        weights are read from (or written to) the disk cache beside the model, so a second start skips the work."""
        device = pick_device(device) if isinstance(device, str) else device
        torch_dtype = pick_dtype(dtype, self.args, device)
        if shard is not None and shard.world == 1:
            shard = None
        if quant != "none":
            from .quant import check_scheme

            check_scheme(quant, group_size)
        if self.gguf is not None:
            if mtp:
                from .errors import UsageError

                raise UsageError(f"{self.path.name}: --mtp needs the safetensors checkpoint (GGUF files carry no MTP layer here)")
            if shard is not None:
                from .errors import UsageError

                raise UsageError(f"{self.path.name}: GGUF files run in one process; use the safetensors repo across ranks")
            from . import gguf

            with tracker("loading weights" if quant == "none" else f"loading and quantizing to {quant}") as report:
                return gguf.load_model(self.gguf, device, torch_dtype, self.args, quant=quant, group_size=group_size,
                                       fuse=fuse, progress=report)
        self.check_shard(shard)
        with torch.device("meta"):
            model = build_model(self.args, shard, mtp=mtp)
        if quant == "none":
            with tracker("loading weights") as report:
                return load_weights(model, self.path, self.args, device=device, dtype=torch_dtype, fp8=fp8,
                                    shard=shard, fuse=fuse, progress=report)
        return _load_quantized(model, self.path, self.args, device, torch_dtype, fp8, shard, quant, group_size,
                               cache and shard is None and not mtp, fuse)  # a rank's slices are not cached (the cache holds whole tensors)

    def tokenizer(self):
        from .tokenizer import Tokenizer

        if self.gguf is not None:
            from . import gguf

            tok = gguf.tokenizer(self.gguf)
        else:
            tok = Tokenizer.from_folder(self.path)
        # A token id past the embedding would fail inside the model's first forward: refuse the pair here.
        last = max(tok.backend.get_vocab(with_added_tokens=True).values(), default=-1)
        if last >= self.args.vocab_size:
            from .errors import CheckpointError

            raise CheckpointError(
                f"the tokenizer of {self.path} has token ids up to {last}, but the model's embedding has only "
                f"{self.args.vocab_size} rows: the tokenizer does not belong to this model"
            )
        return tok


def load_model(
    folder: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto", fp8: str = "dequant",
    shard=None, quant: str = "none", group_size: int = 32, cache: bool = True, quant_head: bool = False,
    fuse: bool = True, mtp: bool = False,
) -> CausalLM:
    return Checkpoint(folder).load_model(device, dtype, fp8, shard, quant, group_size, cache, quant_head, fuse, mtp)


def _load_quantized(model, folder, args, device, torch_dtype, fp8, shard, quant, group_size, cache, fuse) -> CausalLM:
    from . import quant as q
    from .models.base import fuse_when_loaded

    path = q.cache_path(folder, quant, group_size)
    meta = {"scheme": quant, "group_size": group_size, "source": q.source_key(folder)}
    notices: list[str] = []  # a corrupt or unwritable cache: said once, the run goes on
    cached = q.read_cache(path, meta, notices) if cache else None
    if cached is not None:
        skip = set()
        for module_name, tensors in cached.items():
            owner, _, attr = module_name.rpartition(".")
            if owner.endswith(".experts"):
                q.restore(model.get_submodule(owner), attr, quant, tensors, group_size, device)
                skip.add(module_name)
            else:
                q.restore(model.get_submodule(module_name), None, quant, tensors, group_size, device)
                skip.add(f"{module_name}.weight")
                if fuse:
                    fuse_when_loaded(model, module_name)
        del cached
        with tracker("loading weights") as report:
            model = load_weights(model, folder, args, device=device, dtype=torch_dtype, fp8=fp8, skip=frozenset(skip),
                                 fuse=fuse, progress=report)
        model.quant_notice = _notices(notices, q.shape_notice(quant, group_size, q.read_cache_meta(path).get("slow", [])))
        return model
    quantizer = q.Quantizer(quant, group_size, device, collect=cache)
    with tracker(f"loading and quantizing to {quant}") as report:
        model = load_weights(model, folder, args, device=device, dtype=torch_dtype, fp8=fp8, shard=shard,
                             quantizer=quantizer, fuse=fuse, progress=report)
    if cache:
        with tracker(f"writing the {quant} cache") as report:
            failed = q.write_cache(path, quantizer.exports, meta, extra={"slow": quantizer.slow}, progress=report)
        if failed:
            notices.append(failed)
    model.quant_notice = _notices(notices, q.shape_notice(quant, group_size, quantizer.slow))
    return model


def _notices(*parts) -> str | None:
    """The quantized load's notices as one text, each line of it an `r1: ` notice once announced."""
    lines = [p for part in parts for p in ([part] if isinstance(part, str) else part or [])]
    return "\nr1: ".join(lines) or None


def resolve_quant(quant: str, dtype: str, checkpoint, device: torch.device, shard=None) -> tuple[str, str | None]:
    """The weight format `quant` (--quant or --draft-quant) means for this checkpoint on this device, with `dtype`
    as given (--dtype): (scheme, why, when r1 chose it).
    auto keeps a quantized GGUF file quantized on a CPU when the dtype is left to r1, in the fastest format measured
    on this CPU class that holds the file's bits (cpu.auto_scheme; a Q4_K_M file decodes several times faster than
    dequantized to bf16, in less memory: docs/gguf.md); anything else (checkpoints, GPUs, an explicit --dtype, a
    sharded run) loads as the file holds it, dequantized."""
    if quant != "auto":
        return quant, None
    if checkpoint.gguf is None or device.type != "cpu" or dtype != "auto" or (shard is not None and shard.world > 1):
        return "none", None
    from .gguf import auto_quant

    return auto_quant(checkpoint.gguf)


def load(name: str | Path, device: str = "auto", dtype: str | torch.dtype = "auto", fp8: str = "dequant",
         quant: str = "none", group_size: int = 32, quant_head: bool | None = None):
    """Load a model and its tokenizer. `name`: a folder, a .gguf file, an alias such as deepseek-r1:7b, a repo id,
    or `org/name:Q4_K_M` (a GGUF file of a repo). quant: none|int8|int4 (weight-only, see quant.py); quant_head:
    the output head as int8, None as the command line decides it (options.head_int8: with int4)."""
    from .options import head_int8

    checkpoint = Checkpoint(locate_model(name))
    model = checkpoint.load_model(device=device, dtype=dtype, fp8=fp8, quant=quant, group_size=group_size,
                                  quant_head=head_int8(quant, quant_head))
    return model, checkpoint.tokenizer()
