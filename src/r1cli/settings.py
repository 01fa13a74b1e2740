"""Where r1 keeps user files: settings in the XDG config folder, chat history in the XDG state folder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

DEFAULTS = {"think": "collapse"}  # the chat's thinking display: show | hide | collapse


def _xdg(var: str, fallback: str) -> Path:
    base = os.environ.get(var)
    return Path(base if base and os.path.isabs(base) else Path.home() / fallback) / "r1cli"


def config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config")


def state_dir() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state")


def atomic_write(path: str | Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: a failed write leaves the old file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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
