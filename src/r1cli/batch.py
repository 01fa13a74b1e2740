"""Many sequences at once (continuous batching): the batched engine behind `r1 run -n` and `r1 eval`.

One KV cache with a row per sequence, each row at its own length. A step decodes one token for every sequence
that has one to feed, in one forward (`CausalLM.decode_rows`: the weights are read once for all of them), and
prefills at most `prefill_chunk` prompt tokens of the sequences still reading their prompts, so a long prompt
never stalls the others for more than a chunk. Sequences join when a row is free and leave when they stop, at
step boundaries. Each samples with its own parameters and seed through `generate.sample`, so a sequence gives
the tokens it would give alone in `generate.Decoder` (greedy, float32: tested). Sequences submitted with the
same prompt at the same time share its prefill: the first one's cache row is copied to the others; a new
sequence takes the free row whose cached tokens share the longest prefix with its prompt (a conversation's next
turn), but only within one `share` group (serve: one API key).

Tensor parallel (the model has a `shard`): rank 0's engine decides everything (admission, chunks, sampling)
and sends each cache operation it is about to run (a decode step's tokens and positions, a prefill chunk, a
prefill copy) to the other ranks, whose `follow()` runs the same forward with it: the model's collectives pair up
in order. Only rank 0 samples; the tokens reach the others inside the next decode step's operation.

Front ends read sequences as events (`stream()`: a SequenceStream, the events.EventStream of the one-sequence
path, made by the same reply.Reply) and drive many at once with `events()`; `submit`/`step` give raw token ids.

The batch-1 `Decoder` is untouched; this engine is built beside it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import R1Error
from .events import Done, Event, EventStream
from .generate import GenerationStats, SamplingParams, sample
from .models import CausalLM
from .models.cache import RowCache, row_view
from .reply import Reply, start_event


@dataclass(eq=False)
class Sequence:
    """One prompt's generation. `tokens` grows as the engine samples (a stop token is not added); when it ends,
    `finish_reason` is stop | length | interrupted and `stats` is complete."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int] = frozenset()
    tag: object = None  # the caller's (an index, a request)
    share: object = None  # who may share KV with this sequence (serve: the API key): prefill copies, row prefixes
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    # engine state
    row: int = -1
    pos: int = 0  # cache slots this sequence has filled
    pending: int | None = None  # the last sampled token, fed at the next decode step
    sampled: int = 0  # draws so far, a stop token included (the budget counts it, as Decoder's does)
    budget: int = 0
    generator: torch.Generator | None = None
    guard: object = None  # generate.RepetitionGuard when params.repeat_guard (main's repetition guard)
    seen: torch.Tensor | None = None  # [vocab] mask of the tokens repetition_penalty applies to
    t_submit: float = 0.0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def first_argmax(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """`logits.argmax(-1)` for [R, V] logits, the same index (the first maximum; the first NaN, if any), faster on
    a CPU at a vocabulary's width: torch's argmax reduction is several times slower than its max (amax), so
    the row maximum is found by amax over blocks of `chunk` columns and argmax runs over one block per row."""
    v = logits.shape[1]
    if v <= 2 * chunk or logits.device.type != "cpu":  # (a GPU's argmax is not the slow part there: unmeasured)
        return logits.argmax(-1)
    full = v - v % chunk
    peaks = logits[:, :full].unflatten(1, (-1, chunk)).amax(-1)  # [R, blocks]
    if full < v:
        peaks = torch.cat([peaks, logits[:, full:].amax(-1, keepdim=True)], 1)
    # the first block holding the row's maximum (amax propagates NaN, and NaN is argmax's maximum)
    top = peaks.amax(-1, keepdim=True)
    block = ((peaks == top) | peaks.isnan()).int().argmax(-1)
    # that block's columns, clamped at the last one: a repeat of column v-1 comes after it, never first
    cols = (block[:, None] * chunk + torch.arange(chunk, device=logits.device)).clamp_(max=v - 1)
    return block * chunk + logits.gather(1, cols).argmax(-1)


class BatchEngine:
    """`submit` sequences, then `step()` (or iterate `run()`) until `idle`. At most `max_batch` decode together;
    more wait in a queue, in order."""

    def __init__(self, model: CausalLM, max_batch: int = 8, max_len: int | None = None, prefill_chunk: int = 256,
                 tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer  # for `stream()`: its stop ids, and the text of the events
        self.shard = model.shard  # tensor parallel: rank 0 steps, the others follow() (the module docstring)
        self.device = model.model.embed_tokens.weight.device
        self.max_batch = max_batch
        self.max_len = min(max_len or model.args.max_seq_len, model.args.max_seq_len)
        self.prefill_chunk = prefill_chunk
        self.cache = None  # allocated on first use: max_batch rows of max_len slots
        self.free_rows = set(range(max_batch))
        # per row: the tokens its cache slots hold, in order, and the share group that wrote them
        self.row_ids: list[list[int]] = [[] for _ in range(max_batch)]
        self.row_share: list[object] = [None] * max_batch
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._streams: dict[Sequence, SequenceStream] = {}  # the streams of unfinished sequences
        self._unstarted: deque[SequenceStream] = deque()  # streams not admitted yet (no Start), in submission order
        self._ready: dict[SequenceStream, None] = {}  # streams holding events not taken yet (an ordered set)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    @property
    def active(self) -> int:
        """Sequences submitted and not finished: decoding, prefilling or waiting for a row."""
        return len(self.running) + len(self.waiting)

    def stream(self, prompt, params: SamplingParams, share=None) -> SequenceStream:
        """Submit a rendered prompt (chat_format.PromptBuild), stopping at the tokenizer's eos; its reply as the
        events of the one-sequence path (engine.stream_events): Start once it has a row, then ReasoningDelta /
        AnswerDelta with the tokens so far, then Done. `stop()` ends this sequence alone."""
        if self.tokenizer is None:
            raise ValueError("this BatchEngine has no tokenizer: make it with one (OpenModel.batch) for event streams")
        seq = self.submit(prompt.ids, params, self.tokenizer.eos_ids, share=share)
        stream = SequenceStream(self, seq, prompt)
        self._streams[seq] = stream
        self._unstarted.append(stream)
        return stream

    def events(self) -> list[tuple[SequenceStream, Event]]:
        """One step (none when nothing runs), then every stream's events not taken yet, each stream's in order: the
        loop of a front end driving many streams (serve, `r1 run -n`, `r1 eval`)."""
        if not self.idle:
            self.step()
        return [(stream, event) for stream in list(self._ready) for event in stream.take()]

    def _route(self, events: list[tuple[Sequence, int | None]]) -> None:
        """A step's tokens and ends into their sequences' streams, after a Start for each one admitted."""
        while self._unstarted and (self._unstarted[0].started or self._unstarted[0].sequence.row >= 0
                                   or self._unstarted[0].sequence.done):
            self._unstarted.popleft().start()
        for seq, token in events:
            stream = self._streams.get(seq)
            if stream is None:
                continue
            if token is None:
                stream.end(seq.finish_reason)
            else:
                stream.put(stream.reply.feed(token))

    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids=frozenset(), tag=None,
               share=None) -> Sequence:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.max_len:
            raise R1Error(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_len}")
        seq = Sequence(list(prompt_ids), params, frozenset(stop_ids), tag, share)
        seq.budget = min(params.max_tokens, self.max_len - len(prompt_ids))
        seq.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        # The repetition guard and penalty of generate.py, read with getattr: this engine was written beside them.
        if getattr(params, "repeat_guard", False):
            from .generate import RepetitionGuard

            seq.guard = RepetitionGuard()
        seq.t_submit = time.perf_counter()
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence now (its reader went away); its row is free at once."""
        if seq.done:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, "interrupted")
        if seq in self._streams:  # its stream ends too: the text it held, then Done
            self._streams[seq].end("interrupted")

    def run(self) -> Iterator[tuple[Sequence, int | None]]:
        """Step until idle; yields (sequence, token) per new token and (sequence, None) when one ends."""
        while not self.idle:
            yield from self.step()

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, int | None]]:
        """One decode forward for every sequence with a token to feed, then up to `prefill_chunk` prompt tokens
        of the sequences still prefilling. Returns the events, as `run` yields them."""
        if self.cache is None:
            self._run(("cache", self.max_batch, self.max_len))
        events: list[tuple[Sequence, int | None]] = []
        while self.waiting and self.free_rows:
            self._admit(self.waiting.popleft())
        self._decode(events)
        self._prefill(events)
        self._route(events)
        return events

    def _admit(self, seq: Sequence) -> None:
        """Into the free row holding the longest prefix of its prompt (same share group)."""
        def reuse(row: int) -> int:
            if self.row_share[row] != seq.share:
                return 0
            n = 0
            for a, b in zip(self.row_ids[row], seq.prompt_ids[:-1]):  # one prompt token must run for the logits
                if a != b:
                    break
                n += 1
            return n

        # ties: the row holding the fewest tokens (the least to lose), then the lowest
        row = max(self.free_rows, key=lambda r: (reuse(r), -len(self.row_ids[r]), -r))
        seq.row, seq.pos, seq.pending = row, reuse(row), None
        seq.stats.cached_tokens = seq.pos
        self.free_rows.discard(row)
        self.row_ids[row] = self.row_ids[row][: seq.pos]
        self.row_share[row] = seq.share
        self.running.append(seq)

    def _decode(self, events) -> None:
        decoding = [s for s in self.running if s.pending is not None]
        if not decoding:
            return
        by_row = {s.row: s for s in self.running}
        rows = max(s.row for s in decoding) + 1
        # Rows in range that do not decode (free, or still prefilling) get a dummy token past the tokens they hold
        # (a prefilling row's next chunk overwrites it): the step keeps one [rows] shape without gathering the cache.
        tokens = [0] * rows
        positions = [0] * rows
        for r in range(rows):
            s = by_row.get(r)
            if s is not None:
                positions[r] = s.pos
                if s.pending is not None:
                    tokens[r] = s.pending
            else:
                positions[r] = len(self.row_ids[r])
        attend = max(s.pos for s in decoding) + 1  # a row past it sees garbage it does not use
        t0 = time.perf_counter()
        logits = self._run(("decode", tokens, positions, attend))
        draws = self._sample(logits, decoding)
        dt = time.perf_counter() - t0
        for s, tok in zip(decoding, draws):
            s.pos += 1
            s.stats.decode_s += dt
            self._emit(s, tok, events)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One draw per sequence with its own parameters and generator; greedy rows in one argmax."""
        out: dict[int, int] = {}
        plain = lambda s: s.params.temperature <= 0 and getattr(s.params, "repetition_penalty", 1.0) == 1.0  # noqa: E731
        greedy = [s for s in seqs if plain(s)]
        if greedy:
            if logits.stride(0) == 0:  # one prompt's logits shared by its copies (_prefill): one row to scan
                out.update((s.row, tok) for s, tok in zip(greedy, first_argmax(logits[:1]).tolist() * len(greedy)))
            elif len(greedy) == logits.shape[0]:  # every row (the usual decode step): no copy of the rows
                toks = first_argmax(logits).tolist()
                out.update((s.row, toks[s.row]) for s in greedy)
            else:
                rows = torch.tensor([s.row for s in greedy], device=logits.device)
                out.update(zip((s.row for s in greedy), first_argmax(logits.index_select(0, rows)).tolist()))
        for s in seqs:
            if not plain(s):
                out[s.row] = int(sample(self._penalized(s, logits[s.row : s.row + 1]), s.params, s.generator))
        return [out[s.row] for s in seqs]

    def _penalized(self, s: Sequence, logits: torch.Tensor) -> torch.Tensor:
        """repetition_penalty over the prompt and every token fed since, as Decoder applies it."""
        penalty = getattr(s.params, "repetition_penalty", 1.0)
        if penalty == 1.0:
            return logits
        from .generate import penalize_repeats

        if s.seen is None:
            s.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            s.seen[torch.tensor([t for t in s.prompt_ids if t < logits.shape[-1]], device=logits.device)] = True
        elif s.pending is not None:
            s.seen[s.pending] = True  # the token this step fed
        return penalize_repeats(logits, s.seen, penalty)

    def _prefill(self, events) -> None:
        budget = self.prefill_chunk
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.done or seq.pending is not None or seq.pos >= len(seq.prompt_ids):
                continue
            t0 = time.perf_counter()
            part = seq.prompt_ids[seq.pos : seq.pos + budget]
            logits = self._run(("prefill", seq.row, seq.pos, part))
            seq.pos += len(part)
            budget -= len(part)
            seq.stats.prefill_s += time.perf_counter() - t0
            if seq.pos < len(seq.prompt_ids):
                continue
            twins = [seq] + self._share_prefill(seq)
            for s, tok in zip(twins, self._sample(logits.expand(self.max_batch, -1), twins)):
                s.stats.prefill_s = time.perf_counter() - s.t_submit  # time to first token, queue included
                self._emit(s, tok, events)

    def _share_prefill(self, seq: Sequence) -> list[Sequence]:
        """Sequences admitted with the same prompt and not started yet take a copy of `seq`'s filled cache row."""
        twins = [s for s in self.running if s is not seq and s.pos < seq.pos and s.pending is None and not s.done
                 and s.prompt_ids == seq.prompt_ids and s.share == seq.share]
        if twins:
            self._run(("copy", seq.row, [s.row for s in twins], seq.pos))
        for s in twins:
            s.pos = seq.pos
        return twins

    # --- the cache operations: rank 0 runs them and sends them to the other ranks, which follow -------------------

    def _run(self, op: tuple):
        """Run one cache operation here; tensor parallel, rank 0 first sends it to the other ranks (`follow`)."""
        if self.shard is not None:
            self.shard.command(("batch", op))
        return self._apply(op)

    def _apply(self, op: tuple):
        kind = op[0]
        if kind == "cache":  # rank 0's sizes: a default --parallel may differ between ranks (their free memory)
            _, self.max_batch, self.max_len = op
            self.cache = self.model.new_cache(self.max_batch, self.max_len)
            self.model.ensure_rope(self.max_len)
        elif kind == "decode":
            _, tokens, positions, attend = op
            rows = len(tokens)
            return self.model.decode_rows(torch.tensor(tokens, device=self.device).view(rows, 1),
                                          torch.tensor(positions, device=self.device), RowCache(self.cache, rows, attend))
        elif kind == "prefill":
            _, row, start, part = op
            feed = torch.tensor([part], device=self.device)
            return self.model(feed, start_pos=start, cache=row_view(self.cache, row), last_only=True)[:, -1]
        elif kind == "copy":  # a prompt's prefilled row into the rows of its copies
            _, src, dsts, n = op
            d = self.cache.slot_dim
            for dst in dsts:
                for layer in self.cache.layers:
                    for buf in layer:
                        buf[dst].narrow(d - 1, 0, n).copy_(buf[src].narrow(d - 1, 0, n))
        else:
            raise ValueError(f"unknown batch operation {kind!r}")

    @torch.inference_mode()
    def follow(self) -> int:
        """Ranks other than 0: run rank 0's cache operations until it says exit; return its exit code."""
        while True:
            command = self.shard.next_command()
            if command[0] == "exit":
                return command[1]
            self._apply(command[1])

    def _emit(self, seq: Sequence, tok: int, events) -> None:
        seq.sampled += 1
        if tok in seq.stop_ids:
            self._finish(seq, "stop")
        elif seq.guard is not None and seq.guard.add(tok):  # a reply stuck in a loop, as Decoder stops it
            self._finish(seq, "repetition")
        else:
            seq.tokens.append(tok)
            seq.stats.generated_tokens += 1
            events.append((seq, tok))
            if seq.sampled >= seq.budget:
                self._finish(seq, "length")
            else:
                seq.pending = tok
                return
        events.append((seq, None))

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.stats.finish_reason = reason
        seq.pending = None
        if seq.row >= 0:
            self.running.remove(seq)
            self.free_rows.add(seq.row)
            # what the row's slots hold: the prompt's tokens up to pos, then each sampled token fed back
            fed = (seq.prompt_ids + seq.tokens)[: seq.pos]
            self.row_ids[seq.row] = fed
            seq.row = -1


class SequenceStream(EventStream):
    """One sequence of a BatchEngine as an events.EventStream. Iterating it steps the engine when it has no event
    ready (the other sequences' events wait in their own streams); `stop(reason)` ends this sequence now (the text
    still held and Done come next); `close()` drops it (no Done). Made by `BatchEngine.stream`."""

    def __init__(self, engine: BatchEngine, seq: Sequence, prompt):
        self.engine, self.sequence, self.prompt = engine, seq, prompt
        self.reply = Reply(engine.tokenizer, prompt, t0=seq.t_submit)  # times count from submission, queue included
        self.buffer: deque[Event] = deque()
        self.started = self.ended = False
        super().__init__(SequenceStream._pull)

    def _pull(self):
        while True:
            if self.buffer:
                event = self.buffer.popleft()
                if not self.buffer:
                    self.engine._ready.pop(self, None)
                yield event
            elif self.ended:
                return
            else:
                try:
                    self.engine.step()
                except KeyboardInterrupt:  # Ctrl-C while the model runs: this reply ends, as engine.stream_events
                    self.stop("interrupted")

    def take(self) -> list[Event]:
        """The events ready now, without stepping the engine."""
        out = list(self.buffer)
        self.buffer.clear()
        self.engine._ready.pop(self, None)
        return out

    def put(self, events) -> None:
        if events:
            self.buffer.extend(events)
            self.engine._ready[self] = None

    def start(self) -> None:
        """Start, once the sequence has a row (its cached tokens known) or ended without one."""
        if not self.started:
            self.started = True
            self.put([start_event(self.prompt, self.sequence.stats.cached_tokens, self.engine.max_len)])

    def end(self, finish_reason: str) -> None:
        """The sequence is over: the text still held, then Done."""
        self.start()
        self.put(self.reply.finish())
        self.put([self.reply.done(self.sequence.stats, finish_reason, clock_rate=True)])
        self.ended = True
        self.engine._streams.pop(self.sequence, None)

    def stop(self, reason: str = "interrupted") -> None:
        super().stop(reason)
        if not self.ended:
            self.end(self.stop_reason)
            self.engine.cancel(self.sequence)

    def close(self) -> None:
        if not self.ended:
            self.engine._streams.pop(self.sequence, None)
            self.engine.cancel(self.sequence)
            self.ended = self.started = True  # no Start is owed to a dropped stream
        self.take()
        super().close()


def stream_many(engine: BatchEngine, prompt, params: list[SamplingParams]) -> Iterator[tuple[int, Event]]:
    """Several samples of one rendered prompt, decoded together (one shared prefill): yields (index, event) as the
    batch steps, each sample's events those of `engine.stream`. Ctrl-C ends every unfinished sample with
    finish_reason 'interrupted' (its partial text kept)."""
    streams = {engine.stream(prompt, p): i for i, p in enumerate(params)}
    left = len(streams)
    try:
        while left:
            for stream, event in engine.events():
                left -= isinstance(event, Done)
                yield streams[stream], event
    except KeyboardInterrupt:
        for stream in streams:
            stream.stop("interrupted")
        for stream, event in engine.events():
            yield streams[stream], event


MAX_DEFAULT_PARALLEL = {"cpu": 8, "cuda": 64}  # a CPU's decode stops gaining well before 16 streams


def free_memory(device: torch.device) -> int:
    """Bytes this process may still take on `device`: the GPU's free memory, or MemAvailable on Linux."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def default_parallel(kv_bytes_per_sequence: int, free_bytes: int, device_type: str) -> int:
    """`r1 serve --parallel` by default: as many sequences as half the free memory holds KV caches for (each a
    whole context long), at least 1 and at most MAX_DEFAULT_PARALLEL for the device."""
    fit = int(free_bytes * 0.5 // max(kv_bytes_per_sequence, 1))
    return max(1, min(MAX_DEFAULT_PARALLEL.get(device_type, 8), fit))
