"""The `r1` command: argument parsing and wiring only. Work lives in the modules it calls."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer
from typer.core import TyperGroup

from .errors import R1Error, UsageError
from .options import ModelOptions


class _Group(TyperGroup):
    """The `r1` group: plain metavars in every command's help (NAME, INTEGER, TEXT; none for flags) instead of
    typer's `<bool>`/`<str>` type labels, and an argument's own metavar kept as written in the usage line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for command in [self, *self.commands.values()]:
            params = command.get_params  # params and the help option, as help and parsing see them

            command.get_params = lambda ctx, params=params: [_plain_metavar(p) for p in params(ctx)]


def _plain_metavar(param):
    if getattr(param, "_r1_plain", False):
        return param
    param._r1_plain = True
    if param.param_type_name == "argument":
        if param.metavar:  # e.g. run's "[MODEL] [PROMPT]...": typer would wrap it again as [...]...
            usage = param.metavar
        else:  # NAME when required (typer writes {NAME}), [MODEL] when optional
            param.metavar = param.name.upper()
            usage = (param.metavar if param.required else f"[{param.metavar}]") + ("..." if param.nargs != 1 else "")
        param._usage_display_name = lambda: usage
        param.display_type_rich = lambda ctx: None
    elif getattr(param, "is_flag", False):
        param.metavar = ""
    elif param.metavar is None:
        # typer >= 0.2x keeps the annotation in type_descriptor; older typer has click's param.type
        kind = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        kind = getattr(kind, "__name__", None) or getattr(getattr(param, "type", None), "name", "text").split()[0]
        param.metavar = {"int": "INTEGER", "integer": "INTEGER", "float": "FLOAT"}.get(kind, "TEXT")
    return param


app = typer.Typer(
    name="r1",
    help="Run DeepSeek-R1 and its distilled models locally.",
    cls=_Group,
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command's context
)

# Set by --debug (before or after the command; main() takes it out of argv) or R1_DEBUG=1: tracebacks instead of
# one-line errors.
_DEBUG_ENV = "R1_DEBUG"
_DEBUG_FLAG = "--debug"


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"r1 {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, _DEBUG_FLAG, help="Show full tracebacks on errors (anywhere on the line; or R1_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    if debug:
        os.environ[_DEBUG_ENV] = "1"
    if ctx.invoked_subcommand is None:  # bare `r1`: the help, and success
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


# Options shared by `run` and `chat`.
_DEVICE = typer.Option("auto", "--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps.")
_DTYPE = typer.Option("auto", "--dtype", help="auto (the checkpoint's), bfloat16, float16 or float32.")
_CONTEXT = typer.Option(None, "--max-context", min=16, help="KV cache length in tokens (default: model max, at most 8192 on CPU/MPS, 32768 on CUDA).")
_SYSTEM = typer.Option(None, "--system", help="System prompt (R1 models: put at the start of the first user message).")
_MAX_TOKENS = typer.Option(None, "--max-tokens", help="Most tokens to generate, reasoning included (default: 32768 for R1 models, DeepSeek's evaluation setting; 4096 for others; capped by the context).")
_TEMPERATURE = typer.Option(None, "--temperature", help="0 = greedy (default: 0.6 for R1 models, else generation_config.json's, else 0; `r1 show` prints them).")
_TOP_P = typer.Option(None, "--top-p", help="Nucleus sampling (default: 0.95 for R1 models, else generation_config.json's, else 1).")
_REPEAT_PENALTY = typer.Option(None, "--repeat-penalty", help="Penalise every token already in the prompt or reply (CTRL, as llama.cpp's repeat_penalty; 1 = off, 1.1 a usual value; default: generation_config.json's, else 1).")
_NO_REPEAT_GUARD = typer.Option(False, "--no-repeat-guard", help="Let a reply that loops (the same cycle of up to 256 tokens, verbatim for 1024 tokens) go on instead of stopping it.")
_TOP_K = typer.Option(None, "--top-k", help="Keep the k most likely tokens (0 = off).")
_MIN_P = typer.Option(None, "--min-p", help="Drop tokens below min_p times the top probability.")
_SEED = typer.Option(None, "--seed", help="Random seed for reproducible sampling.")
_GPUS = typer.Option(None, "--gpus", min=1, help="Split the model over N GPUs of this machine (N processes, as torchrun would start; docs/distributed.md).")
_QUANT = typer.Option("auto", "--quant", help="auto|none|int8|int4: weight-only quantization of the linear layers (cached beside the model). auto: a quantized GGUF on a CPU stays quantized (the fastest format measured on this CPU that keeps its bits), anything else none.")
_GROUP = typer.Option(32, "--group-size", help="int4 group size: 32, 64 or 128.")
_QUANT_HEAD = typer.Option(None, "--quant-head/--no-quant-head", help="The output head as int8 too (read every token: a large share of an int4 model's bytes). Default: on with --quant int4, off otherwise.")
_DRAFT = typer.Option(None, "--draft", help="Speculative decoding with a smaller model of the same tokenizer as the draft, e.g. deepseek-r1:1.5b for :7b (same output, faster decode).")
_BENCH_QUANT = typer.Option("none", "--quant", help="none|int8|int4: weight-only quantization of the linear layers.")
_DRAFT_QUANT = typer.Option("auto", "--draft-quant", help="auto|none|int8|int4: the --draft model's weights (auto as --quant).")
_MTP = typer.Option(False, "--mtp", help="Speculative decoding with the checkpoint's multi-token-prediction layer (DeepSeek-V3/R1) as the draft.")
_DECODE = typer.Option("auto", "--decode-mode", help="auto (CUDA graphs on a GPU; on a CPU the decode step compiled for this machine, built in the background on its first run while eager decodes), eager, static, compile (a CPU's first run waits for that build; torch.compile on a GPU) or graph.")


def _distributed(gpus: int | None, device: str, body) -> int | None:
    """--gpus N: run this command as N rank processes (parallel.relaunch) and return rank 0's exit code. Under
    torchrun (or as one of those ranks): run body(shard, device) on every rank (its exit code). Otherwise None: the
    caller runs in this process."""
    from . import parallel
    from .engine import check_device

    if gpus and gpus > 1 and not parallel.launched():
        check_device(device, ranks=gpus)  # before N processes start that would each fail
        return parallel.relaunch(gpus, sys.argv[1:])
    if parallel.launched():
        return parallel.run_ranks(body, device)
    return None


def _model_options(name, device, dtype, max_context, quant, group_size, quant_head, decode_mode, draft, draft_quant,
                   mtp, gpus=None, url=None) -> ModelOptions:
    """The one options object every front end and worker rank opens the model from (options.ModelOptions)."""
    if (draft or mtp) and url:
        raise UsageError("--draft and --mtp speed up a local model; --url talks to a server")
    return ModelOptions(name, device, dtype, max_context, quant, group_size, quant_head, decode_mode, draft,
                        draft_quant, mtp)


def _sampling(max_tokens, temperature, top_p, top_k, min_p, seed, repeat_penalty=None, no_repeat_guard=False) -> dict:
    """The sampling options given, checked by the rules /set uses too (sampling.check_sampling)."""
    from .sampling import check_sampling

    given = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                 repetition_penalty=repeat_penalty)
    checked = {k: None if v is None else check_sampling(k, v, "--repeat-penalty" if k == "repetition_penalty" else None)
               for k, v in given.items()}
    return {**checked, "repeat_guard": False if no_repeat_guard else None}


def _check_text_options(device: str | None, system: str | None) -> None:
    """Before anything loads: a --device that is not there, a --system that is not UTF-8."""
    from .run import check_text

    if device is not None:
        from .engine import check_device

        check_device(device)
    check_text(system, "--system")


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def run(
    words: list[str] = typer.Argument(None, metavar="[MODEL] [PROMPT]...", show_default=False,
                                      help="Model (alias, org/name@rev or folder; default deepseek-r1:1.5b), then the prompt. '-' reads stdin."),
    system: str = _SYSTEM, device: str = _DEVICE, dtype: str = _DTYPE, max_context: int = _CONTEXT,
    max_tokens: int = _MAX_TOKENS, temperature: float = _TEMPERATURE, top_p: float = _TOP_P, top_k: int = _TOP_K,
    min_p: float = _MIN_P, seed: int = _SEED, gpus: int = _GPUS,
    repeat_penalty: float = _REPEAT_PENALTY, no_repeat_guard: bool = _NO_REPEAT_GUARD,
    think: str = typer.Option("auto", "--think", help="show|hide|stderr|stdout (default: stderr on a terminal, else hidden)."),
    thinking: str = typer.Option(None, "--thinking", hidden=True),  # --think's earlier spelling, kept for scripts
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with the answer, reasoning, usage and timings."),
    jsonl: bool = typer.Option(False, "--jsonl", help="Print one JSON event per line while generating."),
    color: str = typer.Option("auto", "--color", help="auto|always|never (auto honours NO_COLOR)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the model and device line even when stderr is not a terminal."),
    quant: str = _QUANT, group_size: int = _GROUP, quant_head: Optional[bool] = _QUANT_HEAD, decode_mode: str = _DECODE,
    draft: str = _DRAFT, draft_quant: str = _DRAFT_QUANT, mtp: bool = _MTP,
    n: int = typer.Option(1, "-n", "--samples", min=1, max=256, help="Sample the prompt N times, decoded together in one batch (seed+i each with --seed)."),
) -> None:
    """Answer one prompt: the answer on stdout, the reasoning on stderr (terminal only)."""
    from .run import RunOptions, looks_like_model, read_prompt
    from .run import run as run_prompt

    if json_out and jsonl:
        raise UsageError("--json and --jsonl exclude each other")
    _check_text_options(device, system)
    sampling = _sampling(max_tokens, temperature, top_p, top_k, min_p, seed, repeat_penalty, no_repeat_guard)
    if n > 1 and gpus:
        raise UsageError("-n runs on one device for now: drop --gpus, or run the samples one by one")
    words = list(words or [])
    name = words.pop(0) if words and looks_like_model(words[0]) else None
    model = _model_options(name, device, dtype, max_context, quant, group_size, quant_head, decode_mode, draft,
                           draft_quant, mtp, gpus)

    def options(prompt: str) -> RunOptions:
        return RunOptions(model=model, prompt=prompt, system=system, sampling=sampling,
                          thinking=thinking or think, output="json" if json_out else "jsonl" if jsonl else "text",
                          color=color, verbose=verbose, n=n)

    def ranks(shard, torch_device) -> int:  # only rank 0 reads stdin
        prompt = read_prompt(words, sys.stdin) if shard.leader else ""
        return run_prompt(options(prompt), shard=shard, torch_device=torch_device)

    code = _distributed(gpus, device, ranks)
    if code is None:
        code = run_prompt(options(read_prompt(words, sys.stdin)))
    if code:
        raise typer.Exit(code)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def chat(
    model: str = typer.Argument(None, help="Alias, org/name@rev or folder (default: deepseek-r1:1.5b)."),
    system: str = _SYSTEM, device: str = _DEVICE, dtype: str = _DTYPE, max_context: int = _CONTEXT,
    max_tokens: int = _MAX_TOKENS, temperature: float = _TEMPERATURE, top_p: float = _TOP_P, top_k: int = _TOP_K,
    min_p: float = _MIN_P, seed: int = _SEED, gpus: int = _GPUS,
    repeat_penalty: float = _REPEAT_PENALTY, no_repeat_guard: bool = _NO_REPEAT_GUARD,
    think: str = typer.Option(None, "--think", help="show|hide|collapse for this session (default: the saved /think setting)."),
    no_history: bool = typer.Option(False, "--no-history", help="Do not read or write the input history file."),
    url: str = typer.Option(None, "--url", help="Chat with an OpenAI-compatible server instead, e.g. http://127.0.0.1:8000/v1 (r1 serve)."),
    api_key: str = typer.Option(None, "--api-key", envvar="R1_API_KEY", help="With --url: the server's API key (env R1_API_KEY)."),
    remote_model: str = typer.Option(None, "--model", help="With --url: the model to ask for (default: the first the server lists)."),
    quant: str = _QUANT, group_size: int = _GROUP, quant_head: Optional[bool] = _QUANT_HEAD, decode_mode: str = _DECODE,
    draft: str = _DRAFT, draft_quant: str = _DRAFT_QUANT, mtp: bool = _MTP,
) -> None:
    """Chat in the terminal, with a thinking panel that collapses when the answer starts. /help inside."""
    from .repl import run_chat

    if think not in (None, "show", "hide", "collapse"):
        raise UsageError(f"unknown --think '{think}': use show, hide or collapse")
    if remote_model and not url:
        raise UsageError("--model goes with --url (a local model is the MODEL argument)")
    if gpus and gpus > 1 and url:
        raise UsageError("--gpus runs a local model; --url talks to a server")
    _check_text_options(None if url else device, system)
    opened = _model_options(remote_model or model, device, dtype, max_context, quant, group_size, quant_head,
                            decode_mode, draft, draft_quant, mtp, gpus, url)
    chat_args = (opened, _sampling(max_tokens, temperature, top_p, top_k, min_p, seed, repeat_penalty, no_repeat_guard),
                 system, think)
    code = None if url else _distributed(gpus, device, lambda shard, torch_device: run_chat(
        *chat_args, history=not no_history, shard=shard, torch_device=torch_device))
    if code is None:
        run_chat(*chat_args, history=not no_history, url=url, api_key=api_key)
    elif code:
        raise typer.Exit(code)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def serve(
    model: str = typer.Argument(None, help="Alias, org/name@rev or folder (default: deepseek-r1:1.5b)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (another than this machine's own: set --api-key)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port (0: any free one, printed at start)."),
    api_key: list[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY'; repeat for several keys, each its own trust domain (default: env R1_API_KEY, one key)."),
    device: str = _DEVICE, dtype: str = _DTYPE, max_context: int = _CONTEXT, gpus: int = _GPUS,
    max_queue: int = typer.Option(8, "--max-queue", min=1, help="Requests that may wait behind the running ones; more get 429."),
    parallel: int = typer.Option(None, "--parallel", min=1, max=256, help="Requests decoded together in one batch (default: what half the free memory holds KV caches for, at most 8 on a CPU; `r1 show` prints it; 1: one at a time)."),
    log_requests: str = typer.Option(None, "--log-requests", help="Append each rendered prompt and each request's end to FILE as JSON lines (debugging; created 0600)."),
    allow_host: list[str] = typer.Option(None, "--allow-host", help="Also accept this name in the Host header (repeatable; default: localhost and loopback addresses only)."),
    max_request_bytes: int = typer.Option(1 << 20, "--max-request-bytes", min=1024, help="Largest request body; larger ones get 413."),
    request_timeout: float = typer.Option(10.0, "--request-timeout", min=0.1, help="Seconds a client may take to send a request's headers, and then its body."),
    quant: str = _QUANT, group_size: int = _GROUP, quant_head: Optional[bool] = _QUANT_HEAD, decode_mode: str = _DECODE,
    no_repeat_guard: bool = _NO_REPEAT_GUARD,
    draft: str = _DRAFT, draft_quant: str = _DRAFT_QUANT, mtp: bool = _MTP,
) -> None:
    """Serve the model over an OpenAI-compatible API (with DeepSeek's reasoning_content) at http://HOST:PORT/v1."""
    from .serve import serve as run_server

    if not api_key and "R1_API_KEY" in os.environ:
        api_key = [os.environ["R1_API_KEY"]]  # the whole value is one key (checked as --api-key is)
    opened = _model_options(model, device, dtype, max_context, quant, group_size, quant_head, decode_mode, draft,
                            draft_quant, mtp, gpus)
    settings = (opened, host, port, api_key, max_queue, log_requests, allow_host, max_request_bytes, request_timeout)
    code = _distributed(gpus, device, lambda shard, torch_device: run_server(
        *settings, repeat_guard=not no_repeat_guard, parallel=parallel, shard=shard, torch_device=torch_device))
    if code is None:
        run_server(*settings, repeat_guard=not no_repeat_guard, parallel=parallel)
    elif code:
        raise typer.Exit(code)


# -- Hub commands: thin wrappers over hub.py --------------------------------------------------------------------


def _resolve_and_announce(name: str):
    """Parse NAME and print its real identity on stderr (`deepseek-r1:7b -> deepseek-ai/... (...)`)."""
    from .registry import resolve_name

    ref = resolve_name(name)
    print(ref.identity, file=sys.stderr, flush=True)
    return ref


def _terminal_confirm():
    """A yes/no prompt on stderr when we talk to a terminal; None otherwise (then hub.py refuses and names --yes)."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return None
    return lambda question: typer.confirm(question, default=False, err=True)


@app.command()
def pull(
    name: str = typer.Argument(..., help="Alias (deepseek-r1:7b), Hub repo id org/name[@revision], or org/name:Q4_K_M (one GGUF file)."),
    token: str = typer.Option(
        None, "--token", envvar="HF_TOKEN", help="Hugging Face token for gated or private repos."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Download without asking, whatever the size."),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit (same as NAME@revision)."),
) -> None:
    """Download a model's config, tokenizer and safetensors weights into the Hugging Face cache."""
    from dataclasses import replace

    from . import hub

    ref = _resolve_and_announce(name)
    if revision:
        ref = replace(ref, revision=revision)
    folder = hub.pull(ref, token=token or None, yes=yes, confirm=_terminal_confirm())
    what = f"{ref.repo}:{ref.gguf}" if ref.gguf else ref.repo
    print(f"pulled {what}@{hub.snapshot_of(folder).name[:7]}", file=sys.stderr)
    print(folder)


@app.command("list")
def list_(json_out: bool = typer.Option(False, "--json", help="Print a JSON array.")) -> None:
    """List the cached models r1 can run."""
    import json

    from . import hub

    rows = hub.list_models()
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print(f"no models in {hub.cache_dir()}: get one with `r1 pull deepseek-r1:1.5b`", file=sys.stderr)
        return
    table = [("NAME", "REPO", "REVISION", "SIZE", "ARCHITECTURE")] + [
        (
            r["alias"] or (f"{r['repo']}:{r['gguf']}" if r.get("gguf") else "-"),
            r["repo"],
            r["revision"],
            hub.format_size(r["size"]) + ("" if r["complete"] else " (partial)"),
            r["architecture"],
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@app.command()
def rm(
    name: str = typer.Argument(
        ..., help="Alias or Hub repo id org/name[@revision] (a revision removes only that one)."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Remove without asking."),
) -> None:
    """Remove a model from the Hugging Face cache and free its blobs."""
    from . import hub

    ref = _resolve_and_announce(name)
    done = hub.remove(ref, yes=yes, confirm=_terminal_confirm())
    print(f"removed {done['repo']} ({len(done['revisions'])} revision(s)), freed {hub.format_size(done['freed'])}",
          file=sys.stderr)
    for path in done["skipped"]:
        print(f"r1: left {path} alone: it lies outside the cache or is reached through a link", file=sys.stderr)


@app.command()
def show(
    name: str = typer.Argument(..., help="Alias, Hub repo id org/name[@revision], or a local folder."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON object."),
    ctx: int = typer.Option(4096, "--ctx", "--max-context", min=1, help="Context length for the memory estimate."),
    gpus: int = typer.Option(None, "--gpus", min=1, help="Plan weights and KV cache per GPU over N GPUs."),
    gpu_mem: float = typer.Option(None, "--gpu-mem", min=0.1, help="Memory of one GPU in GB (default: this machine's first GPU) to say whether it fits."),
) -> None:
    """Architecture, parameters, context length, dtype, sizes and memory estimate: before a download too."""
    import json

    from . import hub

    ref = _resolve_and_announce(name)
    info = hub.show(ref, ctx=ctx)
    if gpus:
        _plan(info, ref, ctx, gpus, gpu_mem)
    info["serve_parallel"] = _serve_parallel(info)
    if json_out:
        print(json.dumps(info, indent=2))
        return
    params, mem, sampling = info["parameters"], info["memory"], info["sampling"]
    sampling_text = ", ".join(f"{k} {v}" for k, v in sampling.items() if k not in ("source", "repeat_guard"))
    if sampling.get("repeat_guard"):
        sampling_text += ", repetition guard on"
    lines = [
        ("architecture", info["architecture"]),
        ("parameters", f"{hub.human_count(params['total'])} total, {hub.human_count(params['activated'])} activated"),
        ("context length", f"{info['context_length']} tokens"),
        ("dtype", info["dtype"]),
        ("size on disk", hub.format_size(info["size_on_disk"]) if info.get("downloaded", True) else
         f"not downloaded; {hub.format_size(info['download_size'])} to download" if info["download_size"] is not None
         else "not downloaded; the download size is not known yet"),
        (
            f"memory @{mem['context']}",
            f"{hub.format_size(mem['total'])} (weights {hub.format_size(mem['weights'])}"
            f" + KV cache {hub.format_size(mem['kv_cache'])}, {hub.format_size(mem['kv_cache_per_token'])}/token)"
            + (f"; KV cache {hub.format_size(mem['kv_cache_here'])} on this CPU ({mem['kv_cache_here_dtype']})"
               if "kv_cache_here" in mem else ""),
        ),
        ("quantized", ", ".join(f"{k} {hub.format_size(v)}" for k, v in info.get("quantized_weights", {}).items())),
        ("serve parallel", f"{info['serve_parallel']} by default here (r1 serve --parallel; KV cache per request at "
                           f"{mem['context']} tokens, half the free memory after the weights)"),
        ("chat template", "unknown before download" if info["chat_template"] is None
         else "yes" if info["chat_template"] else "no"),
        ("sampling", f"{sampling_text} ({sampling['source']})" if sampling
         else "unknown before download" if info["path"] is None else "unknown: no readable tokenizer"),
        ("MTP layer", "yes: --mtp drafts with it" if info.get("mtp_layers") else "no"),
        ("fastest here", _fastest_text(info["cpu"])),
        ("path", info["path"] or f"not downloaded: `r1 pull {name}`"),
    ]
    if "plan" in info:
        lines.insert(-4, (f"on {info['plan']['gpus']} GPUs", info["plan"]["text"]))
    if "gguf" in info:  # the file's own make-up: llama.cpp architecture, parts, tensor types by size
        g = info["gguf"]
        mix = ", ".join(f"{t} {hub.format_size(v['bytes'])} ({v['tensors']})" for t, v in g["tensor_types"].items())
        parts = f", {g['parts']} parts" if g["parts"] > 1 else ""
        lines.insert(4, ("GGUF", f"{g['architecture']} {g['file_type']}{parts}: {mix}"))
        if t := g.get("tokenizer"):
            lines.insert(5, ("tokenizer", f"{t['model']}, pre-tokenizer {t['pre']}, {t['tokens']} tokens, "
                                          f"{t['merges']} merges"
                                          + (": r1 cannot read it, `r1 run` refuses this file" if t["problem"] else "")))
    for key, value in lines:
        print(f"{key:<16}{value}")
    if info.get("unknown"):
        print(f"{'before download':<16}from config.json alone; not known yet: {', '.join(info['unknown'])}")


def _fastest_text(cpu: dict) -> str:
    head = f"{cpu['fastest']} on this {cpu['cpu_class']} CPU" if cpu["fastest"] else f"{cpu['cpu_class']} CPU"
    return f"{head} ({', '.join(cpu['flags']) or 'no named flags'}): {cpu['why']}"


def _serve_parallel(info: dict) -> int:
    """r1 serve's default --parallel on this machine, at `info`'s context (batch.default_parallel)."""
    import torch

    from .batch import default_parallel, free_memory

    mem = info["memory"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kv = mem.get("kv_cache_here", mem["kv_cache"])
    return default_parallel(kv, max(free_memory(device) - mem["weights"], 0), device.type)


def _plan(info: dict, ref, ctx: int, gpus: int, gpu_mem: float | None) -> None:
    """`r1 show --gpus N`: the per-GPU plan (planner.plan_memory) added to hub.show's info."""
    from dataclasses import asdict
    from pathlib import Path

    from .config import load_config
    from .hub import format_size
    from .parallel import Shard, check_sizes
    from .planner import describe_plan, plan_memory

    args = load_config(Path(info.get("config_folder") or info["path"]))
    mem = int(gpu_mem * 1e9) if gpu_mem else None
    if mem is None:
        import torch

        if torch.cuda.is_available():
            mem = torch.cuda.get_device_properties(0).total_memory
    check_sizes(args, Shard(rank=0, world=gpus))
    plan = plan_memory(args, gpus, ctx, mem, 4 if info["dtype"] == "float32" else 2)
    info["plan"] = {**asdict(plan), "total": plan.total, "fits": plan.fits, "text": describe_plan(plan, format_size)}

@app.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
def eval_(
    model: str = typer.Argument(..., help="Alias, org/name@rev or folder."),
    file: str = typer.Argument(..., help="JSONL: one {\"problem\": ..., \"answer\": ...} per line."),
    samples: int = typer.Option(4, "-k", "--samples", min=1, max=1024, help="Samples per problem (pass@1 is averaged over them)."),
    out: str = typer.Option(None, "--out", help="Per-sample results JSONL, appended to and resumed from (default: FILE.results.jsonl beside FILE)."),
    suffix: str = typer.Option(None, "--suffix", help="Added after each problem on a new line (default: DeepSeek's \"Please reason step by step, and put your final answer within \\boxed{}.\"; '' for none)."),
    pattern: str = typer.Option(None, "--pattern", help="A regular expression for the answer in the reply (its first group); default: the last \\boxed{}."),
    parallel: int = typer.Option(8, "--parallel", min=1, max=256, help="Samples decoded together."),
    device: str = _DEVICE, dtype: str = _DTYPE, max_context: int = _CONTEXT,
    max_tokens: int = _MAX_TOKENS, temperature: float = _TEMPERATURE, top_p: float = _TOP_P, top_k: int = _TOP_K,
    min_p: float = _MIN_P, seed: int = _SEED,
) -> None:
    """Sample each problem K times and score the answers: pass@1 (with its standard error) and majority vote."""
    from .evaluate import MATH_SUFFIX, main

    code = main(ModelOptions(model, device, dtype, max_context), file, samples,
                _sampling(max_tokens, temperature, top_p, top_k, min_p, seed), out,
                MATH_SUFFIX if suffix is None else suffix, pattern, parallel)
    if code:
        raise typer.Exit(code)


@app.command()
def bench(
    model: str = typer.Argument(None, help="Alias, repo id or folder (omit with --config)."),
    config: str = typer.Option(None, "--config", help="A config.json: random weights in its real shapes."),
    layers: int = typer.Option(None, "--layers", help="Keep only the first N layers."),
    dense_layers: int = typer.Option(None, "--dense-layers", help="DeepSeek: make the first N layers dense."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|mps"),
    dtype: str = typer.Option("auto", "--dtype", help="auto|bfloat16|float16|float32"),
    prompt_lengths: str = typer.Option("128,1024,4096", "--prompt-lengths", help="Prefill lengths to time."),
    new_tokens: int = typer.Option(128, "--new-tokens", help="Greedy tokens to decode (no early stop)."),
    compare: str = typer.Option(None, "--compare", help="'hf': race transformers on the same weights."),
    decode_mode: str = typer.Option("auto", "--decode-mode", help="auto|eager|static|compile|graph"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    quant: str = _BENCH_QUANT, group_size: int = _GROUP, draft: str = _DRAFT, mtp: bool = _MTP,
) -> None:
    """Measure load time, memory, prefill, time to first token, decode speed and bandwidth."""
    from .bench import format_report, run_bench
    from .engine import check_device
    from .errors import UsageError

    check_device(device)

    if not model and not config:
        raise UsageError("give a model (alias, repo id or folder) or --config path/to/config.json")
    if compare not in (None, "hf"):
        raise UsageError("--compare takes 'hf' (transformers)")
    lengths = tuple(int(n) for n in prompt_lengths.split(",") if n.strip())
    report = run_bench(model, config, layers, dense_layers, device, dtype, lengths, new_tokens, compare == "hf", decode_mode,
                       quant, group_size, draft, mtp)
    print(json.dumps(report, indent=2) if as_json else format_report(report))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: R1Error -> one line on stderr and its exit code."""
    argv = _take_debug_flag(list(sys.argv[1:] if argv is None else argv))
    try:
        code = app(args=argv, prog_name="r1", standalone_mode=False)
        if isinstance(code, int) and code:  # click returns a typer.Exit's code instead of raising it here
            sys.exit(code)
    except R1Error as e:
        if os.environ.get(_DEBUG_ENV):
            raise
        print(f"r1: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # A closed pipe (`r1 run ... | head`) ends quietly.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        sys.exit(0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # click usage errors and anything unexpected
        usage_errors, click_errors = _click_exception_types()
        if isinstance(e, usage_errors):
            print(f"r1: {e.format_message()}", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, click_errors):
            print(f"r1: {e.format_message()}", file=sys.stderr)
            sys.exit(e.exit_code)
        if os.environ.get(_DEBUG_ENV):
            raise
        print(f"r1: unexpected error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)


def _take_debug_flag(argv: list[str]) -> list[str]:
    """--debug anywhere before a `--`: set R1_DEBUG and drop it, so that it works after the command too."""
    end = argv.index("--") if "--" in argv else len(argv)
    if _DEBUG_FLAG in argv[:end]:
        os.environ[_DEBUG_ENV] = "1"
        return [a for a in argv[:end] if a != _DEBUG_FLAG] + argv[end:]
    return argv


def _click_exception_types() -> tuple[tuple, tuple]:
    # Typer >= 0.17 vendors click as typer._click; older versions raise click's own exceptions.
    import importlib

    usage, click_errors = [], []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(module.UsageError)
        click_errors.append(module.ClickException)
    return tuple(usage), tuple(click_errors)


if __name__ == "__main__":
    main()
