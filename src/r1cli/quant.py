"""Weight-only quantization of a model: `Quantizer` (called by the loaders as each weight lands, so one float
tensor at a time is alive), `quantize_model` (an already loaded model), `quantize_head` (--quant-head), and the
disk cache of quantized weights (written and read by the safetensors package, a CRC-32 per tensor). The formats
themselves (Int8Weight, Int4Weight, their kernels) are quant_formats.py's; what they weigh is sizes.py's.

The embedding and the output head are not quantized (the head is, as int8, with --quant-head: quantize_head); neither
is MLA's kv_b_proj (the absorbed decode reads it as a dense matrix, and it is small). A layer whose shape a kernel
cannot take stays in its dtype (counted).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import zlib
from pathlib import Path

import torch
from torch import nn

from .errors import R1Error
from .options import GROUP_SIZES, check_scheme  # noqa: F401  (the schemes and their check live with the options)
from .quant_formats import Int4Weight, Int8Weight, head_int8_kernel, int4_export, quantize_int4, quantize_int8

# Linear layers left in full precision by name (see the module docstring; sizes.bytes_per_param counts by it too).
FULL_PRECISION_LINEARS = ("kv_b_proj",)


def quantize_tensor(w: torch.Tensor, scheme: str, group_size: int, device=None):
    """A float weight [.., N, K] -> (its quantized form, the tensors the disk cache stores), or None when no
    kernel can take its shape. Works per expert on stacked [E, N, K] weights."""
    device = torch.device(device or w.device)
    k = w.shape[-1]
    if scheme == "int8":
        q, scale = quantize_int8(w)
        qw = Int8Weight(q.to(device), scale.to(device))
        return qw, {"q": q, "scale": scale}  # the codes as made (the dynamic kernel keeps a packed copy)
    if scheme == "int4" and k % group_size == 0 and k % 2 == 0:
        codes, scales, zeros = quantize_int4(w, group_size)
        # from the codes, before packing: a kernel layout cannot be read back exactly
        return Int4Weight.from_codes(codes, scales, zeros, group_size, device), int4_export(codes, scales, zeros)
    return None



# --- quantizing while loading -----------------------------------------------------------------------------------


class Quantizer:
    """Called by the loader as each weight lands on the device, so the float copy of at most one tensor (one
    expert) is alive at a time. Collects the device-independent tensors for the disk cache when asked to."""

    def __init__(self, scheme: str, group_size: int, device, collect: bool = True):
        self.scheme, self.group_size, self.device = scheme, group_size, torch.device(device)
        self.collect = collect
        self.exports: dict[str, dict[str, torch.Tensor]] = {}  # module name -> tensors
        self.kept: list[str] = []  # linear layers left in full precision (no kernel for the shape, or by design)
        self.slow: list[str] = []  # shapes the kernel cannot take: kept in full precision or dequantized per matmul
        self._experts: dict[str, list] = {}

    def wants(self, module: nn.Module, module_name: str) -> bool:
        """A Linear this quantizer replaces: every decoder Linear but FULL_PRECISION_LINEARS (the embedding, head,
        norms and router are no Linear; the routed experts come one by one through `expert`)."""
        from .models.layers import Linear

        return isinstance(module, Linear) and module_name.rsplit(".", 1)[-1] not in FULL_PRECISION_LINEARS

    def linear(self, module: nn.Module, module_name: str) -> None:
        """`module.weight` (a Linear) has just landed: replace it by its quantized form."""
        if not self.wants(module, module_name):
            self.kept.append(module_name)
            return
        result = quantize_tensor(module.weight.detach(), self.scheme, self.group_size, self.device)
        if result is None:
            self.kept.append(module_name)
            self.slow.append(module_name)
            return
        qweight, export = result
        if getattr(qweight, "layout", None) == "plain" and self.device.type in ("cpu", "cuda"):
            self.slow.append(module_name)
        module.quantize(qweight)
        if self.collect:
            self.exports[module_name] = export

    def expert(self, module: nn.Module, module_name: str, attr: str, index: int, tensor: torch.Tensor, n: int) -> bool:
        """One routed expert's weight (of stacked `attr`): quantize it now; when all n are in, stack them into
        the module. False when the shape is not quantizable (the caller then stacks it in full precision)."""
        key = f"{module_name}.{attr}"
        k = tensor.shape[-1]
        if self.scheme == "int4" and (k % self.group_size or k % 2):
            if key not in self.slow:
                self.slow.append(key)
            return False
        parts = self._experts.setdefault(key, [None] * n)
        if self.scheme == "int8":
            parts[index] = quantize_int8(tensor)
        else:
            parts[index] = quantize_int4(tensor, self.group_size)
        if all(p is not None for p in parts):
            del self._experts[key]
            stacked = [torch.stack(t) for t in zip(*parts)]
            if self.scheme == "int8":
                qweight = Int8Weight(stacked[0].to(self.device), stacked[1].to(self.device))
                export = qweight.export()
            else:
                # a GPU gathers the chosen experts' weights per step: keep them plain there (gather, dequantize)
                qweight = _int4_stacked(stacked, self.group_size, self.device, plain=self.device.type != "cpu")
                export = int4_export(*stacked)
            module.quantize(attr, qweight)
            if self.collect:
                self.exports[key] = export
        return True


def _int4_stacked(parts, group_size, device, plain: bool) -> Int4Weight:
    codes, scales, zeros = parts
    if not plain:
        return Int4Weight.from_codes(codes, scales, zeros, group_size, device)
    t = int4_export(codes, scales, zeros)
    return Int4Weight(t["packed"].to(device), t["scales_and_zeros"].to(device), group_size, "plain", codes.shape)


def restore(module: nn.Module, attr: str | None, scheme: str, tensors: dict[str, torch.Tensor], group_size: int,
            device) -> None:
    """Put a cached quantized weight back into a Linear (attr None) or into an Experts' stacked `attr`."""
    device = torch.device(device)
    if scheme == "int8":
        qweight = Int8Weight.from_export(tensors, group_size, device)
    elif attr is not None and device.type != "cpu":
        shape = (*tensors["packed"].shape[:-1], tensors["packed"].shape[-1] * 2)
        qweight = Int4Weight(tensors["packed"].to(device), tensors["scales_and_zeros"].to(device), group_size, "plain", shape)
    else:
        qweight = Int4Weight.from_export(tensors, group_size, device)
    if attr is None:
        module.quantize(qweight)
    else:
        module.quantize(attr, qweight)


# --- the disk cache ---------------------------------------------------------------------------------------------

CACHE_VERSION = 2  # 2: written by safetensors, with a CRC-32 per tensor
CACHE_DIR = "r1-quant"  # <hf cache>/models--org--name/r1-quant/<revision>/ or <folder>/.r1-quant/<key>/


def source_key(folder: Path) -> str:
    """What identifies the weights: a Hub snapshot's revision (its folder name), else a hash of the names,
    sizes and modification times of the folder's safetensors and config files."""
    folder = Path(folder)
    if folder.parent.name == "snapshots":
        return folder.name
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json")):
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_path(folder: Path, scheme: str, group_size: int) -> Path:
    """The safetensors file holding `folder`'s weights quantized with (scheme, group_size); a .json beside it."""
    folder = Path(folder)
    name = "int8" if scheme == "int8" else f"{scheme}-g{group_size}"
    if folder.parent.name == "snapshots":  # the Hub cache: beside the repo's snapshots, removed by `r1 rm`
        return folder.parent.parent / CACHE_DIR / folder.name / f"{name}.safetensors"
    return folder / f".{CACHE_DIR}" / source_key(folder) / f"{name}.safetensors"


def _crc32(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def _unsafe_place(path: Path) -> bool:
    """A cache folder or file that is a link: the Hub cache may be shared, and r1 never follows a link out of it,
    neither to write its cache nor to read one."""
    return any(p.is_symlink() for p in (path, path.with_suffix(".json"), path.parent, path.parent.parent))


def write_cache(path: Path, exports: dict[str, dict[str, torch.Tensor]], meta: dict, extra: dict | None = None,
                progress=None) -> str | None:
    """Write with safetensors' own writer, atomically (a temporary file, then rename), the JSON last: a cache is
    complete when both exist. The JSON holds a CRC-32 of every tensor's bytes, checked on reading (a checksum
    against corruption, not a signature: whoever can write the cache can write its JSON). Returns None when
    written, else a notice saying why there is no cache (a read-only folder is no error). `progress`
    (progress.Tracker): bytes and tensors, reported as one step (safetensors writes the file in one call)."""
    from safetensors.torch import save_file

    tensors = {f"{module}.{key}": t.detach().contiguous().cpu() for module, d in exports.items() for key, t in d.items()}
    crc = {name: _crc32(t) for name, t in tensors.items()}
    tmp = None
    try:
        if _unsafe_place(path):
            raise OSError(f"{path.parent} is reached through a link")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        if progress is not None:
            progress.start(sum(t.numel() * t.element_size() for t in tensors.values()), len(tensors))
        save_file(tensors, str(tmp))
        if progress is not None:
            progress.advance(sum(t.numel() * t.element_size() for t in tensors.values()), len(tensors))
        os.replace(tmp, path)
        meta_path = path.with_suffix(".json")
        tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**meta, **(extra or {}), "version": CACHE_VERSION, "modules": sorted(exports),
                                   "crc32": crc}, indent=1))
        os.replace(tmp, meta_path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return (f"cannot write the quantized weights' cache in {path.parent} ({e.strerror or e}): they are "
                "quantized again at each start")
    return None


def read_cache_meta(path: Path) -> dict:
    from .files import read_json

    try:
        return read_json(path.with_suffix(".json")) or {}
    except (OSError, ValueError, R1Error):
        return {}


READ_GROUP_BYTES = 1 << 26  # of the cache file mapped at a time while reading it
_ITEM_BYTES = {"I8": 1, "U8": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4}  # the dtypes a cache holds


def _stored_bytes(tensor_slice) -> int:
    """Bytes of a tensor in the file, from its header entry (safetensors' slice: shape and dtype, nothing read)."""
    item = _ITEM_BYTES.get(tensor_slice.get_dtype())
    if item is None:
        raise ValueError(f"it holds a {tensor_slice.get_dtype()} tensor, which r1 never writes there")
    count = 1
    for n in tensor_slice.get_shape():
        count *= n
    return count * item


def _groups(names: list[str], sizes: dict[str, int], limit: int):
    """`names` in order, cut into runs of at most `limit` bytes (a larger tensor alone)."""
    group, total = [], 0
    for name in names:
        if group and total + sizes[name] > limit:
            yield group
            group, total = [], 0
        group.append(name)
        total += sizes[name]
    if group:
        yield group


def read_cache(path: Path, meta: dict, notices: list[str] | None = None) -> dict[str, dict[str, torch.Tensor]] | None:
    """The cached tensors per module, or None when absent, for other settings, partial or corrupt (then the
    caller quantizes again and overwrites it). Read by the safetensors package (it validates the header: offsets,
    overlaps, sizes), from a regular file only. A tensor whose bytes fail their CRC-32 (or a cache that cannot be
    read) adds a notice to `notices`."""
    from safetensors import SafetensorError, safe_open

    if not path.with_suffix(".json").exists() or _unsafe_place(path):
        return None
    saved = read_cache_meta(path)
    if saved.get("version") != CACHE_VERSION or any(saved.get(k) != v for k, v in meta.items()):
        return None
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open, a device stream forever
            raise ValueError("it is not a regular file")
        crc = saved["crc32"]
        out: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(path, framework="pt") as handle:
            names = list(handle.keys())
            sizes = {name: _stored_bytes(handle.get_slice(name)) for name in names}
        # The package maps the file, and every page read stays resident until the handle closes: reading it in
        # groups, each tensor copied out, keeps the peak near the tensors' own size instead of twice it.
        for group in _groups(names, sizes, READ_GROUP_BYTES):
            with safe_open(path, framework="pt") as handle:
                for name in group:
                    module, _, key = name.rpartition(".")
                    tensor = handle.get_tensor(name).clone()
                    if _crc32(tensor) != crc[name]:
                        raise ValueError(f"{name} fails its checksum")
                    out.setdefault(module, {})[key] = tensor
        if sorted(out) != saved["modules"] or set(names) != set(crc):
            raise ValueError("its tensors are not the ones its index lists")
        return out
    except SafetensorError:
        if notices is not None:
            notices.append(f"the quantized weights' cache {path} is corrupt (its file is truncated or corrupt): "
                           "quantizing again")
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, R1Error) as e:
        if notices is not None:
            notices.append(f"the quantized weights' cache {path} is corrupt ({e}): quantizing again")
        return None


def quantize_head(model: nn.Module, with_int4: bool = False) -> None:
    """--quant-head: the output head as int8 (one scale per vocabulary row), multiplied by the int8 kernel. Decode
    reads the head every token, and it is large for the R1 distills (151936 x 1536 in the 1.5B: with int4 layers,
    over a third of the bytes read per token). A tied embedding keeps its own dtype for lookups; the head becomes a
    separate int8 copy. with_int4 (the model's layers are int4): the head takes head_int8_kernel(), whose 8-bit
    rows stay within int4's quality bar but not always within int8's, so int8 models keep the packed kernel."""
    from .models.layers import Linear

    head = model.lm_head
    if type(head) is not nn.Linear:
        from .errors import UsageError

        raise UsageError("--quant-head works on one process (a sharded run splits the head by vocabulary)")
    weight = head.weight.detach()
    with torch.device("meta"):
        quantized = Linear(weight.shape[1], weight.shape[0])
    q, scale = quantize_int8(weight)
    kernel = head_int8_kernel() if with_int4 and weight.device.type == "cpu" else "pack"
    quantized.quantize(Int8Weight(q, scale, kernel))
    model.lm_head = quantized



def shape_notice(scheme: str, group_size: int, slow: list[str]) -> str | None:
    """One line for the user when some layers miss the packed kernel (see Quantizer.slow)."""
    if not slow:
        return None
    what = "int8" if scheme == "int8" else f"int4 g{group_size}"
    return (f"{len(slow)} linear layer(s) have shapes the {what} kernel cannot take (e.g. {slow[0]}): kept in full "
            "precision or dequantized per matmul" + ("; try --group-size 32" if scheme == "int4" and group_size > 32 else ""))


def quantize_model(model: nn.Module, scheme: str, group_size: int = 32) -> list[str]:
    """Quantize an already loaded model in place (bench's random weights); returns the layers kept."""
    from .models.deepseek import Experts

    q = Quantizer(scheme, group_size, next(model.parameters()).device, collect=False)
    for name, module in list(model.named_modules()):
        if q.wants(module, name) and module.weight is not None:
            q.linear(module, name)
        elif isinstance(module, Experts):
            for attr in ("gate_proj", "up_proj", "down_proj"):
                stacked = getattr(module, attr)
                if stacked is None:
                    continue
                for e in range(stacked.shape[0]):
                    if not q.expert(module, name, attr, e, stacked[e], stacked.shape[0]):
                        break
    return q.kept
