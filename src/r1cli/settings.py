"""Where r1 keeps user files: settings in the XDG config folder, chat history in the XDG state folder."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import R1Error
from .files import replacing

DEFAULTS = {"think": "collapse"}  # the chat's thinking display: show | hide | collapse


def _xdg(var: str, fallback: str) -> Path:
    base = os.environ.get(var)
    return Path(base if base and os.path.isabs(base) else Path.home() / fallback) / "r1cli"


def config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config")


def state_dir() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state")


_NOT_REGULAR = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))


def atomic_write(path: str | Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: a failed write leaves the old file.
    `path` must be a regular file or a new name: a rename would replace a link, a device (/dev/null as root) or a
    FIFO by a regular file, so those are refused (an R1Error) before anything is written."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise R1Error(f"cannot write {path}: {e.strerror or e}") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
        raise R1Error(f"{path} is {kind}: r1 writes only to a regular file or a new name, give another")
    with replacing(path, f".{path.name}.", ".tmp") as (fd, _):
        if mode is not None:
            os.fchmod(fd, stat.S_IMODE(mode))  # the file keeps its permissions (mkstemp makes 0600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def load_settings() -> dict:
    try:
        saved = json.loads((config_dir() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}  # a missing or broken settings file never stops the chat
    return {**DEFAULTS, **(saved if isinstance(saved, dict) else {})}


def save_setting(key: str, value) -> None:
    settings = load_settings()
    settings[key] = value
    config_dir().mkdir(parents=True, exist_ok=True)
    atomic_write(config_dir() / "config.json", json.dumps(settings, indent=2) + "\n")
