"""`r1 run`: one prompt in, the answer on stdout (`run`; `run_many` for -n samples decoded together), and the
command line's prompt reading (`read_prompt`, `check_text`, `looks_like_model`). It opens the model through the
engine (engine.open_model) and consumes only its events. Imports no torch until a model is opened."""

from __future__ import annotations

import io
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, TextIO

from .chat_format import build_prompt
from .errors import UsageError
from .events import AnswerDelta, Done, Event, ReasoningDelta, Start, TurnStats
from .options import ModelOptions
from .registry import resolve_name
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .engine import OpenModel

THINKING_MODES = ("auto", "show", "hide", "stderr", "stdout")
REPETITION_EXIT = 6  # `r1 run` stopped by the repetition guard (docs/exit-codes.md)
REPETITION_NOTICE = "stopped: the output was repeating itself in a loop"
MAX_RUN_BATCH = 16  # `r1 run -n`: rows of KV cache at once (each holds --max-context tokens); more samples queue
DIM, UNDIM = "\x1b[2m", "\x1b[22m"


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
        torch_device=None) -> int:
    """Generate one reply; return the exit code (0 ok, 4 stopped while thinking, 6 stopped in a loop, 130
    interrupted).
    Tensor parallel (`shard`): rank 0 does all of this; the other ranks load their part and follow it."""
    from .engine import open_model

    if shard is not None and not shard.leader:
        m = open_model(opts.model, shard=shard, torch_device=torch_device)  # every option, as rank 0 has them
        return m.follow()
    out, err = stdout or sys.stdout, stderr or sys.stderr
    if opts.thinking not in THINKING_MODES:
        raise UsageError(f"unknown --think '{opts.thinking}': use {', '.join(THINKING_MODES)}")
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
    params = m.sampling(opts.sampling)
    if opts.n > 1:
        for notice in prompt.notices:
            note(f"r1: {notice}")
        return run_many(m, prompt, params, opts, out, err, note, thinking)

    def write(stream: TextIO, text: str) -> None:
        stream.write(text)
        stream.flush()

    state = {"reasoning": False, "answer": False, "context": None}

    def handle(event: Event) -> None:
        if isinstance(event, Start):
            state["context"] = event.max_len
            for notice in event.notices:
                note(f"r1: {notice}")
            return
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
    stream = m.stream(prompt, params)
    try:
        stats = stream.drive(handle)
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
             f"(raise --max-tokens, now {params.max_tokens}, or --max-context, now {state['context']})")
        return 4
    if stats.finish_reason == "length":
        note(f"r1: the answer was cut off after {stats.completion_tokens} tokens (--max-tokens {params.max_tokens})")
    return 0


def run_many(m: OpenModel, prompt, params: SamplingParams, opts: RunOptions, out: TextIO, err: TextIO,
             note: Callable[[str], None], thinking: str) -> int:
    """`r1 run -n K`: K samples of one prompt in one batch (one prefill, shared). Sample i draws with seed
    `--seed + i` when a seed is given. text: each answer after a `--- sample i/K ---` line, once it is complete
    (its reasoning as <think> first with --think stdout); --json: an array of K result objects; --jsonl: the
    events of every sample as they come, each with its "index"."""
    from dataclasses import replace

    from .batch import stream_many

    engine = m.batch(min(opts.n, MAX_RUN_BATCH))
    seeds = [None if params.seed is None else params.seed + i for i in range(opts.n)]
    results: list[dict | None] = [None] * opts.n

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    if opts.output == "jsonl":
        write(json.dumps({"event": "start", "model": m.name, "repo": m.ref.repo, "revision": m.revision}) + "\n")
    interrupted = cut = 0
    try:
        for i, event in stream_many(engine, prompt, [replace(params, seed=s) for s in seeds]):
            if isinstance(event, Start):  # its notices were shown once, above
                continue
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
