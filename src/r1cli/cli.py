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
