"""GGUF files (llama.cpp's format) of the R1 distills: metadata -> ModelArgs and Tokenizer, blocks -> weights.

A GGUF carries everything a run needs: the config and the tokenizer as metadata under llama.cpp's key names, the
chat template, and the tensors, mostly quantized in blocks. We parse the header ourselves (the `gguf` package's
GGUFReader builds a numpy view per vocabulary string: seconds for a 150k-token vocabulary, where this takes a
fraction of one) and take the format's constants from the `gguf` package. Nothing in the file is ever executed;
the chat template renders in chat_format's sandbox.

Weights: every type llama.cpp's quantizer writes for these models (gguf_quants.py decodes them).
- `load_model` dequantizes them into a model built on the meta device, one tensor at a time and in row chunks,
  so peak memory stays close to the loaded model.
- `linear_codes` hands a Linear's blocks over unchanged as integer codes and scales, for the int4/int8 Linear:
  Q4_0, Q4_1 and Q4_K are int4 in groups of 32 with `w = (q - 8) * scale + zero`, Q8_0 is int8 in groups of 32
  (`w = q * scale`), Q6_K int8 in groups of 16.

llama.cpp stores the Llama (not Qwen2) q/k projections with the rows of each head permuted, because ggml rotates
adjacent pairs where Hugging Face rotates halves; `_unpermute` puts them back.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import re
import struct
import warnings
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Callable

import torch
from gguf import GGMLQuantizationType, LlamaFileType, TokenType

from .config import ModelArgs, RopeArgs, check_args
from .errors import CheckpointError, UnsupportedArchitectureError
from .files import open_regular
from .gguf_quants import BLOCKS, FLOATS, dequantize  # noqa: F401  (dequantize: this module's API too)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "deepseek2": "DeepseekV3ForCausalLM"}
_SUPPORTED = "r1 runs GGUF files of llama, qwen2 (the R1 distills) and deepseek2 (DeepSeek-V2/V3/R1) models"
_SIGMOID = 2  # llama.cpp's expert_gating_func: 1 softmax (V2), 2 sigmoid (V3/R1)


def architecture_of(f: GGUFFile) -> str | None:
    """The transformers architecture a GGUF holds (deepseek2: V3 when its router scores by sigmoid, else V2)."""
    arch = f.metadata.get("general.architecture")
    if arch == "deepseek2" and f.arch_key("expert_gating_func") != _SIGMOID:
        return "DeepseekV2ForCausalLM"
    return ARCHITECTURES.get(arch)

F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K = (
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K,
)


def type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


# --- the file ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order, rows first (GGUF lists the innermost dimension first)
    ggml_type: int
    offset: int  # absolute, in the file
    nbytes: int | None  # None for a type r1 cannot read


# Value types of GGUF metadata: struct formats of the scalars; 8 is a string, 9 an array.
# Bounds on a hostile header: ggml's GGML_MAX_DIMS, and arrays of arrays (no real file nests them at all).
MAX_DIMS = 4
MAX_NESTING = 8
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class GGUFFile:
    """A memory-mapped GGUF file (v2/v3, little-endian): `metadata` (key -> value), `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open_regular(self.path) as f:
                self.size = os.fstat(f.fileno()).st_size
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot open {self.path}: {e}") from None
        if self.map[:4] != b"GGUF":
            raise CheckpointError(f"{self.path.name} is not a GGUF file (no GGUF magic)")
        self._pos = 4
        try:
            version = self._scalar("I")
            if version not in (2, 3):
                endian = " (a big-endian file?)" if version > 0xFFFF else ""
                raise CheckpointError(f"{self.path.name} is GGUF version {version}{endian}; r1 reads versions 2 and 3")
            # Counts are checked against the bytes left before looping (each entry takes at least 12 or 24 bytes), so
            # a huge count is refused at once instead of spinning.
            n_tensors, n_kv = self._count(self._scalar("Q"), 24), self._count(self._scalar("Q"), 12)
            self.metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = self._string()
                if key in self.metadata:
                    raise struct.error(f"the metadata key {key} appears twice")
                self.metadata[key] = self._value(self._scalar("I"))
            infos = []
            for _ in range(n_tensors):
                name = self._string()
                n_dims = self._scalar("I")
                if not 1 <= n_dims <= MAX_DIMS:
                    raise struct.error(f"tensor {name} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
                dims = [self._scalar("Q") for _ in range(n_dims)]
                infos.append((name, tuple(reversed(dims)), self._scalar("I"), self._scalar("Q")))
        except (struct.error, IndexError, UnicodeDecodeError, KeyError) as e:
            raise CheckpointError(
                f"{self.path.name} has a truncated or corrupt GGUF header ({e}): download it again"
            ) from None
        align = self.metadata.get("general.alignment", 32)
        if not (isinstance(align, int) and not isinstance(align, bool) and 0 < align <= 2**16 and align & (align - 1) == 0):
            raise CheckpointError(
                f"{self.path.name} has general.alignment {align!r}; GGUF needs a power of two: download it again"
            )
        data_start = -(-self._pos // align) * align
        if len({info[0] for info in infos}) != len(infos):
            raise CheckpointError(f"{self.path.name} lists a tensor name twice: the file is corrupt")
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            nbytes = None
            if ggml_type in BLOCKS and shape:
                per_block, block_bytes = BLOCKS[ggml_type]
                if shape[-1] % per_block:
                    raise CheckpointError(
                        f"tensor {name} in {self.path.name} has rows of {shape[-1]}, not whole {per_block}-value blocks"
                    )
                nbytes = math.prod(shape) // per_block * block_bytes  # Python ints: a 2^63 dimension cannot wrap
                if offset % align:
                    raise CheckpointError(
                        f"tensor {name} in {self.path.name} starts at {offset}, not a multiple of the alignment {align}"
                    )
                if data_start + offset + nbytes > self.size:
                    raise CheckpointError(
                        f"tensor {name} runs past the end of {self.path.name}: the file is truncated, download it again"
                    )
            self.tensors[name] = TensorInfo(name, shape, ggml_type, data_start + offset, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values() if t.nbytes)
        for (_, end, first), (begin, _, second) in pairwise(spans):
            if begin < end:
                raise CheckpointError(f"tensors {first} and {second} overlap in {self.path.name}: the file is corrupt")

    def _count(self, n: int, min_bytes: int) -> int:
        if n * min_bytes > self.size - self._pos:
            raise struct.error(f"a count of {n} entries cannot fit in the file")
        return n

    # Header parsing: a cursor over the map.
    def _scalar(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._scalar("Q")
        if self._pos + n > self.size:
            raise struct.error("string runs past the end of the file")
        text = self.map[self._pos : self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return text

    def _value(self, value_type: int, depth: int = 0):
        if value_type == 8:
            return self._string()
        if value_type != 9:
            return self._scalar(_SCALARS[value_type])
        if depth >= MAX_NESTING:
            raise struct.error(f"arrays nested more than {MAX_NESTING} deep")
        item_type, n = self._scalar("I"), self._scalar("Q")
        if item_type in (8, 9):
            self._count(n, 8 if item_type == 8 else 12)  # a string takes 8 bytes or more, an array 12
            return [self._value(item_type, depth + 1) for _ in range(n)]
        fmt = f"<{n}{_SCALARS[item_type]}"
        if self._pos + n * struct.calcsize("<" + _SCALARS[item_type]) > self.size:
            raise struct.error("array runs past the end of the file")
        items = list(struct.unpack_from(fmt, self.map, self._pos))
        self._pos += struct.calcsize(fmt)
        return items

    def arch_key(self, key: str, default=None):
        """`{architecture}.{key}`, e.g. arch_key("block_count") -> llama.block_count."""
        return self.metadata.get(f"{self.metadata.get('general.architecture')}.{key}", default)

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes, unconverted: a float tensor for F32/F16/BF16, else uint8 [rows, bytes per row].
        A view of the map: decode it (a copy), then `release` it."""
        info = self.tensors[name]
        if info.nbytes is None:
            supported = ", ".join(type_name(t) for t in BLOCKS)
            raise CheckpointError(
                f"tensor {name} in {self.path.name} is {type_name(info.ggml_type)}; r1 reads {supported}"
            )
        with warnings.catch_warnings():  # the map is read-only; we only read it
            warnings.simplefilter("ignore", UserWarning)
            data = (torch.frombuffer(self.map, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
                    if info.nbytes else torch.empty(0, dtype=torch.uint8))
        if info.ggml_type in FLOATS:
            return data.view(FLOATS[info.ggml_type]).view(info.shape)
        return data.view(-1, info.nbytes // max(torch.Size(info.shape[:-1]).numel(), 1))

    def release(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Hand the pages of the tensor's bytes [begin, end) back to the kernel: a mapped file read once would
        otherwise stay resident."""
        info = self.tensors[name]
        start = (info.offset + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = info.offset + (info.nbytes if end is None else end)
        if info.nbytes and stop > start:
            self.map.madvise(mmap.MADV_DONTNEED, start, stop - start)


# --- split files ---------------------------------------------------------------------------------------------------

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


class GGUFSplit:
    """A GGUF split into parts (`name-00001-of-00003.gguf`, as llama.cpp's gguf-split and converter write them)
    read as one file: the first part's metadata, every part's tensors. Same interface as GGUFFile."""

    def __init__(self, parts: list[GGUFFile]):
        self.parts = parts
        self.path = parts[0].path
        self.size = sum(p.size for p in parts)
        self.metadata = parts[0].metadata
        self.tensors: dict[str, TensorInfo] = {}
        self._owner: dict[str, GGUFFile] = {}
        for part in parts:
            for name, info in part.tensors.items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name} is in two parts of {self.path.name}: the split is corrupt")
                self.tensors[name] = info
                self._owner[name] = part
        expected = self.metadata.get("split.tensors.count")
        if isinstance(expected, int) and expected != len(self.tensors):
            raise CheckpointError(
                f"the {len(parts)} parts of {self.path.name} hold {len(self.tensors)} tensors, its header says "
                f"{expected}: a part is damaged, download it again"
            )

    arch_key = GGUFFile.arch_key

    def raw(self, name: str) -> torch.Tensor:
        return self._owner[name].raw(name)

    def release(self, name: str, begin: int = 0, end: int | None = None) -> None:
        self._owner[name].release(name, begin, end)


def split_parts(path: str | Path) -> list[Path] | None:
    """All parts of the split GGUF that `path` (any of its parts) belongs to, in order; None if not split."""
    path = Path(path)
    m = SPLIT_RE.match(path.name)
    if not m or int(m.group("count")) < 2:
        return None
    count = int(m.group("count"))
    return [path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def open_gguf(path: str | Path) -> GGUFFile | GGUFSplit:
    """A GGUF file, or every part of a split one (named by any part) read as one."""
    parts = split_parts(path)
    if parts is None:
        return GGUFFile(path)
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"{Path(path).name} is part of a GGUF split into {len(parts)} files and {missing[0]} is missing "
            f"({len(missing)} missing): download every part into the same folder"
        )
    files = [GGUFFile(p) for p in parts]
    for i, f in enumerate(files):
        if f.metadata.get("split.no", i) != i or f.metadata.get("split.count", len(parts)) != len(parts):
            raise CheckpointError(f"{f.path.name} says it is not part {i + 1} of {len(parts)}: the split is mixed up")
    return GGUFSplit(files)


def tensor_types(f: GGUFFile | GGUFSplit) -> dict[str, dict[str, int]]:
    """The file's type mix: type name -> {"tensors": count, "bytes": bytes on disk}, largest first."""
    mix: dict[str, dict[str, int]] = {}
    for info in f.tensors.values():
        row = mix.setdefault(type_name(info.ggml_type), {"tensors": 0, "bytes": 0})
        row["tensors"] += 1
        row["bytes"] += info.nbytes or 0
    return dict(sorted(mix.items(), key=lambda kv: -kv[1]["bytes"]))


def nominal_bits(f: GGUFFile | GGUFSplit) -> int:
    """Bits per weight the file was made to keep: its preset (`general.file_type`, as llama.cpp's quantizer writes
    it: MOSTLY_Q4_K_M 4, MOSTLY_IQ2_XS 2, MOSTLY_Q8_0 8, MOSTLY_F16 16), else the type holding most of its bytes.
    The preset, not the bytes: a Q4_K_M file of 896-wide rows is mostly Q5_0, still a 4-bit choice
    (loader.resolve_quant's --quant auto)."""
    try:
        name = LlamaFileType(int(f.metadata.get("general.file_type"))).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        name = next(iter(tensor_types(f)), "F32")
    digits = "".join(ch for ch in name.split("_")[0] if ch.isdigit())
    return int(digits) if digits else 32


def auto_quant(f: GGUFFile | GGUFSplit) -> tuple[str, str | None]:
    """--quant auto for this file on this CPU (loader.resolve_quant, r1 show): (scheme, why: cpu.auto_scheme);
    ("none", None) for an F16/BF16/F32 file."""
    from .cpu import auto_scheme

    bits = nominal_bits(f)
    return ("none", None) if bits >= 16 else auto_scheme(bits)


# --- blocks -> codes and values ------------------------------------------------------------------------------------
# Each takes raw uint8 [N, bytes per row] and follows ggml's dequantize_row_* (and gguf.quants) operation for
# operation, so the dequantized values are bit-identical to llama.cpp's reference and to transformers' loader.
# Bits are unpacked into a preallocated output and scaled in place: much faster than building each piece
# apart.


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of each block, as float32 [n_blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _unpack4(qs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Bytes qs [..., n] -> out [..., 2, n] (any dtype): the low nibbles, then the high ones."""
    out[..., 0, :] = qs & 0x0F
    out[..., 1, :] = qs >> 4
    return out


def _q4_k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's eight 6-bit scales and mins per super-block (12 bytes: the high 2 bits of the last four of each
    sit in bytes 8..11), times d and dmin: float32 [n_blocks, 8, 1] each."""
    s = b[:, 4:16].reshape(-1, 3, 4)
    lo, mid, hi = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=-1)
    mn = torch.cat([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    return (_half(b, 0) * sc.float()).unsqueeze(-1), (_half(b, 2) * mn.float()).unsqueeze(-1)


def _q6_k_codes(b: torch.Tensor) -> torch.Tensor:
    """Q6_K's 6-bit values minus 32, int8 [n_blocks, 16, 16]: low 4 bits from 128 bytes, high 2 from 64."""
    nb = b.shape[0]
    low = _unpack4(b[:, :128].reshape(nb, 2, 64), torch.empty(nb, 2, 2, 64, dtype=torch.uint8))
    qh = b[:, 128:192].reshape(nb, 2, 32)
    high = torch.empty(nb, 2, 4, 32, dtype=torch.uint8)
    for k in range(4):
        high[:, :, k] = (qh >> (2 * k)) & 3
    return (low.view(nb, 256) | (high.view(nb, 256) << 4)).view(torch.int8).sub_(32).view(nb, 16, 16)


def _q6_k_scales(b: torch.Tensor) -> torch.Tensor:
    """d times the sixteen int8 scales: float32 [n_blocks, 16, 1]."""
    return (_half(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).unsqueeze(-1)


def q8_0_codes(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 (w = d * q): codes int8 [N, K], scales float32 [N, K/32]."""
    n, b = raw.shape[0], raw.reshape(-1, 34)
    return b[:, 2:].contiguous().view(torch.int8).reshape(n, -1), _half(b, 0).reshape(n, -1)


def q4_0_codes(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 (w = d * (q - 8)) as int4 group 32: codes uint8 0..15 [N, K], scales = d, zeros = 0 [N, K/32]."""
    n, b = raw.shape[0], raw.reshape(-1, 18)
    d = _half(b, 0).reshape(n, -1)
    codes = _unpack4(b[:, 2:], torch.empty(b.shape[0], 2, 16, dtype=torch.uint8))
    return codes.reshape(n, -1), d, torch.zeros_like(d)


def q4_1_codes(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 (w = d * q + m) as int4 group 32: codes [N, K], scales = d, zeros = m + 8d [N, K/32]."""
    n, b = raw.shape[0], raw.reshape(-1, 20)
    d, m = _half(b, 0).reshape(n, -1), _half(b, 2).reshape(n, -1)
    codes = _unpack4(b[:, 4:], torch.empty(b.shape[0], 2, 16, dtype=torch.uint8))
    return codes.reshape(n, -1), d, m + 8 * d


def q4_k_codes(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K (super-blocks of 256: eight sub-blocks of 32, w = d * sc_j * q - dmin * m_j) as int4 group 32:
    codes [N, K], scales = d * sc, zeros = 8 * scale - dmin * m [N, K/32]."""
    n, b = raw.shape[0], raw.reshape(-1, 144)
    scale, minimum = _q4_k_scales(b)
    codes = _unpack4(b[:, 16:].reshape(-1, 4, 32), torch.empty(b.shape[0], 4, 2, 32, dtype=torch.uint8))
    return codes.reshape(n, -1), scale.reshape(n, -1), (8 * scale - minimum).reshape(n, -1)


def q6_k_codes(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K (super-blocks of 256: sixteen sub-blocks of 16, w = d * sc_j * (q - 32)) as int8 group 16:
    codes in -32..31 [N, K], scales = d * sc [N, K/16]."""
    n, b = raw.shape[0], raw.reshape(-1, 210)
    return _q6_k_codes(b).reshape(n, -1), _q6_k_scales(b).reshape(n, -1)


# --- metadata -> ModelArgs -----------------------------------------------------------------------------------------


def model_args(f: GGUFFile) -> ModelArgs:
    """The config a GGUF's metadata describes (llama.cpp's keys), refusing anything but llama, qwen2, deepseek2."""
    arch = f.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(f"{f.path.name} is a GGUF of architecture {arch or '(none)'}; {_SUPPORTED}")

    def need(key, default=None, kind=int):
        value = f.arch_key(key, default)
        if value is None:
            raise CheckpointError(f"{f.path.name} lacks the GGUF metadata {arch}.{key}")
        if isinstance(value, list):
            raise UnsupportedArchitectureError(f"{f.path.name} sets {arch}.{key} per layer; r1 supports one value")
        # Integers for sizes (positive: a head count of 0 would divide by zero), finite numbers for floats.
        ok = (isinstance(value, int) and value > 0) if kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or (kind is float and not math.isfinite(value)):
            raise CheckpointError(
                f"{f.path.name} has {arch}.{key} = {value!r}; r1 expects a {'positive integer' if kind is int else 'number'}"
            )
        return value

    if "token_embd.weight" not in f.tensors:
        raise CheckpointError(f"tensor token_embd.weight is missing from {f.path.name}")
    if arch == "deepseek2":
        return _deepseek2_args(f, need)
    dim, n_heads = need("embedding_length"), need("attention.head_count")
    head_dim = need("attention.key_length", dim // n_heads)
    rope_dim = need("rope.dimension_count", head_dim)
    n_layers = need("block_count")
    blocks = {int(m.group(1)) for n in f.tensors if (m := re.match(r"blk\.(\d+)\.", n))}
    if n_layers > len(blocks) or any(i not in blocks for i in range(n_layers)):
        have = len(blocks)
        raise CheckpointError(
            f"{f.path.name} says {arch}.block_count is {n_layers}, but it holds tensors for {have} blocks"
        )
    if rope_dim != head_dim:
        raise UnsupportedArchitectureError(f"{f.path.name} rotates {rope_dim} of {head_dim} head dims; r1 rotates all")
    return check_args(ModelArgs(
        architecture=ARCHITECTURES[arch],
        vocab_size=f.tensors["token_embd.weight"].shape[0],  # the embedding, not the tokenizer, sizes the model
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=need("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        inter_dim=need("feed_forward_length"),
        norm_eps=float(need("attention.layer_norm_rms_epsilon", kind=float)),
        max_seq_len=need("context_length"),
        rope=_rope_args(f, head_dim),
        tie_embeddings="output.weight" not in f.tensors,  # llama.cpp writes no head when it is the embedding
        qkv_bias=arch == "qwen2",
        attention_bias=arch == "llama" and "blk.0.attn_output.bias" in f.tensors,
        torch_dtype="bfloat16",  # the dtype of every R1 distill; a GGUF's own types say nothing about it
    ), f.path.name)


def _number(f: GGUFFile, key: str, default=None):
    """A float hyperparameter of the metadata (None when absent and no default); one line when not a number."""
    value = f.arch_key(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise CheckpointError(f"{f.path.name} has {key} = {value!r}; r1 expects a number")
    return value


def _deepseek2_args(f: GGUFFile, need) -> ModelArgs:
    """deepseek2 as llama.cpp's converter writes DeepSeek-V2/V3/R1. Files since its MLA rework say head_count_kv 1,
    key_length = kv_lora_rank + rope dims and keep the per-head sizes in key_length_mla/value_length_mla; older
    ones have the per-head sizes in key_length/value_length. The router: expert_gating_func (sigmoid: V3's
    noaux_tc, with the exp_probs_b bias; softmax: V2's, group-limited when there are groups)."""
    n_heads, rope_dim = need("attention.head_count"), need("rope.dimension_count")
    qk_head = f.arch_key("attention.key_length_mla") or need("attention.key_length")
    v_head = f.arch_key("attention.value_length_mla") or need("attention.value_length")
    architecture = architecture_of(f)
    v3 = architecture == "DeepseekV3ForCausalLM"
    n_group = f.arch_key("expert_group_count") or 1
    n_experts = f.arch_key("expert_count") or 0
    method = "noaux_tc" if v3 else ("group_limited_greedy" if n_group > 1 else "greedy")
    return ModelArgs(
        architecture=architecture,
        vocab_size=f.tensors["token_embd.weight"].shape[0],
        dim=need("embedding_length"),
        n_layers=need("block_count"),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=rope_dim,
        inter_dim=need("feed_forward_length"),
        norm_eps=float(need("attention.layer_norm_rms_epsilon", kind=float)),
        max_seq_len=need("context_length"),
        rope=_rope_args(f, rope_dim),
        tie_embeddings="output.weight" not in f.tensors,
        torch_dtype="bfloat16",
        q_lora_rank=f.arch_key("attention.q_lora_rank") or None,
        kv_lora_rank=need("attention.kv_lora_rank"),
        qk_nope_head_dim=qk_head - rope_dim,
        qk_rope_head_dim=rope_dim,
        v_head_dim=v_head,
        n_routed_experts=n_experts,
        n_shared_experts=f.arch_key("expert_shared_count") or 0,
        n_activated_experts=f.arch_key("expert_used_count") or 0,
        moe_inter_dim=f.arch_key("expert_feed_forward_length") or 0,
        first_k_dense_replace=f.arch_key("leading_dense_block_count") or 0,
        n_group=n_group,
        topk_group=f.arch_key("expert_group_used_count") or 1,
        topk_method=method,
        scoring_func="sigmoid" if v3 else "softmax",
        norm_topk_prob=bool(f.arch_key("expert_weights_norm", False)),
        routed_scaling_factor=float(f.arch_key("expert_weights_scale") or 1.0),
    )


def _rope_args(f: GGUFFile, head_dim: int) -> RopeArgs:
    theta = float(_number(f, "rope.freq_base", 10000.0))
    kind = f.arch_key("rope.scaling.type") or ("linear" if _number(f, "rope.scale_linear") else "none")
    factor = float(_number(f, "rope.scaling.factor") or _number(f, "rope.scale_linear") or 1.0)
    # llama.cpp turns Llama 3.1's "llama3" scaling into a tensor of per-frequency divisors (rope_freqs).
    factors = None
    if "rope_freqs.weight" in f.tensors:
        freqs = f.raw("rope_freqs.weight")
        if f.tensors["rope_freqs.weight"].ggml_type != F32 or freqs.numel() != head_dim // 2:
            raise CheckpointError(f"rope_freqs.weight in {f.path.name} is not {head_dim // 2} float32 values")
        factors = tuple(freqs.tolist())
    if kind == "none" or factor == 1.0:
        return RopeArgs(theta=theta, freq_factors=factors)
    if kind == "linear":
        return RopeArgs(theta=theta, kind="linear", factor=factor, freq_factors=factors)
    if kind == "yarn":
        # DeepSeek's mscale_all_dim arrives as yarn_log_multiplier = 0.1 * mscale_all_dim; its `mscale` is not
        # written, and equals mscale_all_dim in every DeepSeek config (their ratio, 1, scales the rotation).
        log_mul = _number(f, "rope.scaling.yarn_log_multiplier")
        mscale = float(log_mul) / 0.1 if log_mul else None
        return RopeArgs(
            theta=theta, kind="yarn", factor=factor, freq_factors=factors,
            original_max_position_embeddings=f.arch_key("rope.scaling.original_context_length"),
            beta_fast=float(_number(f, "rope.scaling.yarn_beta_fast") or 32),
            beta_slow=float(_number(f, "rope.scaling.yarn_beta_slow") or 1),
            mscale=mscale, mscale_all_dim=mscale,
        )
    raise UnsupportedArchitectureError(
        f"{f.path.name} uses rope scaling '{kind}'; r1 supports none, linear and yarn in GGUF files"
    )


# --- tensors -> parameters -----------------------------------------------------------------------------------------

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    # deepseek2 (gguf-py's tensor names for DeepSeek-V2/V3): MLA, the router, shared experts
    "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj", "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
# deepseek2 tensors whose parameter is not `{module}.{weight|bias}`: the routed experts stacked per layer, the
# router's bias, and kv_b_proj split per head into k_b (transposed) and v_b, as newer converters write it.
_STACKED = {
    "ffn_gate_exps.weight": "mlp.experts.gate_proj", "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj", "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "attn_k_b.weight": "self_attn.kv_b_proj.weight", "attn_v_b.weight": "self_attn.kv_b_proj.weight",
}
_CONSUMED = {"rope_freqs.weight"}  # read into ModelArgs, not a parameter


def parameter_name(name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (None: not a tensor of ours)."""
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
        if stacked := _STACKED.get(f"{m.group(2)}.{m.group(3)}"):
            return f"model.layers.{m.group(1)}.{stacked}"
        part = _BLOCK.get(m.group(2))
        return f"model.layers.{m.group(1)}.{part}.{m.group(3)}" if part else None
    if m := re.fullmatch(r"(\w+)\.(weight|bias)", name):
        part = _TOP.get(m.group(1))
        return f"{part}.{m.group(2)}" if part else None
    return None


def _unpermute(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Llama q/k row order: within each head it interleaves the two rotary halves
    (rows 0, d/2, 1, d/2+1, ...); Hugging Face keeps them apart. Works on any tensor with one row per output."""
    rest = t.shape[1:]
    return t.reshape(n_heads, -1, 2, *rest).transpose(1, 2).reshape(t.shape)


def _heads_to_unpermute(f: GGUFFile, args: ModelArgs, name: str) -> int | None:
    if f.metadata.get("general.architecture") != "llama":
        return None
    if ".attn_q." in name:
        return args.n_heads
    if ".attn_k." in name:
        return args.n_kv_heads
    return None


# Values dequantized at a time: bounds the scratch (a few float32 temporaries of 4 MB) whatever the tensor.
_CHUNK_VALUES = 2**20


def read_rows(f: GGUFFile, name: str, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of the tensor seen as [rows, innermost dim], dequantized into `dtype` in chunks, their
    mapped pages released as they are read."""
    info = f.tensors[name]
    raw = f.raw(name)
    width = info.shape[-1] if info.shape else 1
    raw = raw.reshape(-1, width) if info.ggml_type in FLOATS else raw
    stop = raw.shape[0] if stop is None else stop
    if info.ggml_type in FLOATS:
        part = raw[start:stop]
        out = part.to(dtype) if part.dtype != dtype else part.clone()
        row_bytes = width * part.element_size()
        f.release(name, start * row_bytes, stop * row_bytes)
        return out
    row_bytes = raw.shape[1]
    out = torch.empty(stop - start, width, dtype=dtype)
    step = max(1, _CHUNK_VALUES // width)
    for r in range(start, stop, step):
        end = min(r + step, stop)
        out[r - start : end - start] = dequantize(raw[r:end], info.ggml_type)
        f.release(name, r * row_bytes, end * row_bytes)
    return out


def read_dense(f: GGUFFile, name: str, dtype: torch.dtype, args: ModelArgs) -> torch.Tensor:
    """The tensor dequantized into `dtype` (rows in Hugging Face order), its mapped pages released."""
    out = read_rows(f, name, dtype).view(f.tensors[name].shape)
    f.release(name)
    heads = _heads_to_unpermute(f, args, name)
    return _unpermute(out, heads) if heads else out


def _kv_b(f: GGUFFile, k_b: str, dtype: torch.dtype, args: ModelArgs) -> torch.Tensor:
    """kv_b_proj [heads * (nope + v), kv_lora_rank] from the converter's split form: k_b [heads, rank, nope]
    (each head's block transposed) and v_b [heads, v, rank]."""
    v_b = k_b.replace(".attn_k_b.", ".attn_v_b.")
    if v_b not in f.tensors:
        raise CheckpointError(f"tensor {v_b} is missing from {f.path.name}")
    h, rank, nope, v = args.n_heads, args.kv_lora_rank, args.qk_nope_head_dim, args.v_head_dim
    for name, want in ((k_b, (h, rank, nope)), (v_b, (h, v, rank))):
        if f.tensors[name].shape != want:
            raise CheckpointError(
                f"tensor {name} in {f.path.name} has shape {list(f.tensors[name].shape)}, expected {list(want)}"
            )
    k = read_dense(f, k_b, dtype, args).transpose(1, 2)
    return torch.cat([k, read_dense(f, v_b, dtype, args)], dim=1).reshape(h * (nope + v), rank)


def linear_codes(f: GGUFFile, name: str, args: ModelArgs) -> dict | None:
    """A Linear's weight as stored, for the int4/int8 Linear (no float round trip), rows in Hugging Face order:
    {"bits": 4, "group": 32, "codes": uint8 [N, K] 0..15, "scales", "zeros": float32 [N, K/32]}
    (w = (q - 8) * scale + zero) for Q4_0, Q4_1 and Q4_K; {"bits": 8, "group": 32 or 16, "codes": int8 [N, K],
    "scales": float32 [N, K/group]} (w = q * scale) for Q8_0 and Q6_K; None for other types (dequantize those)."""
    info = f.tensors[name]
    decode = {Q4_0: q4_0_codes, Q4_1: q4_1_codes, Q4_K: q4_k_codes, Q8_0: q8_0_codes, Q6_K: q6_k_codes}
    decode = decode.get(info.ggml_type)
    if decode is None or len(info.shape) != 2:
        return None
    parts = decode(f.raw(name))
    f.release(name)
    heads = _heads_to_unpermute(f, args, name)
    if heads:  # a row permutation moves whole rows of blocks: codes and scales alike
        parts = tuple(_unpermute(p, heads) for p in parts)
    if len(parts) == 3:
        return {"bits": 4, "group": 32, "codes": parts[0], "scales": parts[1], "zeros": parts[2]}
    return {"bits": 8, "group": 16 if info.ggml_type == Q6_K else 32, "codes": parts[0], "scales": parts[1]}


def _plan(f: GGUFFile, args: ModelArgs, targets: dict) -> dict[str, str]:
    """GGUF tensor -> the parameter it fills, refusing strangers and reporting missing tensors by GGUF name.
    A kv_b_proj comes from attn_kv_b, or from attn_k_b (which reads attn_v_b with it)."""
    plan = {}
    for name in f.tensors:
        if name in _CONSUMED:
            continue
        param = parameter_name(name)
        layer = re.match(r"model\.layers\.(\d+)\.", param or "")
        if param not in targets or (layer and int(layer.group(1)) >= args.n_layers):
            raise CheckpointError(f"unexpected tensor {name} in {f.path.name}: r1 does not know where it goes")
        if ".attn_v_b." in name or (".attn_k_b." in name and name.replace("_k_b.", "_kv_b.") in f.tensors):
            continue  # read with attn_k_b; or the file has the joined attn_kv_b too
        plan[name] = param
    fed = set(plan.values())
    gguf_names = {parameter_name(n): n for n in _all_names(args)}
    for param in targets:
        if param not in fed and not (args.tie_embeddings and param == "lm_head.weight"):
            raise CheckpointError(f"tensor {gguf_names.get(param, param)} is missing from {f.path.name}")
    return plan


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or a no-op where there is none (not Linux/glibc)."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


# glibc keeps the heap that each tensor's freed scratch (the row chunks' float32 temporaries, in every thread's
# arena) leaves between the parameters allocated after it, so the resident set crept up tensor by tensor: trimming
# after each tensor hands those pages back (peak figures in docs/gguf.md).
_trim_heap = _malloc_trim()


def load_model(f: GGUFFile, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
               args: ModelArgs | None = None, quant: str = "none", group_size: int = 32, fuse: bool = True,
               progress=None):
    """Build the model on the meta device and fill it from the file, one dequantized tensor at a time.
    quant int4 (group 32): Q4_0, Q4_1 and Q4_K blocks are repacked into the int4 Linear as they are, without a
    float round trip; any other tensor (and every tensor for int8 or int4 g64/g128) is dequantized, then quantized
    as it lands, like a safetensors checkpoint (routed experts one expert at a time). `fuse`: q|k|v and gate|up
    joined layer by layer (fuse_when_loaded)."""
    from torch import nn

    from .models import build_model
    from .models.base import fuse_when_loaded
    from .quant import Quantizer, shape_notice
    from .quant_formats import Int4Weight

    args = args or model_args(f)
    if "tokenizer.ggml.model" in f.metadata:  # a tokenizer r1 cannot build fails now, not after the weights
        check_tokenizer(f)
    device = torch.device(device)
    with torch.device("meta"):
        model = build_model(args)
    targets = dict(model.named_parameters())
    float32 = model.float32_parameters()
    plan = _plan(f, args, targets)
    quantizer = Quantizer(quant, group_size, device, collect=False) if quant != "none" else None
    repacked = 0
    if progress is not None:  # (progress.Tracker) bytes as stored in the file, tensors
        progress.start(sum(f.tensors[n].nbytes or 0 for n in plan), len(plan))
    for name, param in plan.items():
        if progress is not None:
            progress.advance(f.tensors[name].nbytes or 0)
        want = tuple(targets[param].shape)
        joined = ".attn_k_b." in name
        if f.tensors[name].shape != want and not joined:
            raise CheckpointError(
                f"tensor {name} in {f.path.name} has shape {list(f.tensors[name].shape)}, expected {list(want)}"
            )
        module_name, _, attr = param.rpartition(".")
        module = model.get_submodule(module_name)
        this_dtype = torch.float32 if param in float32 else dtype  # (the router)
        if module_name.endswith(".experts"):
            _load_experts(f, name, module, module_name, attr, this_dtype, device, quantizer)
            continue
        quantize = quantizer is not None and attr == "weight" and quantizer.wants(module, module_name)
        if quantize and quant == "int4" and group_size == 32 and not joined:
            codes = linear_codes(f, name, args)
            if codes is not None and codes["bits"] == 4:
                module.quantize(Int4Weight.from_codes(codes["codes"], codes["scales"], codes["zeros"], 32, device))
                repacked += 1
                if fuse:
                    fuse_when_loaded(model, module_name)
                continue
        tensor = _kv_b(f, name, this_dtype, args) if joined else read_dense(f, name, this_dtype, args)
        module._parameters[attr] = nn.Parameter(tensor.to(device), requires_grad=False)
        if quantize:
            quantizer.linear(module, module_name)
        if fuse:
            fuse_when_loaded(model, module_name)
        _trim_heap()
    if args.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope(device)
    if quantizer is not None:
        model.quant_notice = shape_notice(quant, group_size, quantizer.slow)
        model.gguf_repacked = repacked  # linear layers taken over from the file's 4-bit blocks as they were
    return model.eval()


def _load_experts(f: GGUFFile, name: str, module, module_name: str, attr: str, dtype, device, quantizer) -> None:
    """A layer's routed experts stacked [E, out, in] (ffn_*_exps): dequantized whole, or with --quant one expert
    at a time, each quantized as it is read, so at most one expert's float copy is alive."""
    from torch import nn

    n, rows = f.tensors[name].shape[0], f.tensors[name].shape[1]
    if quantizer is not None:
        for e in range(n):
            tensor = read_rows(f, name, dtype, e * rows, (e + 1) * rows).to(device)
            if not quantizer.expert(module, module_name, attr, e, tensor, n):
                break  # a shape the int kernels cannot take: kept in full precision below
            _trim_heap()
        else:
            f.release(name)
            return
    tensor = read_rows(f, name, dtype).view(f.tensors[name].shape)
    f.release(name)
    module._parameters[attr] = nn.Parameter(tensor.to(device), requires_grad=False)


def _all_names(args: ModelArgs):
    yield from (f"{top}.weight" for top in _TOP)
    for i in range(args.n_layers):
        yield from (f"blk.{i}.{stacked}" for stacked in _STACKED)  # (attn_kv_b below names a missing kv_b_proj)
        for part in _BLOCK:
            yield f"blk.{i}.{part}.weight"
            if part in ("attn_q", "attn_k", "attn_v", "attn_output"):
                yield f"blk.{i}.{part}.bias"


# --- metadata -> Tokenizer -----------------------------------------------------------------------------------------

# How each llama.cpp pre-tokenizer (tokenizer.ggml.pre) splits text before BPE, as the model's own tokenizer.json
# does: (regex splits applied in turn, ByteLevel's own GPT-2 regex, digits one by one, NFC, ignore_merges).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek's own: the Split sequences of the tokenizer.json of DeepSeek-V3/R1 ("deepseek-v3"), of deepseek-llm and
# DeepSeek-V2 ("deepseek-llm") and of deepseek-coder ("deepseek-coder"); llama.cpp's llama-vocab.cpp lists the same
# regexes, with \p{N}+ or \p{N} where the Hub files split digits one by one (the Digits step here).
_DEEPSEEK_V3_SPLITS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",  # CJK ideographs, hiragana, katakana
    (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"""
     r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""),
)
_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"  # CJK ideographs, U+0800-U+4E00, Hangul syllables
_DEEPSEEK_LLM_SPLITS = (
    r"[\r\n]",
    # letters of the cased scripts (Latin, Greek, Cyrillic, Armenian, Georgian, Cherokee, Glagolitic, Coptic...)
    ("\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
     "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
     "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
     "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
     "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
     "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102"
     "\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
     "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
     "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
     "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
     "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+"),
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",  # ASCII and full-width punctuation
    r"\s+$",
    _DEEPSEEK_CJK,
)
_DEEPSEEK_CODER_SPLITS = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK)
_PRE = {
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), ((_QWEN2_SPLIT,), False, False, True, False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"), ((_LLAMA3_SPLIT,), False, False, False, True)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell"), ((), True, True, False, False)),
    **dict.fromkeys(("gpt-2", "default"), ((), True, False, False, False)),
    "deepseek-v3": (_DEEPSEEK_V3_SPLITS, False, False, False, False),
    "deepseek-llm": (_DEEPSEEK_LLM_SPLITS, False, True, False, False),
    "deepseek-coder": (_DEEPSEEK_CODER_SPLITS, False, True, False, False),
}


def check_tokenizer(f: GGUFFile) -> None:
    """Refuse, from the metadata alone, a tokenizer `tokenizer` cannot build: before gigabytes of weights load."""
    meta = f.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedArchitectureError(
            f"{f.path.name} has a '{str(kind)[:64]}' tokenizer; r1 builds byte-level BPE tokenizers "
            "(tokenizer.ggml.model gpt2) only"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in _PRE:
        raise UnsupportedArchitectureError(
            f"{f.path.name} has the pre-tokenizer '{str(pre)[:64]}' (tokenizer.ggml.pre), which r1 does not know "
            f"how to split text by; r1 knows {', '.join(sorted(_PRE))}"
        )


def tokenizer_summary(f: GGUFFile) -> dict:
    """What `r1 show` says of the file's tokenizer, from its metadata: llama.cpp's model and pre-tokenizer names,
    how many tokens and merges, and why r1 cannot build it (None when it can)."""
    meta = f.metadata

    def name(key, default=None):
        value = meta.get(key, default)
        return value[:64] if isinstance(value, str) else None if value is None else "?"

    def count(key):
        value = meta.get(key)
        return len(value) if isinstance(value, list) else None

    try:
        check_tokenizer(f)
        problem = None
    except UnsupportedArchitectureError as e:
        problem = str(e)
    return {"model": name("tokenizer.ggml.model"), "pre": name("tokenizer.ggml.pre", "default"),
            "tokens": count("tokenizer.ggml.tokens"), "merges": count("tokenizer.ggml.merges"), "problem": problem}


def tokenizer(f: GGUFFile):
    """Our Tokenizer from the GGUF's tokenizer metadata: byte-level BPE (tokenizer.ggml.model "gpt2") with its
    vocabulary, merges, token types, special ids, pre-tokenizer and chat template."""
    import tokenizers
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

    from .tokenizer import Tokenizer

    meta = f.metadata
    check_tokenizer(f)
    splits, gpt2_regex, digits, nfc, ignore_merges = _PRE[meta.get("tokenizer.ggml.pre", "default")]
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise CheckpointError(f"{f.path.name} lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    good = isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)
    types = meta.get("tokenizer.ggml.token_type") or ([1] * len(tokens) if good else None)
    if not (good and isinstance(merges, list) and all(isinstance(m, str) for m in merges)
            and isinstance(types, list) and len(types) == len(tokens) and all(isinstance(t, int) for t in types)):
        raise CheckpointError(
            f"{f.path.name} has malformed tokenizer metadata: tokens and merges must be arrays of strings, "
            "token_type an array of integers, one per token"
        )
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if any(len(pair) != 2 for pair in pairs):
        raise CheckpointError(f"{f.path.name} has a merge that is not two tokens joined by a space: its tokenizer is broken")
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges)
    except Exception as e:  # the Rust side raises plain Exceptions (a merge of a token not in the vocabulary)
        raise CheckpointError(f"{f.path.name} has an inconsistent tokenizer: {str(e)[:200]}") from None
    backend = tokenizers.Tokenizer(bpe)
    if nfc:
        backend.normalizer = normalizers.NFC()
    steps = [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<｜User｜>, <|im_end|>) are special; user-defined ones (<think>) are matched whole too, as
    # llama.cpp does, but are not special. Both keep their ids: their text is already in the vocabulary.
    added = {i: AddedToken(t, special=ty == TokenType.CONTROL, normalized=False)
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (TokenType.CONTROL, TokenType.USER_DEFINED)}
    backend.add_special_tokens([a for a in added.values() if a.special])
    backend.add_tokens([a for a in added.values() if not a.special])
    for i, a in added.items():
        if backend.token_to_id(a.content) != i:
            raise CheckpointError(f"{f.path.name} lists the token {a.content!r} twice: its tokenizer is inconsistent")

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
              "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    if meta.get("tokenizer.ggml.add_bos_token") and config["bos_token"]:
        bos = config["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=[bos, "$A"], pair=[bos, "$A", bos, "$B"], special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])]
        )
    # llama.cpp also ends generation on end-of-turn and end-of-message tokens (Llama 3's <|eot_id|>, <|eom_id|>).
    stop = [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "eot", "eom")
            if isinstance(meta.get(f"tokenizer.ggml.{k}_token_id"), int)]
    tok = Tokenizer(backend, {k: v for k, v in config.items() if v is not None}, {"eos_token_id": stop})
    template = meta.get("tokenizer.chat_template")
    tok.chat_template = template if isinstance(template, str) else None
    return tok
