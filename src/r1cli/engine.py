"""The engine: open a model (`open_model` -> `OpenModel`: weights, tokenizer, one `generate.Decoder` with its KV
cache, sampling defaults) and turn its tokens into the event stream every front end consumes (`stream_events`,
`OpenModel.chat`, `OpenModel.stream`: events.EventStream). Also the device check and the model-aware sampling
defaults (`generation_defaults`). `r1 run` lives in run.py, the REPL in repl/, the server in serve.py."""

from __future__ import annotations

import re
import sys
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
from .events import EventStream
from .generate import Decoder
from .options import ModelOptions, head_int8
from .registry import DEFAULT_MODEL, ModelRef, resolve_name
from .reply import Reply, start_event
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

    @property
    def sharded(self) -> bool:
        """Tensor parallel: other ranks follow this one's steps (a failed collective means one is gone)."""
        return getattr(self.decoder, "shard", None) is not None

    def batch(self, max_batch: int):
        """A batch.BatchEngine over this model's weights and tokenizer, at this context length, decoding up to
        `max_batch` sequences together (`r1 run -n`, `r1 eval`, serve --parallel): `stream()` gives each its
        EventStream. Tensor parallel, the other ranks call `follow()` on theirs."""
        from .batch import BatchEngine

        return BatchEngine(self.decoder.model, max_batch=max_batch, max_len=self.context, tokenizer=self.tokenizer)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token of one sequence takes on this model's device (sizes.kv_cache_bytes_per_token)."""
        from .models.layers import kv_cache_dtype
        from .sizes import kv_cache_bytes_per_token

        weights = self.decoder.model.model.embed_tokens.weight
        return kv_cache_bytes_per_token(self.decoder.model.args, kv_cache_dtype(weights.dtype, weights.device).itemsize)

    def default_parallel(self) -> int:
        """`r1 serve --parallel` when not given: as many sequences as half the free memory of this model's device
        holds a whole context of KV cache for (batch.default_parallel)."""
        from .batch import default_parallel, free_memory

        device = self.decoder.model.model.embed_tokens.weight.device
        return default_parallel(self.kv_bytes_per_token * self.context, free_memory(device), device.type)

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
    from .loader import Checkpoint, pick_device, pick_dtype, resolve_quant

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
    quant, quant_why = resolve_quant(opts.quant, dtype, checkpoint, torch_device, shard)
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
        if quant_why:
            announce(f"r1: weights dequantized: {quant_why}" if quant == "none" else
                     f"r1: --quant {quant}: {quant_why} (--quant none dequantizes it)")
    quant_head = head_int8(quant, opts.quant_head, sharded=shard is not None and shard.world > 1)
    model = checkpoint.load_model(device=torch_device, dtype=torch_dtype, fp8=fp8, shard=shard, quant=quant,
                                  group_size=group_size, quant_head=quant_head, mtp=opts.mtp)
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
        yield start_event(prompt, _reused(decoder.cached_ids, prompt.ids), decoder.max_len)
        reply = Reply(tokenizer, prompt)
        tokens = decoder.generate(prompt.ids, params, stop_ids=tokenizer.eos_ids)
        stopped = None
        try:
            try:
                for token in tokens:
                    yield from reply.feed(token)
                    if stream.stop_reason is not None:
                        stopped = stream.stop_reason
                        break
            except KeyboardInterrupt:
                stopped = "interrupted"
        finally:
            tokens.close()
        yield from reply.finish()
        yield reply.done(decoder.stats, stopped or decoder.stats.finish_reason)

    return EventStream(produce)
