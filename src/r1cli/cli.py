"""The `r1` command: argument parsing and wiring only. Work lives in the modules it calls."""

from __future__ import annotations

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
