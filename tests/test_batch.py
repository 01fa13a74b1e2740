"""The batched engine (batch.py): each sequence of a batch gives the tokens it gives alone in the batch-1
Decoder (greedy and seeded sampling, float32), with sequences of different lengths joining and leaving mid-way,
prompts prefilled in chunks, and a shared prefill for copies of one prompt."""

from __future__ import annotations

import pytest
import torch

from r1cli.batch import BatchEngine
from r1cli.generate import Decoder, SamplingParams
from r1cli.loader import load_model
from tiny import llama_config, qwen2_config, v2_config, v3_config, write_checkpoint

VARIANTS = {
    "llama": lambda: llama_config(),
    "qwen2-sliding-window": lambda: qwen2_config(use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "v3": lambda: v3_config(),
    "v2": lambda: v2_config(),
}

PROMPTS = [
    [5, 17, 42, 99, 3, 250, 8],
    [7, 1, 300],
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33],
    [200],
    [64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74],
    [9, 8, 7, 6, 5],
]
MAX_TOKENS = [12, 20, 6, 16, 9, 14]  # different lengths: sequences leave at different steps


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    write_checkpoint(VARIANTS[request.param](), folder)
    return load_model(folder, dtype="float32")


def alone(model, prompt, params, prefill_chunk, stop_ids=frozenset()):
    gen = Decoder(model, max_len=128, prefill_chunk=prefill_chunk)
    return list(gen.generate(prompt, params, stop_ids)), gen.stats.finish_reason


def test_greedy_batch_equals_each_alone(model):
    """Three rows for six sequences: the later ones join as earlier ones leave; prompts longer than the chunk
    are prefilled over several steps while the others decode."""
    chunk = 8
    engine = BatchEngine(model, max_batch=3, max_len=128, prefill_chunk=chunk)
    seqs = [engine.submit(p, SamplingParams(temperature=0, max_tokens=n)) for p, n in zip(PROMPTS, MAX_TOKENS)]
    steps = 0
    joined_while_decoding = False
    while not engine.idle:
        before = {s.row for s in engine.running if s.pending is not None}
        engine.step()
        steps += 1
        joined_while_decoding |= bool(before) and any(s.pos and s.pending is None for s in engine.running)
    assert joined_while_decoding
    for seq, prompt, n in zip(seqs, PROMPTS, MAX_TOKENS):
        want, reason = alone(model, prompt, SamplingParams(temperature=0, max_tokens=n), chunk)
        assert seq.tokens == want
        assert seq.finish_reason == reason == "length"
    assert steps < sum(MAX_TOKENS)  # decoded together, not one after another


def test_stop_ids_and_seeded_sampling_equal_alone(model):
    """Each sequence samples with its own temperature/top-p/top-k and seed, and stops at its own stop ids."""
    params = [SamplingParams(temperature=0.6, top_p=0.95, seed=1, max_tokens=15),
              SamplingParams(temperature=1.0, top_k=20, seed=2, max_tokens=15),
              SamplingParams(temperature=0, max_tokens=15),
              SamplingParams(temperature=0.8, min_p=0.05, seed=3, max_tokens=15)]
    wants = [alone(model, p, sp, 256) for p, sp in zip(PROMPTS, params)]
    # a stop id each sequence meets mid-way when run alone
    stops = [frozenset({w[0][len(w[0]) // 2]}) for w in wants]
    wants = [alone(model, p, sp, 256, st) for p, sp, st in zip(PROMPTS, params, stops)]
    engine = BatchEngine(model, max_batch=4, max_len=128)
    seqs = [engine.submit(p, sp, st) for p, sp, st in zip(PROMPTS, params, stops)]
    events = list(engine.run())
    for seq, (tokens, reason) in zip(seqs, wants):
        assert seq.tokens == tokens and seq.finish_reason == reason == "stop"
        assert [t for s, t in events if s is seq] == tokens + [None]


def test_copies_of_one_prompt_share_the_prefill(model):
    """n samples of one prompt: one prefill, then each copy samples with its own seed, as it would alone."""
    engine = BatchEngine(model, max_batch=4, max_len=128)
    prompt = PROMPTS[2]
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=10) for s in range(4)]
    seqs = [engine.submit(prompt, p) for p in params]
    engine.step()  # admits all four: the first prefill serves every copy
    assert all(s.pos == len(prompt) and len(s.tokens) == 1 for s in seqs)
    list(engine.run())
    for seq, p in zip(seqs, params):
        assert seq.tokens == alone(model, prompt, p, 256)[0]
    assert len({tuple(s.tokens) for s in seqs}) > 1


def test_decode_rows_logits_match_the_single_sequence_forward(model):
    """The batched step's logits per row against each sequence's own cached forward."""
    prompts = PROMPTS[:3]
    engine = BatchEngine(model, max_batch=3, max_len=64)
    for p in prompts:
        engine.submit(p, SamplingParams(temperature=0, max_tokens=4))
    engine.step()  # prefills
    seqs = list(engine.running)
    with torch.inference_mode():
        from r1cli.models.cache import RowCache

        tokens = torch.tensor([[s.pending] for s in seqs])
        positions = torch.tensor([s.pos for s in seqs])
        got = model.decode_rows(tokens, positions, RowCache(engine.cache, 3, int(positions.max()) + 1))
        for i, s in enumerate(seqs):
            cache = model.new_cache(1, 64)
            model(torch.tensor([s.prompt_ids]), start_pos=0, cache=cache)
            want = model(torch.tensor([[s.pending]]), start_pos=len(s.prompt_ids), cache=cache)[:, -1]
            assert (got[i] - want[0]).abs().max().item() <= 1e-5


# --- r1 run -n ---------------------------------------------------------------------------------------------------


def test_run_n_prints_each_sample(steered_dir):
    import steered
    from typer.testing import CliRunner

    from r1cli.cli import app

    result = CliRunner().invoke(app, ["run", str(steered_dir), "-n", "3", "How many pears?"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "".join(f"--- sample {i}/3 ---\n{steered.ANSWER}\n" for i in (1, 2, 3))


def test_run_n_json_and_jsonl_one_record_each(steered_dir):
    import json

    import steered
    from typer.testing import CliRunner

    from r1cli.cli import app

    result = CliRunner().invoke(app, ["run", str(steered_dir), "-n", "2", "--json", "How many pears?"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [d["index"] for d in data] == [0, 1]
    assert all((d["reasoning"], d["content"], d["finish_reason"]) == (steered.REASONING, steered.ANSWER, "stop")
               for d in data)
    single = json.loads(CliRunner().invoke(app, ["run", str(steered_dir), "--json", "How many pears?"]).stdout)
    assert data[0]["usage"] == single["usage"]

    result = CliRunner().invoke(app, ["run", str(steered_dir), "-n", "2", "--jsonl", "How many pears?"])
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["event"] == "start"
    for i in (0, 1):
        mine = [e for e in events[1:] if e["index"] == i]
        assert "".join(e["text"] for e in mine if e["event"] == "answer") == steered.ANSWER
        assert "".join(e["text"] for e in mine if e["event"] == "reasoning") == steered.REASONING
        assert [e["event"] for e in mine].count("done") == 1 and mine[-1]["event"] == "done"


def test_next_turn_reuses_its_row_prefix_within_its_share_group(model):
    """A finished sequence's row keeps its tokens: a later prompt that extends them (a conversation's next turn)
    prefills only the rest, and gives the tokens it gives alone; another share group never reuses it."""
    engine = BatchEngine(model, max_batch=2, max_len=128, prefill_chunk=4)
    greedy = SamplingParams(temperature=0, max_tokens=8)
    first = engine.submit(PROMPTS[0], greedy, share="a")
    other = engine.submit(PROMPTS[1], greedy, share="b")
    list(engine.run())
    turn = PROMPTS[0] + first.tokens + [77, 78, 79]
    stranger = engine.submit(turn, greedy, share="b")
    mine = engine.submit(turn, greedy, share="a")
    list(engine.run())
    assert stranger.stats.cached_tokens == 0
    assert mine.stats.cached_tokens == len(PROMPTS[0]) + len(first.tokens) - 1  # the last sampled token was never fed
    want = alone(model, turn, greedy, 4)[0]
    assert mine.tokens == stranger.tokens == want
    assert other.tokens == alone(model, PROMPTS[1], greedy, 4)[0]


def test_default_parallel_from_free_memory_and_kv_size():
    from r1cli.batch import default_parallel

    gb = 1 << 30
    assert default_parallel(gb, 10 * gb, "cpu") == 5  # half of 10 GB holds five 1 GB caches
    assert default_parallel(gb, 100 * gb, "cpu") == 8 and default_parallel(gb, 1000 * gb, "cuda") == 64
    assert default_parallel(gb, gb, "cpu") == 1 and default_parallel(gb, 0, "cuda") == 1


# --- the batched streams: the events of the one-sequence path --------------------------------------------------


@pytest.fixture(scope="module")
def random_r1_dir(tmp_path_factory):
    """A tiny random Qwen2 with the real R1 tokenizer: greedy, it writes arbitrary tokens (multi-byte pieces,
    specials), so the event texts of the two paths are compared on more than one steered chain."""
    import shutil

    import steered

    folder = tmp_path_factory.mktemp("random-r1")
    write_checkpoint(qwen2_config(vocab_size=151936, num_hidden_layers=2), folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(steered.r1_tokenizer_dir() / name, folder / name)
    return folder


def _comparable(events):
    """What both paths must agree on: every event but Done as is (types, texts, token counts); Done's numbers
    but its timings."""
    from r1cli.events import Done

    timing = ("ttft_ms", "thinking_ms", "total_ms", "decode_tokens_per_s")
    return [(type(e), e.text, e.tokens) if hasattr(e, "text") else
            {k: v for k, v in e.stats.to_dict().items() if k not in timing} if isinstance(e, Done) else e
            for e in events]


@pytest.mark.parametrize("which", ["steered", "random"])
def test_batched_stream_events_equal_the_single_path(which, steered_dir, random_r1_dir):
    """OpenModel.batch(...).stream gives, for one prompt, the events OpenModel.stream gives (greedy, float32):
    Start, the reasoning and answer deltas with their texts and token counts, Done's text, counts and
    finish_reason, while another sequence decodes beside it (its own events waiting in its stream)."""
    from r1cli.chat_format import build_prompt
    from r1cli.engine import open_model
    from r1cli.events import AnswerDelta, Done, ReasoningDelta, Start
    from r1cli.options import ModelOptions

    folder = steered_dir if which == "steered" else random_r1_dir
    m = open_model(ModelOptions(str(folder), "cpu", dtype="float32", max_context=256))
    params = m.sampling({"temperature": 0, "max_tokens": 40})
    ask = lambda text: build_prompt(m.tokenizer, [{"role": "user", "content": text}], family=m.family)  # noqa: E731
    prompt, other = ask("How many pears?"), ask("Count the apples in the basket, then the pears, then both.")
    alone = list(m.stream(prompt, params))
    m.forget()  # a fresh cache, as a fresh engine's rows
    alone_other = list(m.stream(other, params))

    engine = m.batch(2)
    beside = engine.stream(other, params)
    mine = engine.stream(prompt, params)
    batched = list(mine)  # iterating steps the engine; the other sequence's events wait in `beside`
    batched_other = list(beside)

    assert isinstance(batched[0], Start) and isinstance(batched[-1], Done)
    assert all(isinstance(e, (ReasoningDelta, AnswerDelta)) for e in batched[1:-1])
    assert _comparable(batched) == _comparable(alone)
    assert _comparable(batched_other) == _comparable(alone_other)
    if which == "steered":
        assert any(isinstance(e, ReasoningDelta) for e in batched) and any(isinstance(e, AnswerDelta) for e in batched)
        assert batched[-1].stats.finish_reason == "stop"


def test_batched_stream_stop_ends_that_sequence_alone(looping_dir):
    """stop() ends one batched sequence at once, with its finish_reason and the partial text kept; the other
    sequences go on. Ctrl-C in the consumer's code (EventStream.drive) ends a batched stream as it ends a single
    one. close() drops a sequence with no Done."""
    from r1cli.chat_format import build_prompt
    from r1cli.engine import open_model
    from r1cli.events import Done, ReasoningDelta
    from r1cli.options import ModelOptions

    m = open_model(ModelOptions(str(looping_dir), "cpu", dtype="float32", max_context=256))
    prompt = build_prompt(m.tokenizer, [{"role": "user", "content": "hi"}], family=m.family)
    params = m.sampling({"max_tokens": 30, "repeat_guard": False})
    engine = m.batch(3)
    streams = [engine.stream(prompt, params) for _ in range(3)]
    seen = {s: [] for s in streams}
    while not engine.idle or any(s.buffer for s in streams):
        for stream, event in engine.events():
            seen[stream].append(event)
            if stream is streams[0] and isinstance(event, ReasoningDelta) and event.tokens == 5:
                stream.stop("stop")
            if stream is streams[2] and isinstance(event, ReasoningDelta) and event.tokens == 3:
                stream.close()
    first, second, dropped = (seen[s] for s in streams)
    assert isinstance(first[-1], Done) and first[-1].stats.finish_reason == "stop"
    assert first[-1].stats.completion_tokens == 5
    assert first[-1].stats.reasoning == "".join(e.text for e in first if isinstance(e, ReasoningDelta)).strip()
    assert isinstance(second[-1], Done) and second[-1].stats.finish_reason == "length"
    assert second[-1].stats.completion_tokens == 30
    assert not any(isinstance(e, Done) for e in dropped) and max(e.tokens for e in dropped[1:]) == 3

    calls = []

    def handle(event):  # Ctrl-C in the consumer's own code, on the third delta
        calls.append(event)
        if len([e for e in calls if isinstance(e, ReasoningDelta)]) == 3 and not isinstance(event, Done):
            raise KeyboardInterrupt

    stats = m.batch(1).stream(prompt, params).drive(handle)
    assert stats.finish_reason == "interrupted" and stats.completion_tokens == 3
    assert isinstance(calls[-1], Done) and calls[-1].stats is stats


def test_kv_bytes_per_token_is_what_the_batch_cache_allocates(steered_dir):
    """OpenModel.kv_bytes_per_token (serve's default --parallel counts with it) against the bytes the batch's
    KV cache really takes per row and slot."""
    from r1cli.engine import open_model
    from r1cli.options import ModelOptions

    m = open_model(ModelOptions(str(steered_dir), "cpu", max_context=64))
    engine = m.batch(3)
    engine.step()  # allocates the cache
    allocated = sum(buf.numel() * buf.element_size() for layer in engine.cache.layers for buf in layer)
    assert allocated == 3 * 64 * m.kv_bytes_per_token
    assert 1 <= m.default_parallel() <= 8
