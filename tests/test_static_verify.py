"""The static multi-token forward (models/base.py `_static_decode` with T tokens: the speculative verify with fixed
shapes) against the eager int-start_pos forward, for every family, logits and cache contents; and the speculative
decoder through it (decode mode 'static', the CPU-testable form of the GPU's captured verify) giving plain
decoding's greedy tokens, with a draft model and with DeepSeek's MTP layer."""

from __future__ import annotations

import pytest
import torch
from test_speculative import v3_mtp  # noqa: F401 - the fixture: a tiny V3 checkpoint with an MTP layer
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
@pytest.mark.parametrize("T", [1, 4])
def test_static_forward_of_a_left_padded_batch_equals_eager(models, name, T):
    """Rows of a left-padded batch: rotary positions count each row's real tokens, padding is never attended."""
    model = models[name]
    prompt, feed = random_tokens(16, 9).view(2, 8), random_tokens(2 * T, 10).view(2, T)
    padding = torch.ones(2, 8, dtype=torch.bool)
    padding[1, :3] = False  # the second row's prompt is 5 tokens long
    with torch.inference_mode():
        caches = [model.new_cache(2, 32) for _ in range(2)]
        for cache in caches:
            model(prompt, cache=cache, padding_mask=padding)
        want = model(feed, start_pos=8, cache=caches[0])
        caches[1].view_len = 16
        got = model(feed, start_pos=torch.tensor([8]), cache=caches[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


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


# --- speculative decoding through the static verify ------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 320, (n,), generator=g).tolist() for n in (5, 17)]


@pytest.fixture(scope="module")
def qwen_target_and_draft(tmp_path_factory):
    target, draft = tmp_path_factory.mktemp("target"), tmp_path_factory.mktemp("draft")
    write_checkpoint(qwen2_config(hidden_size=128, intermediate_size=256), target, seed=1)
    write_checkpoint(qwen2_config(hidden_size=64, num_hidden_layers=1), draft, seed=2)
    return load_model(target, dtype="float32"), load_model(draft, dtype="float32")


def noisy(model, scale, seed=3):
    """A copy of `model` with noise on every weight: a draft that agrees often but not always."""
    import copy

    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return model


def plain(model, prompt, params=GREEDY):
    return list(Decoder(model, 256, decode_mode="eager").generate(prompt, params))


@pytest.mark.parametrize("draft_kind", ["noisy", "other"])
def test_greedy_with_the_static_verify_is_plain_decoding(qwen_target_and_draft, draft_kind):
    from r1cli.speculative import ModelDraft, SpeculativeDecoder

    target, other = qwen_target_and_draft
    draft = noisy(target, 0.1) if draft_kind == "noisy" else other
    spec = SpeculativeDecoder(Decoder(target, 256, decode_mode="static"), ModelDraft(draft, 256), max_k=4,
                              adaptive=False)
    assert spec.static
    p1, p2 = prompts()
    for prompt in (p1, p2, p1 + p2):  # the last one reuses the first turn's caches
        want = plain(target, prompt)
        got = list(spec.generate(prompt, GREEDY))
        assert got == want
        s = spec.stats
        assert s.draft_tokens > 0 and s.generated_tokens == len(want)
        if draft_kind == "noisy":  # some drafts rejected: the rollback was exercised
            assert 0 < s.accepted_tokens < s.draft_tokens
    # the verify ran through the target's fixed-shape step as k+1 = 5 tokens, the draft's steps through its own
    assert 5 in spec.target._step.inputs and 1 in spec.target._step.inputs
    assert spec.draft.step is not None and 1 in spec.draft.step.inputs


def test_eager_and_aot_modes_keep_the_eager_verify(qwen_target_and_draft):
    from r1cli.speculative import ModelDraft, SpeculativeDecoder

    target, other = qwen_target_and_draft
    for mode in ("eager", "aot"):
        spec = SpeculativeDecoder(Decoder(target, 256, decode_mode=mode), ModelDraft(other, 256))
        assert not spec.static and spec.draft.mode is None


@pytest.fixture(scope="module")
def v3_with_mtp(v3_mtp):  # noqa: F811 - the imported fixture, by name
    return load_model(v3_mtp, dtype="float32", mtp=True)


@pytest.mark.parametrize("T", [1, 3])
def test_static_mtp_forward_equals_eager(v3_with_mtp, T):
    model = v3_with_mtp
    model.ensure_rope(64)
    g = torch.Generator().manual_seed(8)
    tokens, hidden = torch.randint(0, 320, (1, 6 + T), generator=g), torch.randn(1, 6 + T, 128, generator=g)
    with torch.inference_mode():
        eager, static = model.new_mtp_cache(64), model.new_mtp_cache(64)
        static.view_len = 32
        for pos, n in ((0, 6), (6, T)):  # from slot 0 (no embedding there), then T more
            want, want_h = model.mtp_forward(tokens[:, pos : pos + n], hidden[:, pos : pos + n], pos, eager)
            got, got_h = model.mtp_forward(tokens[:, pos : pos + n], hidden[:, pos : pos + n], torch.tensor([pos]),
                                           static)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-5)
    for a, b in zip(static.layers[0], eager.layers[0]):
        torch.testing.assert_close(a[:, : 6 + T], b[:, : 6 + T], rtol=1e-5, atol=1e-5)


def test_greedy_with_mtp_and_the_static_verify_is_plain_decoding(v3_with_mtp):
    from r1cli.speculative import MTPDraft, SpeculativeDecoder

    model = v3_with_mtp
    spec = SpeculativeDecoder(Decoder(model, 256, decode_mode="static"), MTPDraft(model, 256))
    p1, p2 = prompts()
    for prompt in (p1, p2, p1 + p2):
        want = plain(model, prompt)
        got = list(spec.generate(prompt, GREEDY))
        assert got == want
        assert 0 < spec.stats.draft_tokens
    assert spec.draft.step is not None and 1 in spec.draft.step.inputs
    assert any(T > 1 for T in spec.target._step.inputs)
