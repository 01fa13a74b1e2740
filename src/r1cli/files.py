"""Opening files of a model folder, which may have been written by an attacker: regular files of bounded size only.

Every read of a model's JSON files (config, index, tokenizer_config, generation_config, tokenizer.json) and every
open of its weight files goes through here. A FIFO would block an open or a read forever, a link to /dev/zero
would read forever, a directory or a device is no file at all: each is refused with one line (CheckpointError, exit
1), as is a JSON file larger than its bound, nested deeper than the parser's recursion, or of the wrong type.
Also the one way r1 replaces a file of its own (settings, compiled steps): a temporary beside it, renamed over it.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import CheckpointError

# Bounds on what is read whole into memory. The largest real ones: DeepSeek-R1's index (about 9 MB, 91k tensors),
# a Llama 3 tokenizer.json (about 9 MB).
MAX_JSON_BYTES = 64 * 2**20
MAX_TOKENIZER_BYTES = 256 * 2**20


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading in binary, refusing anything but a regular file (following links, as the Hub
    cache's snapshots are links to blobs). Never blocks: a FIFO is opened without waiting for a writer, then refused.
    Raises FileNotFoundError when absent, CheckpointError when not a regular file or unreadable."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot open {path}: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise CheckpointError(f"{path} is {kind}: r1 reads model files only from regular files")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path, max_bytes: int) -> bytes | None:
    """The whole content of a regular file of at most `max_bytes`, or None when it does not exist."""
    try:
        f = open_regular(path)
    except FileNotFoundError:
        return None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise CheckpointError(f"{path} is {size} bytes, more than the {max_bytes} bytes r1 reads from such a file")
        data = f.read(max_bytes + 1)  # the size may have grown since fstat
    if len(data) > max_bytes:
        raise CheckpointError(f"{path} is more than the {max_bytes} bytes r1 reads from such a file")
    return data


def read_text(path: Path, max_bytes: int = MAX_JSON_BYTES) -> str | None:
    """A UTF-8 text file (a chat template, tokenizer.json), bounded as `read_bytes`; None when absent."""
    data = read_bytes(path, max_bytes)
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text ({e})") from None


def parse_json(data: bytes | str, what: str, kind: type = dict):
    """JSON text -> a value of type `kind` (dict or list); CheckpointError naming `what` otherwise, including for
    nesting deeper than the parser's recursion limit."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise CheckpointError(f"{what} is not valid JSON ({reason})") from None
    if not isinstance(value, kind):
        raise CheckpointError(
            f"{what} holds a JSON {_json_type(value)} where r1 expects a JSON {_json_type(kind())}"
        )
    return value


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES, kind: type = dict):
    """A model folder's JSON file as a dict (or `kind`), or None when it does not exist."""
    data = read_bytes(path, max_bytes)
    return None if data is None else parse_json(data, str(path), kind)


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


@contextlib.contextmanager
def replacing(path: Path, prefix: str, suffix: str) -> Iterator[tuple[int, str]]:
    """(fd, name) of a new private temporary file beside `path`, renamed over `path` when the block ends and
    removed when it fails: a failed or interrupted write leaves the old file as it was."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)  # created 0600
    try:
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
