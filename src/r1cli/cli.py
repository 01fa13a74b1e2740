"""The `r1` command: argument parsing and wiring only. Work lives in the modules it calls."""

from __future__ import annotations

import json
import os
import sys

import typer

from .errors import R1Error

app = typer.Typer(
    name="r1",
    help="Run DeepSeek-R1 and its distilled models locally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Set by the --debug root option: show tracebacks instead of one-line errors.
_DEBUG_ENV = "R1_DEBUG"


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    if debug:
        os.environ[_DEBUG_ENV] = "1"


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
    name: str = typer.Argument(..., help="Alias (deepseek-r1:7b), Hub repo id org/name[@revision]."),
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
    print(f"pulled {ref.repo}@{folder.name[:7]}", file=sys.stderr)
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
            r["alias"] or "-",
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


@app.command()
def show(
    name: str = typer.Argument(..., help="Alias, Hub repo id org/name[@revision], or a local folder."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON object."),
    ctx: int = typer.Option(4096, "--ctx", min=1, help="Context length for the memory estimate."),
) -> None:
    """Architecture, parameters, context length, dtype, sizes and memory estimate of a downloaded model."""
    import json

    from . import hub

    ref = _resolve_and_announce(name)
    info = hub.show(ref, ctx=ctx)
    if json_out:
        print(json.dumps(info, indent=2))
        return
    params, mem, sampling = info["parameters"], info["memory"], info["sampling"]
    sampling_text = ", ".join(f"{k} {v}" for k, v in sampling.items() if k != "source")
    lines = [
        ("architecture", info["architecture"]),
        ("parameters", f"{hub.human_count(params['total'])} total, {hub.human_count(params['activated'])} activated"),
        ("context length", f"{info['context_length']} tokens"),
        ("dtype", info["dtype"]),
        ("size on disk", hub.format_size(info["size_on_disk"])),
        (
            f"memory @{mem['context']}",
            f"{hub.format_size(mem['total'])} (weights {hub.format_size(mem['weights'])}"
            f" + KV cache {hub.format_size(mem['kv_cache'])}, {hub.format_size(mem['kv_cache_per_token'])}/token)",
        ),
        ("chat template", "yes" if info["chat_template"] else "no"),
        ("sampling", f"{sampling_text} ({sampling['source']})" if sampling else "model defaults"),
        ("path", info["path"]),
    ]
    for key, value in lines:
        print(f"{key:<16}{value}")

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
) -> None:
    """Measure load time, memory, prefill, time to first token, decode speed and bandwidth."""
    from .bench import format_report, run_bench
    from .errors import UsageError

    if not model and not config:
        raise UsageError("give a model (alias, repo id or folder) or --config path/to/config.json")
    if compare not in (None, "hf"):
        raise UsageError("--compare takes 'hf' (transformers)")
    lengths = tuple(int(n) for n in prompt_lengths.split(",") if n.strip())
    report = run_bench(model, config, layers, dense_layers, device, dtype, lengths, new_tokens, compare == "hf", decode_mode)
    print(json.dumps(report, indent=2) if as_json else format_report(report))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: R1Error -> one line on stderr and its exit code."""
    try:
        app(args=argv, standalone_mode=False)
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
        import click

        if isinstance(e, click.exceptions.UsageError):
            print(f"r1: {e.format_message()}", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, click.exceptions.ClickException):
            print(f"r1: {e.format_message()}", file=sys.stderr)
            sys.exit(e.exit_code)
        if os.environ.get(_DEBUG_ENV):
            raise
        print(f"r1: unexpected error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
