"""The compiled decode step's on-disk cache, two kinds of file:

- `KEY.pt2`: the CPU decode step as an AOTInductor package (aot_step.py): compiled code without the weights,
  loaded in seconds by a later process, with no tracing. `KEY.failed`: that step did not compile on this machine
  (its error in one line), so later runs decode eagerly without trying again.
- `KEY.bin`: torch.compile's own artifacts (Inductor's compiled graphs, AOT autograd's) for `--decode-mode compile`
  on a GPU, saved with `torch.compiler.save_cache_artifacts` after the first compiled steps and loaded with
  `load_cache_artifacts` before the next process compiles (later runs still trace the model, then hit the cache).

One file per (model shape, dtype, weight formats, device, torch version, CPU features), in the user's own XDG cache
folder (`$XDG_CACHE_HOME/r1cli/compile/`, never the Hugging Face cache, which may be shared): the files are pickles
and compiled code, so a file is loaded only when it is a regular file (not a link) owned by this user and writable
by no one else, in a folder of the same kind. Anything wrong with it just means compiling again. Deleting the folder
forgets every compiled step (and every failure).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import tempfile
import time
from pathlib import Path

import torch

from .files import replacing
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


def aot_facts() -> dict:
    """What the AOT compile's options (aot_options) depend on here, for the package key. cpp.threads: the OpenMP
    team of the generated kernels, baked into the package. One thread, unless the one-row matmuls become generated
    reductions (cpu.one_row_matmul_as_reduction, gemv_pass.py): those stream the weights and want every thread
    torch has (Inductor runs a loop too small to split on one thread anyway). Otherwise the generated kernels of a
    one-token step work on vectors of a few thousand values, where an OpenMP team costs more than it saves; the
    matmuls are then PyTorch's own kernels, which use every thread torch is given. (No Inductor import here: this
    runs at every start. An edit to the pass changes aot_step.code_version, which is in the package key too.)"""
    from .cpu import one_row_matmul_as_reduction

    if not one_row_matmul_as_reduction():
        return {"threads": 1, "one_row_matmul_pass": False}
    return {"threads": torch.get_num_threads(), "one_row_matmul_pass": True}


def aot_options() -> dict:
    """Inductor's options for the AOT compile of the CPU decode step (aot_facts says why)."""
    facts = aot_facts()
    options = {"aot_inductor.package_constants_in_so": False, "cpp.threads": facts["threads"]}
    if facts["one_row_matmul_pass"]:
        from .gemv_pass import OneRowMatmulPass

        options["post_grad_custom_post_pass"] = OneRowMatmulPass()
    return options


def step_key(model: torch.nn.Module, mode: str, extra=None) -> str:
    """What the compiled step depends on: the model's shape and dtype, each weight's format (scheme, int8 kernel,
    int4 layout and group), the device, torch's version and the CPU's vector features; `extra`: anything else the
    caller's step depends on (JSON-able)."""
    formats = sorted({f"{type(m).__name__}:{getattr(m, 'kernel', '')}:{getattr(m, 'layout', '')}:"
                      f"{getattr(m, 'group_size', '')}" for m in model.modules() if hasattr(m, "scheme")})
    first = next(model.parameters())
    facts = {
        "args": repr(dataclasses.asdict(model.args)) if dataclasses.is_dataclass(model.args) else repr(model.args),
        "dtype": str(first.dtype), "device": first.device.type, "formats": formats, "mode": mode,
        "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(), "vnni": cpu_has_vnni(),
        "bf16_math": _onednn_bf16(), "extra": extra,
    }
    if mode == "aot":
        facts["aot_options"] = aot_facts()
    if first.device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(first.device)
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


def _private(st: os.stat_result, directory: bool) -> bool:
    kind = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    return kind and st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _open_private(path: Path):
    """`path` opened for reading when it and its folder are ours alone (see the module's docstring), else None."""
    if not _private(os.lstat(path.parent), True):
        return None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    f = os.fdopen(fd, "rb")
    st = os.fstat(f.fileno())
    if not _private(st, False) or st.st_size > MAX_BYTES:
        f.close()
        return None
    return f


def package(key: str) -> Path | None:
    """The path of the AOTInductor package for `key`, when there is one that is ours alone (the folder is private
    too, so the file checked here is the file the loader opens)."""
    path = cache_dir() / f"{key}.pt2"
    try:
        f = _open_private(path)
    except OSError:
        return None
    if f is None:
        return None
    f.close()
    return path


def _private_folder() -> Path:
    folder = cache_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _private(os.lstat(folder), True):
        raise PermissionError(f"{folder} is not private to this user")
    return folder


STALE_S = 6 * 3600  # a temporary file this old is a build whose process ended before it finished


def _remove_stale(folder: Path) -> None:
    """Remove the temporary files of builds that never finished (their process exited first: a short `r1 run`);
    a younger one may be another process's build in progress."""
    now = time.time()
    for tmp in folder.glob(".*.pt2"):
        try:
            st = os.lstat(tmp)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > STALE_S:
                os.unlink(tmp)
        except OSError:
            pass


def store_package(key: str, exported) -> Path:
    """Compile an exported step (torch.export) into the package for `key`, weights left out; returns its path.
    Raises whatever the compile raises (the caller falls back to eager)."""
    folder = _private_folder()
    _remove_stale(folder)
    with replacing(folder / f"{key}.pt2", f".{key}.", ".pt2") as (fd, tmp):
        os.close(fd)
        torch._inductor.aoti_compile_and_package(exported, package_path=tmp, inductor_configs=aot_options())
        os.chmod(tmp, 0o600)
    return folder / f"{key}.pt2"


def failed(key: str) -> bool:
    """Did the step for `key` fail to compile on this machine before?"""
    try:
        f = _open_private(cache_dir() / f"{key}.failed")
    except OSError:
        return False
    if f is None:
        return False
    f.close()
    return True


def mark_failed(key: str, why: str) -> None:
    """Remember that the step for `key` does not compile here (never an error itself)."""
    try:
        folder = _private_folder()
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(" ".join(why.split())[:2000] + "\n")
        os.replace(tmp, folder / f"{key}.failed")
    except Exception:
        pass


def load(key: str) -> bool:
    """Put the saved artifacts for `key` into torch.compile's caches; False when there are none (or not ours)."""
    path = cache_dir() / f"{key}.bin"
    try:
        f = _open_private(path)
        if f is None:
            return False
        with f:
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
