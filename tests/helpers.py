"""What many tests repeat: running `r1` as a real process with an isolated HF cache and XDG folders, reading its
errors, and stripping terminal escapes. Use these instead of a local copy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from paths import SRC

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def r1_env(tmp_path: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of an `r1` subprocess: this checkout's sources, none of the caller's Hugging Face settings,
    NO_COLOR unset, and (given tmp_path) an empty HF_HOME and XDG config/state folders of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.pop("NO_COLOR", None)
    env.update(PYTHONPATH=str(SRC), HF_HUB_DISABLE_TELEMETRY="1", R1_DEBUG="")
    if tmp_path is not None:
        env.update(HF_HOME=str(tmp_path / "hf"), XDG_CONFIG_HOME=str(tmp_path / "config"),
                   XDG_STATE_HOME=str(tmp_path / "state"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.update(extra)
    return env


def run_r1(*args, env: dict[str, str] | None = None, input: str | bytes | None = None, timeout: float = 120,
           **kw) -> subprocess.CompletedProcess:
    """`python -m r1cli ARGS` with pipes (stdin closed unless `input` is given)."""
    text = not isinstance(input, bytes)
    return subprocess.run([sys.executable, "-m", "r1cli", *map(str, args)], input=input, capture_output=True,
                          text=text, timeout=timeout, env=env if env is not None else r1_env(),
                          stdin=None if input is not None else subprocess.DEVNULL, **kw)


def one_line_error(p: subprocess.CompletedProcess, code: int) -> str:
    """Assert that the process failed with exit `code` and one `r1: ...` line as the last thing on stderr, with no
    traceback; return that line."""
    assert p.returncode == code, (p.returncode, p.stderr)
    err = p.stderr if isinstance(p.stderr, str) else p.stderr.decode(errors="replace")
    assert "Traceback" not in err and "unexpected error" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("r1: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]
