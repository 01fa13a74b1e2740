"""The public API the README documents: `from r1cli import load`, the full forward and the cached forward."""

from __future__ import annotations

import torch

from r1cli import load
from r1cli.tokenizer import Tokenizer


def test_load_returns_model_and_tokenizer(steered_dir):
    model, tokenizer = load(str(steered_dir), device="cpu", dtype="float32")
    assert isinstance(tokenizer, Tokenizer) and tokenizer.bos_id == 151646
    ids = torch.tensor([tokenizer.encode("Hello there, how are you?")])
    logits = model(ids)
    assert logits.dtype == torch.float32 and logits.shape == (1, ids.shape[1], model.args.vocab_size)
    cache = model.new_cache(batch_size=1, max_len=32)
    first = model(ids[:, :4], start_pos=0, cache=cache)
    rest = model(ids[:, 4:], start_pos=4, cache=cache)
    assert torch.allclose(torch.cat([first, rest], dim=1), logits, atol=1e-4)


def test_load_unknown_name_is_a_clear_error(tmp_path, monkeypatch):
    import pytest

    from r1cli.errors import ModelNotFoundError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as e:
        load("deepseek-r1:7b")
    assert "r1 pull deepseek-r1:7b" in str(e.value)
