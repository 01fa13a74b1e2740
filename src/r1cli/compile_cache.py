"""The compiled decode step's on-disk cache: torch.compile's own artifacts (Inductor's compiled graphs, AOT
autograd's), saved with `torch.compiler.save_cache_artifacts` after the first compiled steps and loaded with
`load_cache_artifacts` before the next process compiles, so only the first run on a machine pays the code
generation and the C++ compiler (later runs still trace the model, then hit the cache).

One file per (model shape, dtype, weight formats, device, torch version, CPU features), in the user's own XDG cache
folder (`$XDG_CACHE_HOME/r1cli/compile/`, never the Hugging Face cache, which may be shared): the artifacts are
pickles and compiled code, so a file is loaded only when it is a regular file (not a link) owned by this user and
writable by no one else, in a folder of the same kind. Anything wrong with it just means compiling again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

import torch

from .quant_formats import cpu_has_vnni

MAX_BYTES = 1 << 30  # a larger file is not ours (artifacts of a decode step are a few MB)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    return Path(base if base and os.path.isabs(base) else Path.home() / ".cache") / "r1cli" / "compile"


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def step_key(model: torch.nn.Module, mode: str) -> str:
    """What the compiled step depends on: the model's shape and dtype, each weight's format (scheme, int8 kernel,
    int4 layout and group), the device, torch's version and the CPU's vector features."""
    formats = sorted({f"{type(m).__name__}:{getattr(m, 'kernel', '')}:{getattr(m, 'layout', '')}:"
                      f"{getattr(m, 'group_size', '')}" for m in model.modules() if hasattr(m, "scheme")})
    first = next(model.parameters())
    facts = {
        "args": repr(dataclasses.asdict(model.args)) if dataclasses.is_dataclass(model.args) else repr(model.args),
        "dtype": str(first.dtype), "device": first.device.type, "formats": formats, "mode": mode,
        "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(), "vnni": cpu_has_vnni(),
        "bf16_math": _onednn_bf16(),
    }
    if first.device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(first.device)
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


def _private(st: os.stat_result, directory: bool) -> bool:
    kind = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    return kind and st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def load(key: str) -> bool:
    """Put the saved artifacts for `key` into torch.compile's caches; False when there are none (or not ours)."""
    path = cache_dir() / f"{key}.bin"
    try:
        if not _private(os.lstat(path.parent), True):
            return False
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not _private(st, False) or st.st_size > MAX_BYTES:
                return False
            blob = f.read()
        return torch.compiler.load_cache_artifacts(blob) is not None
    except Exception:  # a missing, foreign, truncated or stale file: compile as if there were none
        return False


def save(key: str) -> bool:
    """Write every artifact this process's compilations made so far (replacing an older file for `key`)."""
    try:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return False
        blob = saved[0]
        folder = cache_dir()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _private(os.lstat(folder), True):
            return False
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")  # created 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, folder / f"{key}.bin")
        except BaseException:
            os.unlink(tmp)
            raise
        return True
    except Exception:  # a read-only or full disk: no cache, never an error
        return False
