"""The one model interface every front end consumes (`r1 run`, `chat`, `serve`, the remote client, the Python API):
a reply is an `EventStream` of events that carry their own progress, and `stop()` ends it.

    stream = model.chat(messages, system, sampling)    # engine.OpenModel or remote.RemoteModel (ChatModel)
    for event in stream:
        match event:
            case Start(prompt_tokens, cached_tokens, max_len, notices): ...
            case ReasoningDelta(text, tokens): ...
            case AnswerDelta(text, tokens): ...
            case Done(stats): ...                     # always last; stats.finish_reason says why it ended

Ctrl-C while the model runs ends the stream with `Done` (finish_reason 'interrupted', partial text kept); a consumer
interrupted in its own code calls `stop()` (what `drive` does) and reads on to that same `Done`. Imports no torch:
the remote chat client is pure HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol, Union


@dataclass(frozen=True)
class Start:
    """First event of a reply, before the model runs. A remote server tells none of these before the reply ends:
    None there (its Done carries the usage)."""

    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens whose KV the cache already held (the previous turn's prefix)
    max_len: int | None = None  # the context length (tokens the KV cache holds)
    notices: tuple[str, ...] = ()  # what the prompt's rendering wants the user to know (chat_format.PromptBuild)
    starts_in_thinking: bool = False  # the prompt opened <think>: the first tokens are reasoning


@dataclass(frozen=True)
class ReasoningDelta:
    text: str
    tokens: int = field(default=0, compare=False)  # tokens generated so far in this reply, reasoning and answer


@dataclass(frozen=True)
class AnswerDelta:
    text: str
    tokens: int = field(default=0, compare=False)  # tokens generated so far in this reply, reasoning and answer


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


Event = Union[Start, ReasoningDelta, AnswerDelta, Done]


class EventStream:
    """One reply: an iterator of events (Start, deltas, Done last) with `stop()`.

    `produce(stream)` makes the events; it checks `stream.stop_reason` between steps and, once set, stops
    generating, sends the text it still holds and a Done with that finish_reason. `close()` abandons the reply
    (a client that went away): no Done."""

    def __init__(self, produce: Callable[[EventStream], Iterator[Event]]):
        self.stop_reason: str | None = None
        self._events = produce(self)

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def stop(self, reason: str = "interrupted") -> None:
        """End generation at the next step; the stream goes on to its Done (finish_reason `reason`: 'interrupted',
        or 'stop' for a stop string)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def close(self) -> None:
        self._events.close()

    def drive(self, handle: Callable[[Event], None]) -> TurnStats:
        """Hand each event to `handle` until Done; return its stats. Ctrl-C, in the model or in `handle`, ends the
        turn with finish_reason 'interrupted' and the partial text kept."""
        event = None
        while True:
            try:
                if event is None:
                    try:
                        event = next(self)
                    except StopIteration:  # the interrupt ended the stream before its Done
                        raise KeyboardInterrupt from None
                handle(event)
                if isinstance(event, Done):
                    return event.stats
                event = None
            except KeyboardInterrupt:
                if isinstance(event, Done):
                    return event.stats
                if self.stop_reason is not None and event is None:
                    raise  # stopped already and the stream is gone: nothing more will come
                self.stop("interrupted")
                event = None


class ChatModel(Protocol):
    """What a front end holds: a local model (engine.OpenModel) or a server (remote.RemoteModel)."""

    name: str

    def chat(self, messages: list[dict], system: str | None, sampling: dict) -> EventStream:
        """Stream one reply to `messages` (user and assistant turns, answers only); `sampling`: SamplingParams
        fields given (None: the model's default). A prompt that cannot be rendered raises R1Error here."""
        ...

    def sampling(self, overrides: dict):
        """The sampling settings a reply would use with `overrides` (an object with SamplingParams' fields)."""
        ...
