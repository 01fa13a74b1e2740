"""The static multi-token forward (models/base.py `_static_decode` with T tokens: the speculative verify with fixed
shapes) against the eager int-start_pos forward, for every family, logits and cache contents; and the speculative
decoder through it (decode mode 'static', the CPU-testable form of the GPU's captured verify) giving plain
decoding's greedy tokens, with a draft model and with DeepSeek's MTP layer."""

from __future__ import annotations

import pytest
import torch
from tiny import llama_config, qwen2_config, v2_config, v3_config, write_checkpoint

from r1cli.generate import Decoder, SamplingParams
from r1cli.loader import load_model

FAMILIES = {
    "qwen2": lambda: qwen2_config(),
    # layers 1 and 2 slide over 5 slots: the verify's queries see different windows
    "qwen2-window": lambda: qwen2_config(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "llama": lambda: llama_config(),
    "v3": lambda: v3_config(),
    "v2": lambda: v2_config(),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, config in FAMILIES.items():
        folder = tmp_path_factory.mktemp(name)
        write_checkpoint(config(), folder, seed=7)
        out[name] = load_model(folder, dtype="float32")
    return out


def random_tokens(n, seed):
    return torch.randint(0, 320, (1, n), generator=torch.Generator().manual_seed(seed))


def prefilled(model, prompt, max_len=64):
    cache = model.new_cache(1, max_len)
    model.ensure_rope(max_len)
    model(prompt, cache=cache)
    return cache


def slot_view(cache, end):
    """Every layer's tensors over slots 0..end-1."""
    d = cache.slot_dim
    return [buf.narrow(d, 0, end) for layer in cache.layers for buf in layer]


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("T", [1, 2, 5, 9])
def test_static_forward_of_t_tokens_equals_eager(models, name, T):
    model = models[name]
    prompt, feed = random_tokens(11, 1), random_tokens(T, 2)
    with torch.inference_mode():
        eager_cache, static_cache = prefilled(model, prompt), prefilled(model, prompt)
        # stale slots past the verified tokens (a longer verify rolled back) must not be attended to
        model(random_tokens(12, 3), start_pos=torch.tensor([11 + T]), cache=static_cache)
        want = model(feed, start_pos=11, cache=eager_cache)
        static_cache.view_len = 32
        got = model(feed, start_pos=torch.tensor([11]), cache=static_cache)
    assert got.shape == want.shape == (1, T, 320)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(slot_view(static_cache, 11 + T), slot_view(eager_cache, 11 + T)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen2-window", "v3"])
def test_rolled_back_verify_is_overwritten_by_the_next(models, name):
    """A verify of 6 tokens of which 2 are kept (pos += 2), then the next verify from there: the logits are those
    of a clean cache holding only the kept tokens."""
    model = models[name]
    prompt, first, second = random_tokens(9, 4), random_tokens(6, 5), random_tokens(4, 6)
    with torch.inference_mode():
        cache = prefilled(model, prompt)
        cache.view_len = 32
        model(first, start_pos=torch.tensor([9]), cache=cache)
        got = model(second, start_pos=torch.tensor([11]), cache=cache)
        clean = prefilled(model, torch.cat([prompt, first[:, :2]], dim=1))
        want = model(second, start_pos=11, cache=clean)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(slot_view(cache, 15), slot_view(clean, 15)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

