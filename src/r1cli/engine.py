"""The engine: open a model (`open_model` -> `OpenModel`: weights, tokenizer, one `generate.Decoder` with its KV
cache, sampling defaults) and turn its tokens into the event stream every front end consumes (`stream_events`,
`OpenModel.chat`, `OpenModel.stream`: events.EventStream). Also the device check and the model-aware sampling
defaults (`generation_defaults`). `r1 run` lives in run.py, the REPL in repl/, the server in serve.py."""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .chat_format import (
    PromptBuild,
    build_prompt,
    family_for,
)
from .errors import ModelNotFoundError, R1Error, UsageError
from .events import AnswerDelta, Done, EventStream, ReasoningDelta, Start, TurnStats
from .generate import Decoder
from .options import ModelOptions
from .reasoning import ReasoningSplitter
from .registry import DEFAULT_MODEL, ModelRef, resolve_name
from .sampling import PLAIN_MAX_TOKENS, SamplingParams, default_sampling, generation_defaults  # noqa: F401 (the engine's API)

CPU_CONTEXT = 8192  # default KV cache length on CPU and MPS: memory and speed there are tight
ACCEL_CONTEXT = 32768  # on CUDA: room for R1's long reasoning


def locate_or_pull(ref: ModelRef, interactive: bool) -> Path:
    """The folder holding the model; on a terminal offers to download one that is not in the cache."""
    if ref.path is not None:
        return ref.path
    from . import hub

    try:
        return hub.local_path(ref)
    except ModelNotFoundError:
        if not interactive:
            raise
    import typer

    print(f"{ref.identity} is not downloaded yet.", file=sys.stderr)
    # hub.pull shows the total size and free disk, then asks (confirm_above=0: always ask here).
    return hub.pull(ref, confirm=lambda q: typer.confirm(q, default=True, err=True), confirm_above=0)


def check_device(device: str, ranks: int = 1) -> None:
    """A UsageError, before anything loads, for a --device this torch or machine does not have; with ranks > 1
    (--gpus N) also for one that cannot run N ranks (auto means CUDA when there is one, else CPU processes)."""
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device not in ("auto", "cpu", "mps") and not match:
        raise UsageError(f"unknown device '{device}': use auto, cpu, cuda, cuda:N or mps")
    if device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError("--device mps: this torch has no MPS device (Apple GPUs only): use cpu or auto")
        if ranks > 1:
            raise UsageError(f"--gpus {ranks} runs on CUDA GPUs (or CPU processes), not mps: use --device cuda or cpu")
        return
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return
    if not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "no CUDA GPU visible"
        raise UsageError(f"--device {device}: torch {torch.__version__} sees no CUDA device ({why}): use cpu or auto")
    count = torch.cuda.device_count()
    if match and match.group(1) is not None and int(match.group(1)) >= count:
        raise UsageError(f"--device {device}: this machine shows {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if ranks > count:
        raise UsageError(f"--gpus {ranks}: this machine shows {count} CUDA GPU(s): use --gpus {count} or fewer, "
                         f"or --device cpu for {ranks} CPU processes")


def default_context(model_max: int, device: torch.device) -> int:
    return min(model_max, ACCEL_CONTEXT if device.type == "cuda" else CPU_CONTEXT)


@dataclass
class OpenModel:
    """A loaded model with its tokenizer and one Decoder (one KV cache, reused across turns): an events.ChatModel.
    Front ends use `chat`/`stream` (events), `sampling`, `context` and `forget`; the decoder is the engine's."""

    name: str
    ref: ModelRef
    folder: Path
    tokenizer: object
    decoder: Decoder  # or speculative.SpeculativeDecoder
    family: str
    defaults: dict = field(default_factory=dict)

    @property
    def revision(self) -> str | None:
        # A Hub snapshot folder is named after its commit (a GGUF file sits in one).
        snapshot = next((p for p in (self.folder, *self.folder.parents) if p.parent.name == "snapshots"), None)
        if self.ref.path is None and snapshot is not None:
            return snapshot.name
        return self.ref.revision

    def sampling(self, overrides: dict) -> SamplingParams:
        values = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        values.pop("source", None)
        return SamplingParams(**values)

    @property
    def context(self) -> int:
        """The context length: tokens the KV cache holds, prompt and reply together."""
        return self.decoder.max_len

    def forget(self) -> None:
        """Reuse no cached prefix in the next reply (serve: another API key's request filled the cache)."""
        self.decoder.reset()

    def follow(self) -> int:
        """Ranks other than 0 of a tensor-parallel run: run rank 0's steps until it exits; its exit code."""
        return self.decoder.follow()

    def batch_engine(self, max_batch: int):
        """A batch.BatchEngine over this model's weights, at this context length (`r1 run -n`, serve --parallel)."""
        from .batch import BatchEngine

        return BatchEngine(self.decoder.model, max_batch=max_batch, max_len=self.context)

    def stream(self, prompt: PromptBuild, params: SamplingParams) -> EventStream:
        """One reply to a rendered prompt (chat_format.build_prompt)."""
        return stream_events(self.decoder, self.tokenizer, prompt, params)

    def chat(self, messages: list[dict], system: str | None, sampling: dict) -> EventStream:
        """events.ChatModel: one reply to `messages`, rendered with this model's chat template."""
        prompt = build_prompt(self.tokenizer, messages, system=system, family=self.family)
        return self.stream(prompt, self.sampling(sampling))


def open_model(opts: ModelOptions, *, interactive: bool = False, announce: Callable[[str], None] | None = None,
               shard=None, torch_device: torch.device | None = None) -> OpenModel:
    """The model `opts` names, loaded as it says (ModelOptions, checked when built). `interactive`: offer to
    download a model that is not in the cache. `announce`: where the one-line header and notices go. `shard`,
    `torch_device`: this rank's part of a tensor-parallel run (parallel.run_ranks gives both)."""
    from .loader import Checkpoint, pick_device, pick_dtype

    device, dtype, max_context = opts.device, opts.dtype, opts.max_context
    quant, group_size, decode_mode = opts.quant, opts.group_size, opts.decode_mode
    if torch_device is None:
        check_device(device)  # before any download
    name = opts.name or DEFAULT_MODEL
    ref = resolve_name(name)
    folder = locate_or_pull(ref, interactive)
    torch_device = torch_device or pick_device(device)
    checkpoint = Checkpoint(folder)  # a safetensors folder or a GGUF file
    args = checkpoint.args
    torch_dtype = pick_dtype(dtype, args, torch_device)
    context = min(max_context or default_context(args.max_seq_len, torch_device), args.max_seq_len)
    fp8 = "dequant"
    where = torch_device.type
    if shard is not None and shard.world > 1:
        from . import planner

        fp8 = "keep" if args.fp8_block else "dequant"  # FP8 weights stay FP8 across GPUs (one byte each)
        where = f"{shard.world} x {torch_device.type}"
        checkpoint.check_shard(shard)
        if torch_device.type == "cuda":  # refuse up front what cannot fit, with the numbers
            from .hub import format_size

            total = torch.cuda.get_device_properties(torch_device).total_memory
            from .sizes import bytes_per_param

            plan = planner.plan_memory(args, shard.world, context, total, torch_dtype.itemsize,
                                       bytes_per_param(quant, group_size))
            if not plan.fits:
                raise R1Error(f"{ref.identity} does not fit on {shard.world} GPUs: {planner.describe_plan(plan, format_size)} "
                              f"(use more GPUs or a smaller --max-context)")
    if announce:
        dtype_name = str(torch_dtype).removeprefix("torch.")
        if quant != "none":
            dtype_name += f" · {quant}" + (f" g{group_size}" if quant == "int4" else "")
        announce(f"{ref.identity} · {where} {dtype_name} · context {context} tokens")
    model = checkpoint.load_model(device=torch_device, dtype=torch_dtype, fp8=fp8, shard=shard, quant=quant,
                                  group_size=group_size, quant_head=opts.quant_head, mtp=opts.mtp)
    if announce and getattr(model, "quant_notice", None):
        announce(f"r1: {model.quant_notice}")
    if announce and decode_mode == "compile" and torch_device.type == "cuda":  # else the first reply stalls unexplained
        # (a CPU's compiled step says so itself when it is built: aot_step.py)
        announce("r1: --decode-mode compile: the first reply pauses while torch.compile builds the decode step "
                 "(a minute or more the first time, seconds once its on-disk cache is warm)")
    tokenizer = checkpoint.tokenizer()
    family = family_for(tokenizer, ref.alias)
    decoder = Decoder(model, context, decode_mode=decode_mode)
    if opts.speculative:
        from .speculative import open_speculative

        decoder = open_speculative(decoder, tokenizer, opts.draft, opts.mtp,
                                     lambda r, n: locate_or_pull(r, interactive), torch_device, dtype,
                                     opts.draft_quant, group_size, announce)
    return OpenModel(name, ref, folder, tokenizer, decoder, family, generation_defaults(tokenizer, ref.alias))


def _reused(cached_ids: list[int], prompt_ids: list[int]) -> int:
    """Prompt tokens the decoder's cache already holds (as Decoder.generate counts them: one always runs)."""
    n = 0
    for a, b in zip(cached_ids, prompt_ids[:-1]):
        if a != b:
            break
        n += 1
    return n


def stream_events(decoder: Decoder, tokenizer, prompt: PromptBuild, params: SamplingParams) -> EventStream:
    """Generate from a rendered prompt and split the output into reasoning and answer as it streams: Start, then
    ReasoningDelta / AnswerDelta (each with the tokens generated so far), then Done(TurnStats).

    Ctrl-C while the model runs ends the stream with Done (finish_reason 'interrupted', partial text kept);
    `stop(reason)` ends it the same way at the next token, with that finish_reason; `close()` (a client that went
    away) just stops generating. `decoder`: generate.Decoder or speculative.SpeculativeDecoder."""

    def produce(stream: EventStream):
        splitter = ReasoningSplitter(
            start_in_thinking=prompt.starts_in_thinking,
            think_start_id=tokenizer.think_start_id,
            think_end_id=tokenizer.think_end_id,
        )
        text = tokenizer.stream_decoder()
        yield Start(prompt_tokens=len(prompt.ids), cached_tokens=_reused(decoder.cached_ids, prompt.ids),
                    max_len=decoder.max_len, notices=tuple(prompt.notices), starts_in_thinking=prompt.starts_in_thinking)
        t0 = time.perf_counter()
        first_token_at = answer_at = None
        count = 0
        tokens = decoder.generate(prompt.ids, params, stop_ids=tokenizer.eos_ids)
        stopped = None
        try:
            try:
                for token in tokens:
                    count += 1
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    for delta in splitter.feed(text.add(token), token_id=token):
                        if delta.kind == "answer" and answer_at is None:
                            answer_at = time.perf_counter()
                        yield (AnswerDelta if delta.kind == "answer" else ReasoningDelta)(delta.text, count)
                    if stream.stop_reason is not None:
                        stopped = stream.stop_reason
                        break
            except KeyboardInterrupt:
                stopped = "interrupted"
        finally:
            tokens.close()
        for delta in splitter.finish(text.flush()):
            yield (AnswerDelta if delta.kind == "answer" else ReasoningDelta)(delta.text, count)
        g = decoder.stats
        end = time.perf_counter()
        yield Done(TurnStats(
            reasoning=splitter.reasoning_text,
            content=splitter.answer_text,
            finish_reason=stopped or g.finish_reason,
            truncated_in_thinking=splitter.truncated_in_thinking,
            prompt_tokens=g.prompt_tokens,
            cached_tokens=g.cached_tokens,
            reasoning_tokens=splitter.reasoning_tokens,
            completion_tokens=g.generated_tokens,
            ttft_ms=1000 * ((first_token_at or end) - t0),
            thinking_ms=1000 * ((answer_at or end) - t0) if (prompt.starts_in_thinking or splitter.reasoning_tokens) else 0.0,
            total_ms=1000 * (end - t0),
            decode_tokens_per_s=g.decode_tokens_per_s,
            acceptance_rate=g.acceptance_rate,
            tokens_per_step=g.tokens_per_step if g.draft_tokens else None,
        ))

    return EventStream(produce)
