"""Checkpoint loading: safetensors only (pickles are never opened), streamed tensor by tensor into a model built
on the meta device, so peak memory stays close to the final model size.

Files are memory-mapped; each tensor is copied (and converted) straight out of the map, and its pages are handed
back to the kernel at once (madvise DONTNEED). The safetensors package's own reader keeps every page it touched
resident until the file is closed, which doubles the peak while a shard is read.

FP8 is decided per tensor by its dtype, not its name: a float8_e4m3fn weight comes with `<name>_scale_inv`, and is
either dequantized here (fp8="dequant") or kept in FP8 with its scales (fp8="keep", about one byte per parameter).
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
import warnings
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import torch
from torch import nn

from .config import ModelArgs
from .errors import CheckpointError
from .files import open_regular, parse_json, read_json
from .models.layers import dequantize_fp8
from .parallel import EXPERT_RE, REPLICATE, SINGLE, SKIP_HERE, placement, shares

INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that no forward needs.
HARMLESS_RE = re.compile(r"rotary_emb\.inv_freq$")


def read_index(folder: Path) -> dict[str, str] | None:
    """The index's weight_map (tensor name -> shard file name), or None without an index. Shard names must be
    plain file names in the folder: an absolute path, a `..` or a subfolder is refused, so an index never makes r1
    open (or advise deleting) a file elsewhere."""
    index = Path(folder) / INDEX_FILE
    data = read_json(index)
    if data is None:
        return None
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map object)")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not _PLAIN_NAME.fullmatch(file) or file in (".", ".."):
            raise CheckpointError(
                f"{index} names the shard {file!r} for {name}; r1 reads only shards that are files of that folder"
            )
    return weight_map


_PLAIN_NAME = re.compile(r"[^/\\\0]+")


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (from the index when there is one)."""
    folder = Path(folder)
    weight_map = read_index(folder)
    if weight_map is not None:
        files = {}
        for name, file in weight_map.items():
            path = folder / file
            if not path.exists():
                raise CheckpointError(
                    f"shard {file} (holding {name}) is missing from {folder}: re-run `r1 pull` to complete the download"
                )
            files[name] = path
        return files
    singles = sorted(folder.glob("*.safetensors"))
    if not singles:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pth", ".pt")] if folder.is_dir() else []
        if pickles:
            raise CheckpointError(
                f"{folder} has only pickle weights ({pickles[0]}); r1 loads safetensors only, since pickles can run code"
            )
        raise CheckpointError(f"no safetensors weights in {folder}")
    files = {}
    for path in singles:
        for name in SafetensorsFile(path).keys():
            files[name] = path
    return files


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


# The safetensors package's own bound on the JSON header.
MAX_HEADER_BYTES = 100_000_000


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsFile:
    """A memory-mapped .safetensors file (8-byte header length, JSON header, raw little-endian data)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            f = open_regular(path)  # a FIFO, a folder, a device: its own one line, raised as is
        except OSError as e:
            raise CheckpointError(f"cannot open {path}: {e.strerror or e}") from None
        try:
            with f:
                size = os.fstat(f.fileno()).st_size
                (n,) = struct.unpack("<Q", f.read(8))
                if n > min(size - 8, MAX_HEADER_BYTES):
                    raise ValueError("the header length runs past the end of the file or above 100 MB")
                header = parse_json(f.read(n), f"the header of {path.name}")
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError, struct.error, CheckpointError) as e:
            raise CheckpointError(f"{path.name} is truncated or corrupt ({e}): delete it and re-run `r1 pull`") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = header
        spans = []
        for name, e in header.items():
            try:
                begin, end = e["data_offsets"]
                shape = e["shape"]
                if not all(_is_count(v) for v in (begin, end, *shape)) or begin > end:
                    raise ValueError
                want = math.prod(shape) * SAFETENSORS_DTYPES[e["dtype"]].itemsize
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path.name} has a corrupt entry for {name}: delete it and re-run `r1 pull`") from None
            if end - begin != want:
                raise CheckpointError(
                    f"tensor {name} in {path.name} spans {end - begin} bytes where its shape and dtype need {want}: "
                    "the file is corrupt, delete it and re-run `r1 pull`"
                )
            if self.data_start + end > size:
                raise CheckpointError(
                    f"tensor {name} in {path.name} runs past the end of the file: it is truncated, re-run `r1 pull`"
                )
            if end > begin:
                spans.append((begin, end, name))
        spans.sort()
        for (_, end, first), (begin, _, second) in pairwise(spans):
            if begin < end:
                raise CheckpointError(f"tensors {first} and {second} overlap in {path.name}: the file is corrupt")

    def keys(self):
        return self.entries.keys()

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.entries[name]["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read(self, name: str, dtype: torch.dtype | None = None, part: tuple[int, int, int] | None = None) -> torch.Tensor:
        """A fresh tensor (converted to `dtype` on the way out of the map); the mapped pages are released.
        part=(dim, start, length): only that slice is copied out of the map (a tensor-parallel rank's share);
        the full tensor is never materialised."""
        e = self.entries[name]
        begin, end = (self.data_start + o for o in e["data_offsets"])
        src_dtype = SAFETENSORS_DTYPES[e["dtype"]]
        if end == begin:
            return torch.empty(e["shape"], dtype=dtype or src_dtype)
        with warnings.catch_warnings():  # the map is read-only; we only read it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(self.map, dtype=torch.uint8, count=end - begin, offset=begin)
        view = raw.view(src_dtype).view(e["shape"])
        if part is not None:
            view = view.narrow(*part)  # rows: one contiguous range; columns: a strided view, copied row by row
            out = torch.empty(view.shape, dtype=dtype or src_dtype)
            out.copy_(view)
        else:
            out = view.clone() if dtype in (None, src_dtype) else view.to(dtype)
        page = mmap.PAGESIZE
        start = begin // page * page
        self.map.madvise(mmap.MADV_DONTNEED, start, end - start)
        return out


def tensor_names(folder: Path) -> list[str]:
    """The names of the checkpoint's tensors, from the index (no shard opened) or else the files' headers."""
    weight_map = read_index(folder)
    if weight_map is not None:
        return list(weight_map)
    return [name for path in sorted(Path(folder).glob("*.safetensors")) for name in SafetensorsFile(path).entries]


def check_layers(folder: Path, args: ModelArgs) -> None:
    """Refuse a config.json whose layer count the checkpoint's tensors do not have, before a model is built from
    it. Layers past the count are allowed (DeepSeek's multi-token-prediction layer). Without weights, nothing to
    compare: the load names what is missing."""
    names = tensor_names(folder)
    if not names:
        return
    layers = {int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    missing = sorted(set(range(args.n_layers)) - layers)
    if missing:
        raise CheckpointError(
            f"config.json in {folder} says num_hidden_layers is {args.n_layers}, but the checkpoint has no tensors for "
            f"layer {missing[0]}{f' (nor {len(missing) - 1} more)' if len(missing) > 1 else ''}"
        )

MTP_SHARED_RE = re.compile(r"^model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.")


def _is_mtp_or_beyond(name: str, n_layers: int) -> bool:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return m is not None and int(m.group(1)) >= n_layers


def load_weights(
    model: nn.Module,
    folder: Path,
    args: ModelArgs,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    fp8: str = "dequant",
    shard=None,
    quantizer=None,
    skip: frozenset[str] = frozenset(),
    fuse: bool = True,
    progress=None,
) -> nn.Module:
    """Fill a meta-device model from the checkpoint in `folder`, one tensor at a time. With a parallel.Shard (the
    model built with it): only this rank's slice of each tensor is read, as parallel.placement says. `quantizer`
    (quant.Quantizer) quantizes each linear weight as it lands (after slicing); `skip`: parameters already filled
    (from the quantized cache), whose checkpoint tensors are not read. `fuse`: join each layer's q|k|v and gate|up
    as soon as they are in (models.base.fuse_when_loaded). `progress` (progress.Tracker): told the bytes and
    tensors to read, then each tensor read."""
    from .models.base import fuse_when_loaded

    shard = shard or SINGLE
    if fp8 not in ("dequant", "keep"):
        raise ValueError("fp8 must be 'dequant' or 'keep'")
    if quantizer is not None:
        fp8 = "dequant"  # FP8 blocks are requantized from their dequantized values, one tensor at a time
    device = torch.device(device)
    files = checkpoint_files(folder)
    targets = dict(model.named_parameters())
    float32_names = model.float32_parameters()

    # Plan: which checkpoint tensor feeds which parameter (experts go into a slice of a stacked parameter).
    plan: dict[str, tuple[str, int | None]] = {}  # checkpoint name -> (parameter name, expert index)
    experts = shard.experts(args.n_routed_experts) if args.n_routed_experts else range(0)
    mtp_prefix = f"model.layers.{args.n_layers}."  # the multi-token-prediction layer, loaded as `mtp.` when built
    with_mtp = getattr(model, "mtp", None) is not None
    for name in files:
        pname = name  # the parameter it feeds
        if _is_mtp_or_beyond(name, args.n_layers):
            if not (with_mtp and name.startswith(mtp_prefix)) or MTP_SHARED_RE.search(name):
                continue  # skipped, costs no memory (the MTP's embedding and head copies: the main ones serve)
            pname = "mtp." + name[len(mtp_prefix):]
        m = EXPERT_RE.match(pname)
        if (f"{m.group(1)}.{m.group(3)}" if m else pname) in skip:
            continue
        if m and f"{m.group(1)}.{m.group(3)}" in targets and int(m.group(2)) < args.n_routed_experts:
            if int(m.group(2)) in experts:  # expert parallel: another rank's experts are never read
                plan[name] = (f"{m.group(1)}.{m.group(3)}", int(m.group(2)) - experts.start)
        elif placement(name, shard) == SKIP_HERE:
            continue
        elif pname in targets:
            plan[name] = (pname, None)
        elif name.endswith("_scale_inv") and name[: -len("_scale_inv")] in files:
            continue  # read together with its weight
        elif HARMLESS_RE.search(name):
            continue
        else:
            raise CheckpointError(f"unexpected tensor {name} in {files[name].name}: this checkpoint does not match its config.json")
    fed = {param for param, _ in plan.values()}
    tied = args.tie_embeddings and "lm_head.weight" not in fed
    for param in targets:
        if param not in fed and not (tied and param == "lm_head.weight"):
            raise CheckpointError(f"tensor {_checkpoint_name(param)} is missing from the checkpoint in {folder}")

    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in plan:
        by_file[files[name]].append(name)
    experts_seen: dict[str, set[int]] = defaultdict(set)
    handles = {path: SafetensorsFile(path) for path in by_file}
    if progress is not None:
        progress.start(sum(_stored_bytes(handles[files[n]], n) for n in plan), len(plan))
    for path, names in by_file.items():
        handle = handles[path]
        for name in names:
            param, expert = plan[name]
            target = targets[param]
            local = tuple(target.shape[1:] if expert is not None else target.shape)
            if name not in handle.entries:
                raise CheckpointError(f"tensor {name} is listed in the index but missing from {path.name}")
            full = handle.shape(name)
            split = placement(name, shard)
            part = None
            want = local
            if split != REPLICATE:  # this rank's share along dim `split`
                parts, index = shares(name, shard, args)
                want = tuple(n * parts if d == split else n for d, n in enumerate(local))
                part = (split, index * local[split], local[split])
            if full != want:
                raise CheckpointError(
                    f"tensor {name} in {path.name} has shape {list(full)}, expected {list(want)} from config.json"
                )
            scale = None
            if handle.dtype(name) == torch.float8_e4m3fn:
                tensor = handle.read(name, part=part)
                scale_name = name + "_scale_inv"
                if scale_name not in files:
                    raise CheckpointError(f"FP8 tensor {name} in {path.name} has no {scale_name}")
                scale_path = files[scale_name]
                scale_file = handle if scale_path == path else SafetensorsFile(scale_path)
                block = args.fp8_block or (128, 128)
                rows, cols = full
                expect = (-(-rows // block[0]), -(-cols // block[1]))
                if scale_file.shape(scale_name) != expect:
                    raise CheckpointError(f"{scale_name} in {scale_path.name} has shape {list(scale_file.shape(scale_name))}, expected {list(expect)}")
                scale_part = None
                if part is not None:  # whole blocks per rank (parallel.check_sizes): the same slice of the scales
                    dim, start, length = part
                    if start % block[dim] or length % block[dim]:
                        raise CheckpointError(f"{name}: {length} {'rows' if dim == 0 else 'columns'} per rank are not "
                                              f"whole {block[dim]}-blocks")
                    scale_part = (dim, start // block[dim], length // block[dim])
                scale = scale_file.read(scale_name, part=scale_part)
                if fp8 == "dequant":
                    tensor, scale = dequantize_fp8(tensor, scale, dtype, block), None
            else:
                tensor = handle.read(name, torch.float32 if param in float32_names else dtype, part=part)
            if expert is None:
                _assign(model, param, tensor.to(device), scale)
                module_name = param.rpartition(".")[0]
                if quantizer is not None and param.endswith(".weight"):
                    quantizer.linear(model.get_submodule(module_name), module_name)
                if fuse:
                    fuse_when_loaded(model, module_name)
            else:
                module_name, _, attr = param.rpartition(".")
                n = targets[param].shape[0]
                if quantizer is None or not quantizer.expert(model.get_submodule(module_name), module_name, attr,
                                                             expert, tensor.to(device), n):
                    _assign_expert(model, param, expert, tensor.to(device), scale, n)
                experts_seen[param].add(expert)
            del tensor
            if progress is not None:
                progress.advance(_stored_bytes(handle, name))
    for param, seen in experts_seen.items():
        n = targets[param].shape[0]
        if len(seen) != n:
            missing = min(set(range(n)) - seen) + experts.start
            raise CheckpointError(f"tensor {param}.{missing}.weight is missing from the checkpoint in {folder}")
    if tied:  # (vocab parallel: both split by the same rows)
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope(device)
    return model.eval()


def _stored_bytes(handle: SafetensorsFile, name: str) -> int:
    entry = handle.entries.get(name)
    if entry is None:
        return 0
    begin, end = entry["data_offsets"]
    return end - begin


def _checkpoint_name(param: str) -> str:
    m = re.match(r"^(.*\.experts)\.(gate_proj|up_proj|down_proj)$", param)
    return f"{m.group(1)}.0.{m.group(2)}.weight" if m else param


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def _assign(model, name, tensor, scale):
    module, attr = _owner(model, name)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    if scale is not None:
        module.weight_scale_inv = scale.to(tensor.device)


def _assign_expert(model, name, expert, tensor, scale, n_experts):
    """Copy one expert's weight into its slot of the stacked parameter, allocated on the first expert seen."""
    module, attr = _owner(model, name)
    stacked = module._parameters[attr]
    if stacked.is_meta:
        stacked = nn.Parameter(torch.empty((n_experts, *tensor.shape), dtype=tensor.dtype, device=tensor.device), requires_grad=False)
        module._parameters[attr] = stacked
        if scale is not None:
            setattr(module, f"{attr}_scale_inv", torch.empty((n_experts, *scale.shape), dtype=scale.dtype, device=tensor.device))
    stacked.data[expert].copy_(tensor)
    if scale is not None:
        getattr(module, f"{attr}_scale_inv")[expert].copy_(scale)
