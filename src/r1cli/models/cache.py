"""The static KV cache: preallocated per-layer tensors, written in place at the slots a forward covers."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Cache:
    """Per layer, a tuple of tensors indexed by slot along `slot_dim`: (k, v) [B, Hkv, S, D] for dense models
    (slot_dim 2, the layout attention reads), (latent, k_rope) [B, S, r] / [B, S, d_rope] for MLA (slot_dim 1). `key_valid` [B, S] marks which slots hold real tokens
    (None: all of them, the common unpadded case, which then needs no mask in decode)."""

    layers: list[tuple[torch.Tensor, ...]]
    max_len: int
    slot_dim: int = 1
    key_valid: torch.Tensor | None = None
    # Static decode attends over the first `view_len` slots only (a bucket chosen by the generator), so a short
    # conversation does not read the whole preallocated cache every token.
    view_len: int | None = None

    @property
    def batch_size(self) -> int:
        return self.layers[0][0].shape[0]

    def write(self, layer: int, start_pos, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store values at slots start_pos..start_pos+T-1; return every slot up to there.
        A tensor start_pos (static decode: the [T] slots of the T new tokens, consecutive) writes with index_copy_
        and returns the first `view_len` slots, so shapes never change and the step can be compiled or captured as
        a CUDA graph."""
        d = self.slot_dim
        if isinstance(start_pos, torch.Tensor):
            n = self.view_len or self.max_len
            for buf, val in zip(self.layers[layer], values):
                buf.index_copy_(d, start_pos, val.to(buf.dtype))  # (a CPU keeps a bf16 model's cache in float32)
            return tuple(buf.narrow(d, 0, n) for buf in self.layers[layer])
        end = start_pos + values[0].shape[d]
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} tokens; this step needs {end}")
        out = []
        for buf, val in zip(self.layers[layer], values):
            buf.narrow(d, start_pos, end - start_pos).copy_(val)
            out.append(buf.narrow(d, 0, end))
        return tuple(out)

    def mark_valid(self, start_pos: int, padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Record which new slots are real tokens; returns the key mask [B, end] or None when nothing is padded."""
        end = start_pos + (padding_mask.shape[1] if padding_mask is not None else 0)
        if padding_mask is not None and self.key_valid is None:
            self.key_valid = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=padding_mask.device)
        if self.key_valid is None:
            return None
        if padding_mask is not None:
            self.key_valid[:, start_pos:end] = padding_mask
        return self.key_valid


class RowCache(Cache):
    """One row of `rows` per sequence, each at its own length (the batched engine, batch.py): a decode step feeds
    one token per row and `write` stores row b's at slot positions[b] (start_pos is that [rows] tensor), then
    returns the first `rows` rows over the first `attend_len` slots; the caller's mask hides each row's slots past
    its own position. Shares the buffers of the cache it is made from."""

    def __init__(self, cache: Cache, rows: int, attend_len: int):
        super().__init__(cache.layers, cache.max_len, cache.slot_dim)
        self.rows, self.attend_len = rows, attend_len
        self.row_index = None  # arange(rows), made at the first write and shared by every layer's


    @property
    def batch_size(self) -> int:
        return self.rows

    def write(self, layer: int, start_pos, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d = self.slot_dim
        if self.row_index is None:
            self.row_index = torch.arange(self.rows, device=start_pos.device)
        index = (self.row_index,) + (slice(None),) * (d - 1) + (start_pos,)
        out = []
        for buf, val in zip(self.layers[layer], values):
            buf[index] = val.select(d, 0).to(buf.dtype)
            out.append(buf.narrow(0, 0, self.rows).narrow(d, 0, self.attend_len))
        return tuple(out)


def row_view(cache: Cache, row: int) -> Cache:
    """Row `row` of a batched cache as a batch-1 cache (views: writes land in the shared buffers), for the
    ordinary forward (a prompt's prefill)."""
    return Cache([tuple(buf.narrow(0, row, 1) for buf in layer) for layer in cache.layers], cache.max_len, cache.slot_dim)
