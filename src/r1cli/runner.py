"""`r1 run`: one prompt in, the answer on stdout. Also the model opening shared with `r1 chat`."""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import torch

from .chat_format import R1_MAX_TOKENS, R1_SAMPLING_DEFAULTS, build_prompt, family_for
from .errors import ModelNotFoundError, R1Error, UsageError
from .events import AnswerDelta, Done, Event, ReasoningDelta, TurnStats, stream_events
from .generate import Generator, SamplingParams
from .options import ModelOptions
from .registry import DEFAULT_MODEL, ModelRef, resolve_name

THINKING_MODES = ("auto", "show", "hide", "stderr", "stdout")
REPETITION_EXIT = 6  # `r1 run` stopped by the repetition guard (docs/exit-codes.md)
REPETITION_NOTICE = "stopped: the output was repeating itself in a loop"
CPU_CONTEXT = 8192  # default KV cache length on CPU and MPS: memory and speed there are tight
ACCEL_CONTEXT = 32768  # on CUDA: room for R1's long reasoning
MAX_RUN_BATCH = 16  # `r1 run -n`: rows of KV cache at once (each holds --max-context tokens); more samples queue
DIM, UNDIM = "\x1b[2m", "\x1b[22m"


# --- the model -----------------------------------------------------------------------------------------------------


def model_folder(ref: ModelRef, name: str, interactive: bool) -> Path:
    """The folder holding the model; on a terminal offers to download one that is not in the cache."""
    if ref.path is not None:
        return ref.path
    pull_hint = f"run `r1 pull {name}` first"
    try:
        from . import hub
    except ImportError:
        raise ModelNotFoundError(f"{ref.identity} is not downloaded: {pull_hint}") from None
    try:
        return hub.local_path(ref)
    except ModelNotFoundError:
        if not interactive or not hasattr(hub, "pull"):
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


# The sampling options' rules, one place for the command line (--top-p) and the chat's /set (top_p): the type,
# the lowest and highest value (None: no bound). A seed is what torch.Generator.manual_seed takes.
SAMPLING_RULES = {"temperature": (float, 0.0, None), "top_p": (float, 0.0, 1.0), "top_k": (int, 0, None),
                  "min_p": (float, 0.0, 1.0), "max_tokens": (int, 1, None), "seed": (int, -(1 << 63), (1 << 64) - 1),
                  "repetition_penalty": (float, 0.0, None)}  # above 0, not at it: checked below


def check_sampling(name: str, value, spelled: str | None = None):
    """`value` (a number, or text to parse) for sampling option `name`, checked against SAMPLING_RULES; returns
    the number. A UsageError names the option as `spelled` (default: --name-with-dashes)."""
    kind, lowest, highest = SAMPLING_RULES[name]
    spelled = spelled or "--" + name.replace("_", "-")
    kind_name = "an integer" if kind is int else "a number"
    if isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            raise UsageError(f"{spelled}: '{value}' is not {kind_name}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise UsageError(f"{spelled}: {value!r} is not {kind_name}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{spelled}: {value} is not a finite number")
    if (lowest is not None and value < lowest) or (highest is not None and value > highest):
        span = (f"from {lowest:g} to {highest:g}" if highest is not None and kind is float else
                f"from {lowest} to {highest}" if highest is not None else f"of at least {lowest:g}")
        raise UsageError(f"{spelled}: {value} is out of range: use a value {span}")
    if name == "repetition_penalty" and value == 0:
        raise UsageError(f"{spelled} must be above 0 (1 = off), not 0")
    return value


def default_context(model_max: int, device: torch.device) -> int:
    return min(model_max, ACCEL_CONTEXT if device.type == "cuda" else CPU_CONTEXT)


# A model that is not R1 gets at most PLAIN_MAX_TOKENS tokens: a reply of a model that does not reason fits in
# about 3,000 words, and 4096 tokens of a small model on a CPU take minutes, not the hours a whole context can.
PLAIN_MAX_TOKENS = 4096
# transformers' own values for the keys a generation_config.json leaves out (GenerationConfig defaults).
TRANSFORMERS_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "min_p": 0.0, "repetition_penalty": 1.0}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(tokenizer, alias=None) -> dict:
    """The defaults `r1 run`, `chat`, `serve` and `show` use for a model (SamplingParams fields), and where they
    come from ("source"). R1 models (chat_format.family_for: `tokenizer` may be None, `alias` a registry.Alias)
    get DeepSeek's temperature 0.6, top-p 0.95 and 32,768 tokens, with generation_config.json over them (the R1
    repos' say the same). Other models: their generation_config.json as transformers reads it (keys it leaves out
    take transformers' values; do_sample false, or no sampling settings at all, is greedy decoding), at most
    PLAIN_MAX_TOKENS tokens. Unlike transformers, a file that sets a temperature or top-p without do_sample is
    taken to mean sampling. The repetition guard is on for all: it is what makes greedy decoding safe. The
    Generator caps max_tokens by the context left."""
    config = getattr(tokenizer, "generation_config", None) or {}
    given = {k: config[k] for k in SAMPLING_KEYS
             if isinstance(config.get(k), (int, float)) and not isinstance(config.get(k), bool)}
    if family_for(tokenizer, alias) == "r1":
        defaults = {**R1_SAMPLING_DEFAULTS, "max_tokens": R1_MAX_TOKENS, **given}
        source = "DeepSeek's R1 recommendations" + (" and generation_config.json" if given else "")
    else:
        defaults = {**TRANSFORMERS_SAMPLING, "max_tokens": PLAIN_MAX_TOKENS, **given}
        source = "generation_config.json"
        if not given and config.get("do_sample") is not True:
            defaults["temperature"] = 0.0
            source = "greedy: generation_config.json sets no sampling"
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0  # transformers' greedy decoding
    return {**defaults, "repeat_guard": True, "source": source}


def default_sampling(tokenizer, alias=None, **overrides) -> SamplingParams:
    """generation_defaults as SamplingParams, `overrides` (SamplingParams fields) on top: for the Python API."""
    values = {k: v for k, v in generation_defaults(tokenizer, alias).items() if k != "source"}
    return SamplingParams(**{**values, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class OpenModel:
    """A loaded model with its tokenizer and one Generator (one KV cache, reused across turns)."""

    name: str
    ref: ModelRef
    folder: Path
    tokenizer: object
    generator: Generator
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
    if opts.speculative and shard is not None and shard.world > 1:
        raise UsageError("--draft and --mtp run in one process for now: drop --gpus")
    ref = resolve_name(name)
    folder = model_folder(ref, name, interactive)
    torch_device = torch_device or pick_device(device)
    checkpoint = Checkpoint(folder)  # a safetensors folder or a GGUF file
    args = checkpoint.args
    torch_dtype = pick_dtype(dtype, args, torch_device)
    context = min(max_context or default_context(args.max_seq_len, torch_device), args.max_seq_len)
    fp8 = "dequant"
    where = torch_device.type
    if shard is not None and shard.world > 1:
        from . import parallel

        fp8 = "keep" if args.fp8_block else "dequant"  # FP8 weights stay FP8 across GPUs (one byte each)
        where = f"{shard.world} x {torch_device.type}"
        parallel.check_sizes(args, shard)
        if torch_device.type == "cuda":  # refuse up front what cannot fit, with the numbers
            from .hub import format_size

            total = torch.cuda.get_device_properties(torch_device).total_memory
            from .quant import bytes_per_param

            plan = parallel.plan_memory(args, shard.world, context, total, torch_dtype.itemsize,
                                        bytes_per_param(quant, group_size))
            if not plan.fits:
                raise R1Error(f"{ref.identity} does not fit on {shard.world} GPUs: {parallel.describe_plan(plan, format_size)} "
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
    generator = Generator(model, context, decode_mode=decode_mode)
    if opts.speculative:
        from .speculative import open_speculative

        generator = open_speculative(generator, tokenizer, opts.draft, opts.mtp,
                                     lambda r, n: model_folder(r, n, interactive), torch_device, dtype,
                                     opts.draft_quant, group_size, announce)
    return OpenModel(name, ref, folder, tokenizer, generator, family, generation_defaults(tokenizer, ref.alias))


def drive(stream, handle: Callable[[Event], None]) -> TurnStats:
    """Hand each event to `handle` until Done. Ctrl-C, in the model or in `handle`, ends the turn with
    finish_reason 'interrupted' and the partial text kept (see events.stream_events)."""
    event = None
    while True:
        try:
            if event is None:
                event = next(stream)
            handle(event)
            if isinstance(event, Done):
                return event.stats
            event = None
        except KeyboardInterrupt:
            if isinstance(event, Done):
                return event.stats
            try:
                event = stream.throw(KeyboardInterrupt)
            except StopIteration:
                raise KeyboardInterrupt from None


# --- r1 run --------------------------------------------------------------------------------------------------------


def looks_like_model(word: str) -> bool:
    """Is the first argument of `r1 run` a model name rather than the start of the prompt?"""
    if not word or any(c.isspace() for c in word):
        return False
    try:
        resolve_name(word)
        return True
    except UsageError:
        # Model-shaped words (name:tag, org/name, paths) still count, so a typo fails instead of becoming a prompt.
        return bool(re.fullmatch(r"[\w.~-]*[:/][\w.@:/~-]+", word))


def read_prompt(words: list[str], stdin: TextIO) -> str:
    """Prompt from the arguments; piped stdin (or `-`) comes first, then a blank line, then the arguments."""
    explicit = "-" in words
    words = [w for w in words if w != "-"]
    piped = ""
    if explicit or not _isatty(stdin):
        try:  # a bad byte then reads as a lone surrogate, which check_text finds and places exactly
            stdin.reconfigure(errors="surrogateescape")
        except (AttributeError, ValueError, io.UnsupportedOperation):
            pass
        try:
            piped = stdin.read().rstrip("\n")
        except UnicodeDecodeError:
            raise UsageError("the prompt on stdin is not valid UTF-8: convert it first, e.g. iconv -f latin1 -t utf-8") from None
        check_text(piped, "the prompt on stdin")
    for i, word in enumerate(words, 1):
        check_text(word, f"prompt argument {i}")
    text = "\n\n".join(part for part in (piped, " ".join(words)) if part.strip())
    if not text.strip():
        raise UsageError("no prompt: give it after the model name, or pipe it on stdin")
    return text


def check_text(text: str | None, where: str) -> None:
    """A UsageError when `text` holds bytes that were not UTF-8: Python keeps them from argv and (in a C locale)
    stdin as lone surrogates, which no tokenizer takes."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        offset = len(text[: e.start].encode("utf-8"))  # e.start is the first bad character
        bad = text[e.start]
        raw = repr(bad.encode("utf-8", "surrogateescape")) if "\udc80" <= bad <= "\udcff" else f"U+{ord(bad):04X}"
        raise UsageError(f"{where} is not valid UTF-8 (byte {offset}: {raw}): convert it first, "
                         f"e.g. iconv -f latin1 -t utf-8") from None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def use_color(stream, color: str) -> bool:
    """--color always|never|auto; auto: a terminal, NO_COLOR unset, TERM not dumb."""
    if color == "always":
        return True
    if color == "never":
        return False
    return _isatty(stream) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


@dataclass
class RunOptions:
    model: ModelOptions
    prompt: str
    system: str | None = None
    sampling: dict = field(default_factory=dict)  # SamplingParams fields given on the command line
    thinking: str = "auto"
    output: str = "text"  # text | json | jsonl
    color: str = "auto"
    verbose: bool = False
    n: int = 1  # samples of the prompt, decoded together (batch.py)


def _silence(stream: TextIO) -> None:
    """Point a closed pipe's file descriptor at /dev/null, so the flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass


def result_object(m: OpenModel, stats: TurnStats) -> dict:
    """The --json object (and the --jsonl 'done' event)."""
    return {
        "model": m.name, "repo": m.ref.repo, "revision": m.revision,
        "reasoning": stats.reasoning, "content": stats.content,
        "finish_reason": stats.finish_reason, "truncated_in_thinking": stats.truncated_in_thinking,
        "usage": {"prompt_tokens": stats.prompt_tokens, "reasoning_tokens": stats.reasoning_tokens,
                  "completion_tokens": stats.completion_tokens},
        "timings": {"ttft_ms": round(stats.ttft_ms, 1), "thinking_ms": round(stats.thinking_ms, 1),
                    "total_ms": round(stats.total_ms, 1), "decode_tokens_per_s": round(stats.decode_tokens_per_s, 2),
                    **speculative_timings(stats)},
    }


def speculative_timings(stats: TurnStats) -> dict:
    """Speculative decoding's figures (none without a draft): the share of drafted tokens the target accepted, and
    tokens per target forward."""
    if stats.acceptance_rate is None:
        return {}
    return {"acceptance_rate": round(stats.acceptance_rate, 3), "tokens_per_step": round(stats.tokens_per_step, 2)}


def run(opts: RunOptions, stdout: TextIO | None = None, stderr: TextIO | None = None, shard=None,
        torch_device: torch.device | None = None) -> int:
    """Generate one reply; return the exit code (0 ok, 4 stopped while thinking, 6 stopped in a loop, 130
    interrupted).
    Tensor parallel (`shard`): rank 0 does all of this; the other ranks load their part and follow it."""
    if shard is not None and not shard.leader:
        m = open_model(opts.model, shard=shard, torch_device=torch_device)  # every option, as rank 0 has them
        return m.generator.follow()
    out, err = stdout or sys.stdout, stderr or sys.stderr
    if opts.thinking not in THINKING_MODES:
        raise UsageError(f"unknown --thinking '{opts.thinking}': use {', '.join(THINKING_MODES)}")
    if opts.color not in ("auto", "always", "never"):
        raise UsageError(f"unknown --color '{opts.color}': use auto, always or never")
    err_color = use_color(err, opts.color)
    dim = (lambda s: f"{DIM}{s}{UNDIM}") if err_color else (lambda s: s)

    def note(line: str) -> None:
        err.write(dim(line) + "\n")
        err.flush()

    thinking = opts.thinking
    if thinking == "auto":
        thinking = "stderr" if _isatty(err) else "hide"
    elif thinking == "show":
        thinking = "stderr"
    show_header = opts.verbose or _isatty(err)
    m = open_model(opts.model, interactive=_isatty(sys.stdin) and _isatty(err) and shard is None,
                   announce=note if show_header else None, shard=shard, torch_device=torch_device)
    prompt = build_prompt(m.tokenizer, [{"role": "user", "content": opts.prompt}], system=opts.system, family=m.family)
    for notice in prompt.notices:
        note(f"r1: {notice}")
    params = m.sampling(opts.sampling)
    if opts.n > 1:
        return run_many(m, prompt, params, opts, out, err, note, thinking)

    def write(stream: TextIO, text: str) -> None:
        stream.write(text)
        stream.flush()

    state = {"reasoning": False, "answer": False}

    def handle(event: Event) -> None:
        if opts.output == "jsonl":
            if isinstance(event, ReasoningDelta):
                write(out, json.dumps({"event": "reasoning", "text": event.text}, ensure_ascii=False) + "\n")
            elif isinstance(event, AnswerDelta):
                write(out, json.dumps({"event": "answer", "text": event.text}, ensure_ascii=False) + "\n")
            return
        if opts.output == "json" or isinstance(event, Done):
            return
        if isinstance(event, ReasoningDelta):
            if thinking == "stdout":
                write(out, ("" if state["reasoning"] else "<think>\n") + event.text)
            elif thinking == "stderr":
                write(err, dim(event.text))
            state["reasoning"] = True
        elif isinstance(event, AnswerDelta):
            if state["reasoning"] and not state["answer"]:
                if thinking == "stdout":
                    write(out, "\n</think>\n\n")
                elif thinking == "stderr":
                    write(err, "\n\n")
            state["answer"] = True
            write(out, event.text)

    if opts.output == "jsonl":
        start = {"event": "start", "model": m.name, "repo": m.ref.repo, "revision": m.revision}
        write(out, json.dumps(start) + "\n")
    stream = stream_events(m.generator, m.tokenizer, prompt, params)
    try:
        stats = drive(stream, handle)
    except BrokenPipeError:
        # The reader went away (`r1 run ... | head`): stop generating and end quietly, as `cat` would.
        stream.close()
        _silence(out)
        return 0

    if opts.output == "json":
        write(out, json.dumps(result_object(m, stats), ensure_ascii=False, indent=2) + "\n")
    elif opts.output == "jsonl":
        write(out, json.dumps({"event": "done", **result_object(m, stats)}, ensure_ascii=False) + "\n")
    else:
        if state["reasoning"] and not state["answer"]:
            write(out if thinking == "stdout" else err, "\n" if thinking in ("stdout", "stderr") else "")
        if stats.content and not stats.content.endswith("\n"):
            write(out, "\n")
    if stats.finish_reason == "interrupted":
        note("r1: interrupted")
        return 130
    if stats.finish_reason == "repetition":
        note(f"r1: {REPETITION_NOTICE} after {stats.completion_tokens} tokens (--repeat-penalty 1.1 makes repeats "
             f"less likely; --no-repeat-guard lets it run)")
        return REPETITION_EXIT
    if stats.truncated_in_thinking:
        note(f"r1: stopped while thinking after {stats.completion_tokens} tokens: no answer was produced "
             f"(raise --max-tokens, now {params.max_tokens}, or --max-context, now {m.generator.max_len})")
        return 4
    if stats.finish_reason == "length":
        note(f"r1: the answer was cut off after {stats.completion_tokens} tokens (--max-tokens {params.max_tokens})")
    return 0


def run_many(m: OpenModel, prompt, params: SamplingParams, opts: RunOptions, out: TextIO, err: TextIO,
             note: Callable[[str], None], thinking: str) -> int:
    """`r1 run -n K`: K samples of one prompt in one batch (one prefill, shared). Sample i draws with seed
    `--seed + i` when a seed is given. text: each answer after a `--- sample i/K ---` line, once it is complete
    (its reasoning as <think> first with --thinking stdout); --json: an array of K result objects; --jsonl: the
    events of every sample as they come, each with its "index"."""
    from dataclasses import replace

    from .batch import BatchEngine, stream_many

    engine = BatchEngine(m.generator.model, max_batch=min(opts.n, MAX_RUN_BATCH), max_len=m.generator.max_len)
    seeds = [None if params.seed is None else params.seed + i for i in range(opts.n)]
    results: list[dict | None] = [None] * opts.n

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    if opts.output == "jsonl":
        write(json.dumps({"event": "start", "model": m.name, "repo": m.ref.repo, "revision": m.revision}) + "\n")
    interrupted = cut = 0
    try:
        for i, event in stream_many(engine, m.tokenizer, prompt, [replace(params, seed=s) for s in seeds]):
            if opts.output == "jsonl":
                if isinstance(event, (ReasoningDelta, AnswerDelta)):
                    kind = "reasoning" if isinstance(event, ReasoningDelta) else "answer"
                    write(json.dumps({"event": kind, "index": i, "text": event.text}, ensure_ascii=False) + "\n")
                else:
                    write(json.dumps({"event": "done", "index": i, **result_object(m, event.stats)}, ensure_ascii=False) + "\n")
            if not isinstance(event, Done):
                continue
            stats = event.stats
            results[i] = {"index": i, **result_object(m, stats)}
            interrupted += stats.finish_reason == "interrupted"
            cut += stats.finish_reason == "length"
            if opts.output == "text":
                write(f"--- sample {i + 1}/{opts.n} ---\n")
                if thinking == "stdout" and stats.reasoning:
                    write(f"<think>\n{stats.reasoning}\n</think>\n\n")
                write(stats.content + ("" if stats.content.endswith("\n") else "\n"))
    except BrokenPipeError:
        _silence(out)
        return 0
    if opts.output == "json":
        write(json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    if interrupted:
        note("r1: interrupted")
        return 130
    if cut:
        note(f"r1: {cut} of {opts.n} answers were cut off (--max-tokens {params.max_tokens})")
    return 0
