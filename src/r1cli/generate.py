"""The prefill/decode loop: where a token is sampled. `Decoder` yields token ids; `engine.stream_events` turns them
into the stream of events (events.py) that `run`, `chat` and `serve` consume."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import torch

from . import compile_cache
from .cpu import compiled_cpu_default, one_token_step
from .models import Cache, CausalLM
from .quant_formats import uses_onednn
from .sampling import SamplingParams


@dataclass
class GenerationStats:
    """The engine's own numbers for one reply (`Decoder.stats`); front ends read them as events.TurnStats in Done."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused from the previous turn
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = "length"  # stop | length | interrupted | repetition

    @property
    def decode_tokens_per_s(self) -> float:
        # The first token comes from the prefill; the decode rate counts the tokens after it.
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    # speculative decoding (speculative.py): tokens the draft proposed, those the target accepted, target forwards
    draft_tokens: int = 0
    accepted_tokens: int = 0
    target_steps: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def tokens_per_step(self) -> float | None:
        return self.generated_tokens / self.target_steps if self.target_steps else None


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B], on the device (no host sync)."""
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    return draw(sampling_probs(logits, params), generator)


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [B, V] -> the distribution `sample` draws from (temperature > 0), [B, V] float32."""
    probs = (logits / params.temperature).softmax(dim=-1)
    if params.top_k > 0:
        kth = probs.topk(min(params.top_k, probs.shape[-1]), dim=-1).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    if params.top_p < 1.0:
        probs = _top_p_filter(probs, params.top_p)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` [B, V] (need not sum to 1)."""
    # Gumbel-style draw: argmax(p / Exp(1)) samples from p without torch.multinomial's host sync.
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019, as transformers' RepetitionPenaltyLogitsProcessor and
    llama.cpp's repeat_penalty): the logit of every token in `seen` (a [V] bool mask) is divided by `penalty` when
    positive and multiplied by it when negative, so a penalty above 1 makes a seen token less likely either way."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen[: logits.shape[-1]], penalized, logits)


class RepetitionGuard:
    """Notices a reply stuck in a loop: the last `min_span` tokens (or more) are an exact repetition with a period
    of at most `max_period` tokens, every token equal to the one `p` tokens before it. With 1024 and 256: a loop of
    a paragraph up to about 200 words, seen verbatim at least 4 times, or of a phrase, repeated for about 800
    words. A list, a table or code shares structure from line to line, but its numbers, names and values change,
    which breaks exact periodicity; a legitimate exact repeat (a row of 300 zeros: 900 tokens when each digit is
    a token, a divider) stays under 1024 tokens.

    Incremental and bounded: it keeps the positions of each token in the last `max_period` tokens, and for each
    period the length of its current run of matches, so a token costs one step per earlier occurrence of that token
    in the window (a handful in prose), never a scan of the reply."""

    def __init__(self, max_period: int = 256, min_span: int = 1024):
        self.max_period, self.min_span = max_period, min_span
        self.count = 0  # tokens seen
        self.window: deque[int] = deque()  # the last max_period tokens
        self.positions: dict[int, deque[int]] = {}  # token -> its positions in the window, oldest first
        # period p -> (how many tokens in a row equalled the one p before them, the position of the last one)
        self.runs: dict[int, tuple[int, int]] = {}
        self.period = 0  # the loop's period once tripped

    def add(self, token: int) -> bool:
        """Feed the next token; True once the tail is a loop."""
        n, runs, tripped = self.count, self.runs, []
        for pos in self.positions.get(token, ()):
            p = n - pos
            run, last = runs.get(p, (0, -2))
            run = run + 1 if last == n - 1 else 1  # a run of matches for period p goes on, or starts again
            runs[p] = (run, n)
            if run + p >= self.min_span:
                tripped.append(p)
        self.window.append(token)
        self.positions.setdefault(token, deque()).append(n)
        if len(self.window) > self.max_period:
            old = self.window.popleft()
            self.positions[old].popleft()
            if not self.positions[old]:
                del self.positions[old]
        self.count += 1
        if tripped:
            self.period = min(tripped)
        return bool(tripped)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose mass reaches top_p (the best token always stays)."""
    if probs.device.type == "cpu":
        # Sorting a 152k vocabulary's probabilities every token is slow on a CPU; the nucleus nearly always lies in
        # the top 1024, which topk finds far faster. Checked exactly (a CPU has no sync to avoid).
        k = min(1024, probs.shape[-1])
        top, order = probs.topk(k, dim=-1)
        if bool((top.sum(dim=-1) >= top_p).all()):
            drop = (top.cumsum(dim=-1) - top) > top_p
            return torch.zeros_like(probs).scatter_(-1, order, top.masked_fill(drop, 0.0))
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p
    return probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))


STOP = -1  # broadcast by rank 0 instead of a token when its reader stopped early (tensor parallel)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Turns:
    """What a decoder does with one turn, shared by Decoder and speculative.SpeculativeDecoder: check the prompt,
    reuse the cached prefix, and under tensor parallelism send rank 0's turn to the other ranks, which `follow()`.
    A subclass has `max_len`, `shard`, `cached_ids` and `_steps(prompt_ids, params, stop_ids, reuse)`."""

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int] | frozenset = frozenset()
    ) -> Iterator[int]:
        """Yield sampled token ids until a stop id (not yielded), max_tokens, or the context is full.
        `self.stats` describes the run when the iterator ends (finish_reason 'interrupted' if closed early)."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.max_len:
            from .errors import R1Error

            raise R1Error(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_len}")
        # at least one prompt token must run to get logits; rank 0's reuse goes to every rank, since reset()
        # (/clear, another API key) runs on rank 0 only
        reuse = common_prefix(self.cached_ids, prompt_ids[:-1])
        if self.shard is not None:
            self.shard.command(("generate", list(prompt_ids), params, frozenset(stop_ids), reuse))
        yield from self._steps(list(prompt_ids), params, frozenset(stop_ids), reuse)

    def follow(self) -> int:
        """Ranks other than 0: run rank 0's turns until it says exit; return its exit code."""
        while True:
            command = self.shard.next_command()
            if command[0] == "exit":
                return command[1]
            _, prompt_ids, params, stop_ids, reuse = command
            for _ in self._steps(prompt_ids, params, stop_ids, reuse):
                pass


class Decoder(Turns):
    """One model, one cache, reused across turns: a new prompt re-uses the cached prefix it shares with the
    previous prompt and its reply, up to the first differing token.

    Tensor parallel (the model has a `shard`): rank 0's `generate` first sends the other ranks the step to take
    (prompt, sampling, stop ids, reused prefix); they run it from `follow()`. Rank 0 draws every token and
    broadcasts it, so all ranks feed the same tokens in lockstep."""

    def __init__(
        self,
        model: CausalLM,
        max_len: int | None = None,
        decode_mode: str = "auto",
        prefill_chunk: int = 2048,
        notice=None,
    ):
        self.model = model
        device = model.model.embed_tokens.weight.device
        self.device = device
        self.uses_onednn = uses_onednn(model)
        self.shard = getattr(model, "shard", None)
        self.max_len = min(max_len or model.args.max_seq_len, model.args.max_seq_len)
        # Copy sampled ids to the host every few steps on accelerators, so the GPU runs ahead of Python. Tensor
        # parallel: every step, so that all ranks see an early stop (STOP) at the same step.
        self.sync_every = 1 if device.type == "cpu" or self.shard else 8
        aot_here = device.type == "cpu" and not self.shard  # (collectives do not export: eager when sharded)
        if decode_mode == "auto":
            # CUDA graphs around NCCL collectives are not tried yet (docs/distributed.md): eager when sharded.
            if device.type == "cuda" and not self.shard:
                decode_mode = "graph"
            else:
                from .aot_step import not_exportable

                decode_mode = "aot" if aot_here and compiled_cpu_default() and not not_exportable(model) else "eager"
        elif decode_mode == "compile" and aot_here:
            decode_mode = "aot-wait"
        if decode_mode not in ("eager", "static", "compile", "graph", "aot", "aot-wait"):
            raise ValueError(f"unknown decode mode {decode_mode}")
        # eager: attends over the filled slots only; static: fixed shapes over a bucket of the cache; graph:
        # static, captured as one CUDA graph per bucket and replayed per token; compile on CUDA: torch.compile'd
        # static step, captured too (see StaticDecoder); aot (a CPU's default) and compile on a CPU: the static
        # step compiled ahead of time and cached on disk, eager until it is built (aot) or after waiting for the
        # build (aot-wait), eager for good where it cannot be built (aot_step.py).
        self.decode_mode = decode_mode
        self.notice = notice
        self.prefill_chunk = prefill_chunk
        self._step = None  # the static decode step, built on first use
        self.cache: Cache | None = None
        self.cached_ids: list[int] = []  # the tokens whose keys and values the cache holds, in order
        self.stats = GenerationStats()

    def _ensure_cache(self) -> Cache:
        if self.cache is None:
            if self.decode_mode.startswith("aot"):
                # One spare slot, never used: the compiled step's attended span is then always a part of a buffer.
                # Not inference tensors (the export of the step writes to them outside inference mode).
                with torch.inference_mode(False):
                    self.cache = self.model.new_cache(1, self.max_len + 1)
                self.cache.max_len = self.max_len
            else:
                self.cache = self.model.new_cache(1, self.max_len)
            self.model.ensure_rope(self.max_len)
        return self.cache

    def reset(self) -> None:
        self.cached_ids = []

    def _decode(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [1, vocab] for one token at slot `pos`."""
        with one_token_step(self.uses_onednn, self.device):  # (the CPU's fastest kernels for one row: cpu.py)
            return self._decode_step(token, pos)

    def _decode_step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        if self.decode_mode == "eager":
            return self.model(token, start_pos=pos, cache=self.cache, last_only=True)[:, -1]
        if self._step is None:
            if self.decode_mode.startswith("aot"):
                from .aot_step import AotDecoder

                self._step = AotDecoder(self.model, self.cache, self.notice, wait=self.decode_mode == "aot-wait")
            else:
                self._step = StaticDecoder(self.model, self.cache, self.decode_mode)
        return self._step(token, pos)

    @torch.inference_mode()
    def _steps(self, prompt_ids: list[int], params: SamplingParams, stop_ids, reuse: int) -> Iterator[int]:
        cache = self._ensure_cache()
        leader = self.shard is None or self.shard.leader
        self.stats = stats = GenerationStats(prompt_tokens=len(prompt_ids), cached_tokens=reuse)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        budget = min(params.max_tokens, self.max_len - len(prompt_ids))
        guard = RepetitionGuard() if params.repeat_guard else None
        seen = None  # the tokens repetition_penalty applies to, as a [vocab] mask on the device
        t0 = time.perf_counter()
        feed = torch.tensor([prompt_ids[reuse:]], device=self.device)
        pos = reuse
        sampled: list[int] = []  # host copies of every sampled token, in order
        on_device: list[torch.Tensor] = []  # sampled but not yet copied to the host
        stats.finish_reason = "length"
        waiting = False  # rank 0 is paused at a yield: the other ranks are already in the next step
        try:
            while len(sampled) + len(on_device) < budget:
                if pos == reuse:  # the prompt (or its uncached tail): a prefill, in chunks to bound attention memory
                    for i in range(0, feed.shape[1], self.prefill_chunk):
                        part = feed[:, i : i + self.prefill_chunk]
                        logits = self.model(part, start_pos=pos + i, cache=cache, last_only=True)[:, -1]
                else:
                    logits = self._decode(feed, pos)
                pos += feed.shape[1]
                if params.repetition_penalty != 1.0:
                    if seen is None:
                        seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self.device)
                        in_vocab = [t for t in prompt_ids if t < seen.shape[0]]
                        seen[torch.tensor(in_vocab, dtype=torch.long, device=self.device)] = True
                    else:
                        seen[feed.view(-1)] = True  # the token just fed (the one sampled last step)
                    logits = penalize_repeats(logits, seen, params.repetition_penalty)
                if self.shard is None:
                    token = sample(logits, params, generator)
                else:  # rank 0's draw, on every rank
                    token = sample(logits, params, generator) if leader else torch.empty(1, dtype=torch.long, device=self.device)
                    self.shard.broadcast(token)
                on_device.append(token)
                feed = token.view(1, 1)
                n = len(sampled) + len(on_device)
                if n > 1 and len(on_device) < self.sync_every and n < budget:
                    continue  # the first token syncs at once (time to first token); later ones in batches
                new = torch.cat(on_device).tolist()
                on_device = []
                first = len(sampled)
                sampled.extend(new)
                if first == 0:
                    stats.prefill_s = time.perf_counter() - t0
                for tok in new:
                    if tok in stop_ids:
                        stats.finish_reason = "stop"
                        return
                    if tok == STOP:  # rank 0 stopped early (its reader went away)
                        sampled.pop()
                        stats.finish_reason = "interrupted"
                        return
                    if guard is not None and guard.add(tok):  # checked before the yield, as a stop id: every rank
                        stats.finish_reason = "repetition"  # ends at the same step, whatever the reader does
                        return
                    stats.generated_tokens += 1
                    waiting = len(sampled) < budget
                    yield tok
                    waiting = False
        except GeneratorExit:
            stats.finish_reason = "interrupted"
            raise
        finally:
            if on_device:
                sampled.extend(torch.cat(on_device).tolist())
            if waiting and self.shard is not None and leader:
                # Closed (or Ctrl-C) at a yield: the other ranks are running the next step. Run it with them, then
                # send STOP instead of a token, so every rank ends the turn with the same cache.
                self.model(feed, start_pos=pos, cache=cache, last_only=True)
                pos += 1
                self.shard.broadcast(torch.full((1,), STOP, dtype=torch.long, device=self.device))
            stats.decode_s = time.perf_counter() - t0 - stats.prefill_s
            # The cache now holds every token fed: the prompt, then each sampled token but the last.
            self.cached_ids = list(prompt_ids) + sampled[: pos - len(prompt_ids)]


class StaticDecoder:
    """Steps with fixed shapes: T new tokens (1: a decode step; k+1: speculative decoding's verify), the position a
    device tensor and attention over the first `bucket` cache slots (buckets double from 256), so a short
    conversation does not read the whole cache. On CUDA ('graph', 'compile') each (T, bucket) step is captured once
    as a CUDA graph and replayed: one launch per step instead of hundreds. 'compile' compiles with dynamic sizes,
    so the bucket's length is a symbol and one compile serves every bucket (a static compile recompiled at each
    doubling: about half a minute each on a 2-core CPU); only the bucket that spans the whole cache compiles once
    more (its slice is the buffer itself), and T > 1 once more (a size of 1 is specialised).

    `forward(tokens, *inputs, start_pos=, cache=)` is the model by default; DeepSeek's MTP layer passes
    `mtp_forward` (inputs: the hidden states it reads). A call returns the logits [T, vocab] and leaves the
    second output (the model's `hidden` under `keep_hidden`, the MTP layer's hidden states) in `self.hidden`.
    Both are the graph's own buffers on CUDA: the next replay of that shape overwrites them."""

    def __init__(self, model: CausalLM, cache: Cache, mode: str, forward=None):
        self.model, self.cache = model, cache
        device = model.model.embed_tokens.weight.device
        step = forward or model
        self.forward = torch.compile(step, dynamic=True) if mode == "compile" else step
        self.eager = step
        # compile: torch.compile's artifacts kept on disk (compile_cache.py), so a later process skips the codegen
        extra = None if forward is None else getattr(forward, "__name__", "step")
        self.compile_key = compile_cache.step_key(model, mode, extra) if mode == "compile" else None
        self.saved: set[tuple[bool, bool]] = set()  # which compiles were saved: (T > 1, whole-cache bucket)
        if self.compile_key:
            compile_cache.load(self.compile_key)
        self.use_graphs = device.type == "cuda" and mode in ("graph", "compile")
        self.device = device
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.inputs: dict[int, list[torch.Tensor]] = {}  # T -> the static input buffers: tokens [1, T], then inputs
        self.graphs: dict[tuple, tuple] = {}  # (T, bucket, keep_hidden) -> (graph, its outputs)
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.hidden: torch.Tensor | None = None

    def bucket(self, pos: int) -> int:
        n = 256
        while n <= pos:
            n *= 2
        return min(n, self.cache.max_len)

    def _call(self, fn, inputs):
        out = fn(*inputs, start_pos=self.slot, cache=self.cache)
        if isinstance(out, tuple):
            return out[0][0], out[1]
        return out[0], (self.model.hidden if self.model.keep_hidden else None)

    def _run(self, inputs) -> tuple:
        try:
            outputs = self._call(self.forward, inputs)
        except Exception as e:
            if self.forward is self.eager or self.saved:
                raise
            # no working compiler here (e.g. no C++ toolchain): the same step, eager, said once
            import sys

            print(f"r1: torch.compile failed ({type(e).__name__}); decoding eagerly instead", file=sys.stderr)
            self.forward = self.eager
            return self._call(self.forward, inputs)
        compiled = (inputs[0].shape[1] > 1, self.cache.view_len == self.cache.max_len)
        if self.compile_key and self.forward is not self.eager and compiled not in self.saved:
            self.saved.add(compiled)  # a new compile just ran (the dynamic one, T > 1's or the whole-cache bucket's)
            compile_cache.save(self.compile_key)
        return outputs

    def __call__(self, token: torch.Tensor, pos: int, *inputs: torch.Tensor) -> torch.Tensor:
        """Logits [T, vocab] for tokens [1, T] at slots pos..pos+T-1 (`inputs`: what `forward` reads besides)."""
        T = token.shape[1]
        buffers = self.inputs.get(T)
        if buffers is None:
            buffers = self.inputs[T] = [torch.zeros(1, T, dtype=torch.long, device=self.device)] + [
                torch.empty_like(x) for x in inputs]
        for buf, x in zip(buffers, (token, *inputs)):
            buf.copy_(x)
        self.slot.fill_(pos)
        self.cache.view_len = self.bucket(pos + T - 1)
        if not self.use_graphs:
            logits, self.hidden = self._run(buffers)
            return logits
        key = (T, self.cache.view_len, self.model.keep_hidden)
        if key not in self.graphs:
            # Warm up (and compile) on a side stream, then record. The warm-up computes this very step, so the
            # cache writes it makes are the real ones; the replay below repeats them.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run(buffers)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = self._run(buffers)
            self.graphs[key] = (graph, outputs)
        graph, (logits, self.hidden) = self.graphs[key]
        graph.replay()
        return logits
