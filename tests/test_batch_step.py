"""The batched step's internals (batch.py, models/cache.py): the greedy draw over many rows gives torch's argmax
exactly (the first maximum, the first NaN), whatever the vocabulary width and ties."""

from __future__ import annotations

import pytest
import torch

from r1cli.batch import first_argmax


@pytest.mark.parametrize("vocab", [151936, 129280, 49152, 3001, 2049, 2048, 1025, 5])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_first_argmax_is_torch_argmax(vocab, rows):
    g = torch.Generator().manual_seed(vocab * 31 + rows)
    cases = {
        "random": torch.randn(rows, vocab, generator=g),
        "ties": torch.randint(0, 3, (rows, vocab), generator=g).float(),  # many maxima: the first one counts
        "bf16 values": torch.randn(rows, vocab, generator=g).bfloat16().float(),
        "all -inf": torch.full((rows, vocab), float("-inf")),
    }
    last = torch.randn(rows, vocab, generator=g)
    last[:, -1] = 100  # the last column, in the ragged last block
    last[: rows // 2, vocab // 3] = 100  # ... or an earlier tie
    cases["last column"] = last
    nan = torch.randn(rows, vocab, generator=g)
    nan[:, torch.randint(0, vocab, (3,), generator=g)] = float("nan")
    nan[0, -1] = float("nan")
    cases["NaN"] = nan
    for name, logits in cases.items():
        assert torch.equal(first_argmax(logits), logits.argmax(-1)), name
