"""One stream of generation events (reasoning delta, answer delta, done with stats) for `run`, `chat` and `serve`.

    for event in stream_events(generator, tokenizer, prompt, params):
        match event:
            case ReasoningDelta(text): ...
            case AnswerDelta(text): ...
            case Done(stats): ...
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Iterator, Union

from .chat_format import PromptBuild
from .generate import Generator, SamplingParams
from .reasoning import ReasoningSplitter
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class AnswerDelta:
    text: str


@dataclass
class TurnStats:
    reasoning: str = ""
    content: str = ""
    finish_reason: str = "length"  # stop | length | interrupted | repetition (generate.RepetitionGuard)
    truncated_in_thinking: bool = False  # the stream ended inside <think>: no answer was produced
    prompt_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    completion_tokens: int = 0  # reasoning and answer together, as OpenAI counts them
    ttft_ms: float = 0.0
    thinking_ms: float = 0.0
    total_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    acceptance_rate: float | None = None  # speculative decoding: drafted tokens accepted / drafted
    tokens_per_step: float | None = None  # and tokens per target forward

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Done:
    stats: TurnStats


Event = Union[ReasoningDelta, AnswerDelta, Done]


def stream_events(
    generator: Generator, tokenizer: Tokenizer, prompt: PromptBuild, params: SamplingParams
) -> Iterator[Event]:
    """Generate from a rendered prompt and split the output into reasoning and answer as it streams.

    Ctrl-C while the model runs ends the stream with `Done` (finish_reason 'interrupted', partial text kept). A
    consumer interrupted in its own code can `stream.throw(KeyboardInterrupt)` to get that same `Done` back; a
    plain `.close()` (a client that went away) just stops generating."""
    splitter = ReasoningSplitter(
        start_in_thinking=prompt.starts_in_thinking,
        think_start_id=tokenizer.think_start_id,
        think_end_id=tokenizer.think_end_id,
    )
    decoder = tokenizer.stream_decoder()
    t0 = time.perf_counter()
    first_token_at = answer_at = None
    tokens = generator.generate(prompt.ids, params, stop_ids=tokenizer.eos_ids)
    interrupted = False
    try:
        for token in tokens:
            if first_token_at is None:
                first_token_at = time.perf_counter()
            for delta in splitter.feed(decoder.add(token), token_id=token):
                if delta.kind == "answer" and answer_at is None:
                    answer_at = time.perf_counter()
                yield AnswerDelta(delta.text) if delta.kind == "answer" else ReasoningDelta(delta.text)
    except KeyboardInterrupt:
        interrupted = True
        tokens.close()
    for delta in splitter.finish(decoder.flush()):
        yield AnswerDelta(delta.text) if delta.kind == "answer" else ReasoningDelta(delta.text)
    g = generator.stats
    end = time.perf_counter()
    stats = TurnStats(
        reasoning=splitter.reasoning_text,
        content=splitter.answer_text,
        finish_reason="interrupted" if interrupted else g.finish_reason,
        truncated_in_thinking=splitter.truncated_in_thinking,
        prompt_tokens=g.prompt_tokens,
        cached_tokens=g.cached_tokens,
        reasoning_tokens=splitter.reasoning_tokens,
        completion_tokens=g.generated_tokens,
        ttft_ms=1000 * ((first_token_at or end) - t0),
        thinking_ms=1000 * ((answer_at or end) - t0) if (prompt.starts_in_thinking or splitter.reasoning_tokens) else 0.0,
        total_ms=1000 * (end - t0),
        decode_tokens_per_s=g.decode_tokens_per_s,
        acceptance_rate=getattr(g, "acceptance_rate", None),
        tokens_per_step=getattr(g, "tokens_per_step", None) if getattr(g, "draft_tokens", 0) else None,
    )
    yield Done(stats)
