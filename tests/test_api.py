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


def test_open_model_streams_events_and_stop_ends_the_reply(steered_dir, looping_dir):
    """The one model interface (events.py): Start before the model runs, deltas with their token counts, Done last;
    stop() ends generation at the next token with finish_reason 'interrupted' and the partial text kept."""
    import steered

    from r1cli.engine import open_model
    from r1cli.events import AnswerDelta, Done, ReasoningDelta, Start
    from r1cli.options import ModelOptions

    m = open_model(ModelOptions(str(steered_dir), "cpu", max_context=256))
    events = list(m.chat([{"role": "user", "content": "How many pears?"}], None, {}))
    start, done = events[0], events[-1]
    assert isinstance(start, Start) and isinstance(done, Done) and start.max_len == m.context == 256
    assert start.prompt_tokens == done.stats.prompt_tokens and start.starts_in_thinking
    deltas = events[1:-1]
    assert all(isinstance(e, (ReasoningDelta, AnswerDelta)) for e in deltas)
    counts = [e.tokens for e in deltas]
    assert counts == sorted(counts) and counts[-1] == done.stats.completion_tokens  # progress, as it streams
    assert "".join(e.text for e in deltas if isinstance(e, AnswerDelta)).strip() == steered.ANSWER
    assert (done.stats.content.strip(), done.stats.finish_reason) == (steered.ANSWER, "stop")
    again = list(m.chat([{"role": "user", "content": "How many pears?"}], None, {}))
    assert again[0].cached_tokens == again[-1].stats.cached_tokens > 0  # the same prompt: its prefix is reused

    looping = open_model(ModelOptions(str(looping_dir), "cpu", max_context=512))
    stream = looping.chat([{"role": "user", "content": "hi"}], None, {"max_tokens": 400, "repeat_guard": False})
    seen = []
    for event in stream:
        seen.append(event)
        if isinstance(event, ReasoningDelta) and event.tokens >= 5:
            stream.stop()
    stats = seen[-1].stats
    assert isinstance(seen[-1], Done) and stats.finish_reason == "interrupted"
    assert stats.completion_tokens == 5 and stats.reasoning == "".join(
        e.text for e in seen if isinstance(e, ReasoningDelta))

    calls = []

    def handle(event):  # Ctrl-C in the consumer's own code, on the third delta
        calls.append(event)
        if len([e for e in calls if isinstance(e, ReasoningDelta)]) == 3 and not isinstance(event, Done):
            raise KeyboardInterrupt

    stream = looping.chat([{"role": "user", "content": "hi"}], None, {"max_tokens": 400, "repeat_guard": False})
    stats = stream.drive(handle)
    assert stats.finish_reason == "interrupted" and 3 <= stats.completion_tokens < 10
    assert isinstance(calls[-1], Done) and calls[-1].stats is stats
