"""One reply's tokens turned into events, the same way for every engine: the Start event, the token ids
detokenised as they stream, split into reasoning and answer (reasoning.ReasoningSplitter) into ReasoningDelta /
AnswerDelta events with the tokens generated so far, timed, and closed by a Done with its TurnStats.

Shared by engine.stream_events (one sequence, generate.Decoder) and batch.BatchEngine's streams (many at once),
so the split, the counts and the stats are made in one place. Imports no torch."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .events import AnswerDelta, Done, ReasoningDelta, Start, TurnStats
from .reasoning import ReasoningSplitter

if TYPE_CHECKING:
    from .chat_format import PromptBuild
    from .generate import GenerationStats


def start_event(prompt: PromptBuild, cached_tokens: int, max_len: int) -> Start:
    """The first event of a reply to `prompt`, before (or as) the model starts on it."""
    return Start(prompt_tokens=len(prompt.ids), cached_tokens=cached_tokens, max_len=max_len,
                 notices=tuple(prompt.notices), starts_in_thinking=prompt.starts_in_thinking)


class Reply:
    """The text of one reply as its tokens arrive: `feed(token)` returns its deltas, `finish()` the text still held,
    `done(stats, finish_reason)` the Done event. Times count from `t0` (now, unless given)."""

    def __init__(self, tokenizer, prompt: PromptBuild, t0: float | None = None):
        self.splitter = ReasoningSplitter(start_in_thinking=prompt.starts_in_thinking,
                                          think_start_id=tokenizer.think_start_id,
                                          think_end_id=tokenizer.think_end_id)
        self.text = tokenizer.stream_decoder()
        self.starts_in_thinking = prompt.starts_in_thinking
        self.t0 = time.perf_counter() if t0 is None else t0
        self.first_token_at: float | None = None
        self.answer_at: float | None = None
        self.tokens = 0  # generated so far: each delta carries the count

    def _deltas(self, parts) -> list[ReasoningDelta | AnswerDelta]:
        out = []
        for delta in parts:
            if delta.kind == "answer" and self.answer_at is None:
                self.answer_at = time.perf_counter()
            out.append((AnswerDelta if delta.kind == "answer" else ReasoningDelta)(delta.text, self.tokens))
        return out

    def feed(self, token: int) -> list[ReasoningDelta | AnswerDelta]:
        """The deltas one generated token makes (often one, none while a tag or a character is incomplete)."""
        self.tokens += 1
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        return self._deltas(self.splitter.feed(self.text.add(token), token_id=token))

    def finish(self) -> list[ReasoningDelta | AnswerDelta]:
        """The text still held back when generation ends (a partial tag, trailing bytes)."""
        return self._deltas(self.splitter.finish(self.text.flush()))

    def done(self, g: GenerationStats, finish_reason: str, clock_rate: bool = False) -> Done:
        """The last event: the split text and `g`'s counts (the engine's GenerationStats). `clock_rate`: the decode
        rate is the tokens after the first over the time since it came (a batched sequence shares its steps with
        others), not g's own rate."""
        sp, end = self.splitter, time.perf_counter()
        thinking = self.starts_in_thinking or sp.reasoning_tokens
        rate = g.decode_tokens_per_s
        if clock_rate:
            seconds = end - (self.first_token_at or end)
            rate = (self.tokens - 1) / seconds if self.tokens > 1 and seconds > 0 else 0.0
        return Done(TurnStats(
            reasoning=sp.reasoning_text,
            content=sp.answer_text,
            finish_reason=finish_reason,
            truncated_in_thinking=sp.truncated_in_thinking,
            prompt_tokens=g.prompt_tokens,
            cached_tokens=g.cached_tokens,
            reasoning_tokens=sp.reasoning_tokens,
            completion_tokens=g.generated_tokens,
            ttft_ms=1000 * ((self.first_token_at or end) - self.t0),
            thinking_ms=1000 * ((self.answer_at or end) - self.t0) if thinking else 0.0,
            total_ms=1000 * (end - self.t0),
            decode_tokens_per_s=rate,
            acceptance_rate=g.acceptance_rate,
            tokens_per_step=g.tokens_per_step if g.draft_tokens else None,
        ))
