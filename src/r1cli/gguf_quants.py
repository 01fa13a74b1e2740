"""GGUF block types -> float32: every type llama.cpp's quantizer writes for the models r1 runs, vectorised in torch.

Each decoder takes the raw blocks uint8 [n_blocks, bytes per block] and returns float32 [n_blocks, values per
block]. They follow ggml's dequantize_row_* as the `gguf` package's numpy decoders (gguf.quants) spell them,
operation for operation and in the same float32 order, so the values are bit-identical to that reference (tested
on random blocks of every type). The IQ types' codebooks (grids, sign patterns) are taken from gguf.quants at
first use rather than copied here.

Types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S,
IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M. The 4-bit and 8-bit codes that the int4/int8 Linear takes over without a float
round trip (Q4_0, Q4_1, Q4_K, Q8_0, Q6_K) are unpacked in gguf.py; this module owns the float decoders.
"""

from __future__ import annotations

from functools import cache

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType
FLOATS = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


def _half(b: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of each block, as float32 [n_blocks, 1]."""
    return b[:, start : start + 2].contiguous().view(torch.float16).float()


def _word(b: torch.Tensor, start: int, count: int, width: int) -> torch.Tensor:
    """`count` little-endian unsigned integers of `width` bytes from byte `start`: int64 [n_blocks, count]."""
    raw = b[:, start : start + count * width].reshape(-1, count, width).long()
    out = raw[..., 0].clone()
    for k in range(1, width):
        out |= raw[..., k] << (8 * k)
    return out


def _bits(x: torch.Tensor, shifts, mask: int) -> torch.Tensor:
    """(x[..., None] >> shifts) & mask: a new last axis, one entry per shift."""
    return (x.unsqueeze(-1) >> torch.tensor(shifts, dtype=x.dtype)) & mask


def _nibbles(qs: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Bytes [..., n] -> [..., 2, n]: the low nibbles, then the high ones (ggml's order within a block). Written
    straight into a `dtype` output: converting afterwards costs a second pass over it."""
    out = torch.empty(*qs.shape[:-1], 2, qs.shape[-1], dtype=dtype)
    out[..., 0, :] = qs & 0x0F
    out[..., 1, :] = qs >> 4
    return out


def _q4_k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's twelve bytes of eight 6-bit scales and mins -> uint8 [n_blocks, 8] each."""
    s = s.reshape(-1, 3, 4)
    lo, mid, hi = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=-1)
    mn = torch.cat([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    return sc, mn


@cache
def _grid(name: str) -> torch.Tensor:
    """An IQ type's codebook from gguf.quants: float32 [entries, values per entry]."""
    import gguf.quants as q

    kind = getattr(q, name)
    kind.init_grid()
    return torch.from_numpy(kind.grid.reshape(kind.grid_shape).copy())


@cache
def _sign_table() -> torch.Tensor:
    """ggml's ksigns_iq2xs (a 7-bit index -> 8 signs with even parity) as float32 +-1 [128, 8]."""
    import gguf.quants as q

    ksigns = torch.frombuffer(bytearray(q.IQ2_XXS.ksigns), dtype=torch.uint8)
    return torch.where(_bits(ksigns, range(8), 1) == 0, 1.0, -1.0)


_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl


@cache
def _byte_signs() -> torch.Tensor:
    """Each byte value -> its eight bits as signs (1 = negative): float32 +-1 [256, 8]."""
    return torch.where(_bits(torch.arange(256, dtype=torch.uint8), range(8), 1) == 0, 1.0, -1.0)


def _sign_bits(b: torch.Tensor) -> torch.Tensor:
    """Bytes whose bits are signs (1 = negative) -> float32 +-1 [..., 8 per byte] (a table lookup: shifting a
    strided slice of bytes eight ways was the slowest step of IQ2_S and IQ3_S)."""
    return _byte_signs()[b.long()].flatten(-2)


def _q4_0(b):
    return _nibbles(b[:, 2:], torch.float32).flatten(1).sub_(8).mul_(_half(b, 0))


def _q4_1(b):
    return _nibbles(b[:, 4:], torch.float32).flatten(1).mul_(_half(b, 0)).add_(_half(b, 2))


def _q5(b, first):
    """Q5_0 (first = 2) and Q5_1 (first = 4): the fifth bit of value j is bit j of a little-endian uint32."""
    high = _bits(b[:, first : first + 4], range(8), 1).flatten(1)
    return (_nibbles(b[:, first + 4 :]).flatten(1) | (high << 4)).float()


def _q5_0(b):
    return _q5(b, 2).sub_(16).mul_(_half(b, 0))


def _q5_1(b):
    return _q5(b, 4).mul_(_half(b, 0)).add_(_half(b, 2))


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float().mul_(_half(b, 0))


def _q2_k(b):
    nb = b.shape[0]
    scales, d, dmin = b[:, :16], _half(b, 80), _half(b, 82)
    dl = (d * (scales & 0xF).float()).unsqueeze(-1)
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)
    q = (b[:, 16:80].reshape(nb, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)) & 3
    return q.reshape(nb, 16, 16).float().mul_(dl).sub_(ml).reshape(nb, 256)


def _q3_k(b):
    nb = b.shape[0]
    hmask, qs, s, d = b[:, :32], b[:, 32:96], b[:, 96:108], _half(b, 108)
    low = _bits(s[:, :8], [0, 4], 0x0F).transpose(1, 2).reshape(nb, 16)
    high = _bits(s[:, 8:12], [0, 2, 4, 6], 0x03).transpose(1, 2).reshape(nb, 16)
    scales = ((low | (high << 4)).view(torch.int8) - 32).float()
    dl = (d * scales).unsqueeze(-1)
    ql = (qs.reshape(nb, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)) & 3
    qh = ((hmask.reshape(nb, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(8, 1)) & 1) ^ 1
    q = ql.reshape(nb, 16, 16).view(torch.int8) - (qh.reshape(nb, 16, 16) << 2).view(torch.int8)
    return q.float().mul_(dl).reshape(nb, 256)


def _k_scales(b):
    """Q4_K/Q5_K: (d * sc, dmin * m), float32 [n_blocks, 8, 1] each."""
    sc, mn = _q4_k_scale_min(b[:, 4:16])
    return (_half(b, 0) * sc.float()).unsqueeze(-1), (_half(b, 2) * mn.float()).unsqueeze(-1)


def _q4_k(b):
    nb = b.shape[0]
    d, dm = _k_scales(b)
    q = _nibbles(b[:, 16:].reshape(nb, 4, 32), torch.float32).reshape(nb, 8, 32)
    return q.mul_(d).sub_(dm).reshape(nb, 256)


def _q5_k(b):
    nb = b.shape[0]
    d, dm = _k_scales(b)
    ql = _nibbles(b[:, 48:].reshape(nb, 4, 32)).reshape(nb, 8, 32)
    qh = (b[:, 16:48].reshape(nb, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(8, 1)) & 1
    return (ql | (qh << 4)).float().mul_(d).sub_(dm).reshape(nb, 256)


def _q6_k(b):
    nb = b.shape[0]
    d = (_half(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).unsqueeze(-1)
    ql = _nibbles(b[:, :128].reshape(nb, 2, 64)).view(nb, 256)
    qh, high = b[:, 128:192].reshape(nb, 2, 32), torch.empty(nb, 2, 4, 32, dtype=torch.uint8)
    for k in range(4):  # (a loop of slices: faster than one broadcast shift here)
        high[:, :, k] = (qh >> (2 * k)) & 3
    q = (ql | (high.view(nb, 256) << 4)).view(torch.int8).sub_(32)
    return q.view(nb, 16, 16).float().mul_(d).reshape(nb, 256)


def _iq4_nl(b):
    idx = _nibbles(b[:, 2:]).flatten(1).long()
    return torch.tensor(_KVALUES, dtype=torch.float32)[idx].mul_(_half(b, 0))


def _iq4_xs(b):
    nb = b.shape[0]
    low = _bits(b[:, 4:8], [0, 4], 0x0F).reshape(nb, 8)
    high = _bits(_word(b, 2, 1, 2), list(range(0, 16, 2)), 0x03).reshape(nb, 8).to(torch.uint8)
    scales = ((low | (high << 4)).view(torch.int8) - 32).float()
    dl = (_half(b, 0) * scales).unsqueeze(-1)
    idx = _nibbles(b[:, 8:].reshape(nb, 8, 16)).reshape(nb, 8, 32).long()
    return torch.tensor(_KVALUES, dtype=torch.float32)[idx].mul_(dl).reshape(nb, 256)


def _iq_scale(d, s, bias, factor):
    """d * (bias + s) * factor, in gguf.quants' order: float32 [n_blocks, n, 1, 1]."""
    return (d * (bias + s.float()) * factor).unsqueeze(-1).unsqueeze(-1)


def _iq2_xxs(b):
    nb = b.shape[0]
    words = _word(b, 2, 16, 4).reshape(nb, 8, 2)
    db = _iq_scale(_half(b, 0), words[..., 1] >> 28, 0.5, 0.25)
    signs = _sign_table()[_bits(words[..., 1], [0, 7, 14, 21], 0x7F)]  # [nb, 8, 4, 8]
    grid = _grid("IQ2_XXS")[b[:, 2:].reshape(nb, 8, 2, 4)[:, :, 0].long()]
    return grid.mul_(db).mul_(signs).reshape(nb, 256)


def _iq2_xs(b):
    nb = b.shape[0]
    qs = _word(b, 2, 32, 2)
    db = _iq_scale(_half(b, 0), _bits(b[:, 66:74], [0, 4], 0x0F).reshape(nb, 16), 0.5, 0.25)
    signs = _sign_table()[qs >> 9].reshape(nb, 16, 2, 8)
    grid = _grid("IQ2_XS")[qs & 511].reshape(nb, 16, 2, 8)
    return grid.mul_(db).mul_(signs).reshape(nb, 256)


def _iq2_s(b):
    nb = b.shape[0]
    db = _iq_scale(_half(b, 0), _bits(b[:, 74:82], [0, 4], 0x0F).reshape(nb, 16), 0.5, 0.25)
    signs = _sign_bits(b[:, 34:66]).reshape(nb, 16, 2, 8)
    high = _bits(b[:, 66:74], [0, 2, 4, 6], 0x03).reshape(nb, 32).long()
    grid = _grid("IQ2_S")[b[:, 2:34].long() | (high << 8)].reshape(nb, 16, 2, 8)
    return grid.mul_(db).mul_(signs).reshape(nb, 256)


def _iq3_xxs(b):
    nb = b.shape[0]
    words = _word(b, 66, 8, 4)
    db = _iq_scale(_half(b, 0), words >> 28, 0.5, 0.5)
    signs = _sign_table()[_bits(words, [0, 7, 14, 21], 0x7F)]  # [nb, 8, 4, 8]
    grid = _grid("IQ3_XXS")[b[:, 2:66].long()].reshape(nb, 8, 4, 8)
    return grid.mul_(db).mul_(signs).reshape(nb, 256)


def _iq3_s(b):
    nb = b.shape[0]
    s = _bits(b[:, 106:110], [0, 4], 0x0F).reshape(nb, 8)
    db = (_half(b, 0) * (1 + 2 * s).float()).reshape(nb, 8, 1, 1)
    signs = _sign_bits(b[:, 74:106]).reshape(nb, 8, 4, 8)
    high = _bits(b[:, 66:74], range(8), 1).reshape(nb, 64).long()
    grid = _grid("IQ3_S")[b[:, 2:66].long() | (high << 8)].reshape(nb, 8, 4, 8)
    return grid.mul_(db).mul_(signs).reshape(nb, 256)


_IQ1_DELTA = 0.125  # ggml's IQ1S_DELTA


def _iq1_s(b):
    nb = b.shape[0]
    qh = _word(b, 34, 8, 2)  # [nb, 8]
    dl = (_half(b, 0) * (2 * ((qh >> 12) & 7) + 1).float()).reshape(nb, 8, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, _IQ1_DELTA, -_IQ1_DELTA).reshape(nb, 8, 1, 1)
    idx = b[:, 2:34].long() | (_bits(qh, [0, 3, 6, 9], 7) << 8).reshape(nb, 32)
    grid = _grid("IQ1_S")[idx].reshape(nb, 8, 4, 8)
    return grid.add_(delta).mul_(dl).reshape(nb, 256)


def _iq1_m(b):
    nb = b.shape[0]
    sc = _word(b, 48, 4, 2)  # [nb, 4]: the top nibbles of the four hold the block's float16 scale
    d = ((sc & 0xF000) >> torch.tensor([12, 8, 4, 0])).sum(-1, keepdim=True)
    d = (d - (d >> 15) * 65536).to(torch.int16).view(torch.float16).float()  # the bits, as int16 holds them
    dl = (d * (2 * _bits(sc, [0, 3, 6, 9], 7).reshape(nb, 16) + 1).float()).reshape(nb, 8, 2, 1, 1)
    qh = _bits(b[:, 32:48], [0, 4], 0xFF).reshape(nb, 32)
    idx = b[:, :32].long() | ((qh & 7).long() << 8)
    delta = torch.where((qh & 8) == 0, _IQ1_DELTA, -_IQ1_DELTA).reshape(nb, 8, 2, 2, 1)
    grid = _grid("IQ1_M")[idx].reshape(nb, 8, 2, 2, 8)
    return grid.add_(delta).mul_(dl).reshape(nb, 256)


DECODERS = {
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
    T.IQ4_NL: _iq4_nl, T.IQ4_XS: _iq4_xs, T.IQ3_XXS: _iq3_xxs, T.IQ3_S: _iq3_s,
    T.IQ2_XXS: _iq2_xxs, T.IQ2_XS: _iq2_xs, T.IQ2_S: _iq2_s, T.IQ1_S: _iq1_s, T.IQ1_M: _iq1_m,
}
# The tensor types r1 reads -> (values per block, bytes per block).
BLOCKS = {t: GGML_QUANT_SIZES[t] for t in (*FLOATS, *DECODERS)}


def dequantize(raw: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Block-quantized rows uint8 [N, bytes per row] (or a float tensor) -> float32 [N, K]."""
    if ggml_type in FLOATS:
        return raw.float()
    decode = DECODERS[ggml_type]
    n = raw.shape[0]
    return decode(raw.reshape(-1, BLOCKS[ggml_type][1])).reshape(n, -1)
