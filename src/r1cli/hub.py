"""Models in the Hugging Face cache: find, pull, list, show and remove them.

Everything goes through huggingface_hub (snapshot_download, HfApi.model_info, scan_cache_dir), so the cache is the
standard one shared with transformers, and downloads, resumes and locking are huggingface_hub's own. This module adds
what r1 needs on top: only the files that run a model, a size and disk check before downloading, and one-line errors.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil
import signal
import sys
import threading
import warnings
import contextlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .config import SUPPORTED_ARCHITECTURES
from .errors import ModelNotFoundError, R1Error, UsageError
from .files import read_json
from .registry import ModelRef, alias_for_repo

# What `r1 pull` downloads: top-level files only (subfolders hold other formats or originals).
RUN_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",  # where transformers >= 4.43 saves the template when it is not in tokenizer_config.json
)
CONFIRM_ABOVE_BYTES = 2 * 10**9
DEFAULT_CTX = 4096

Confirm = Callable[[str], bool]


def is_run_file(path: str) -> bool:
    return "/" not in path and (path in RUN_FILES or path.endswith(".safetensors"))


def cache_dir() -> Path:
    """The HF hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), as huggingface_hub reads it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def format_size(n: float) -> str:
    """Decimal units, as the Hub and `hf cache scan` show sizes."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"


# -- finding a model on disk ---------------------------------------------------------------------------------------


def local_path(ref: ModelRef, token: str | None = None) -> Path:
    """The folder holding `ref`'s files: a local folder as is, else its snapshot in the HF cache (no network).

    Raises ModelNotFoundError (exit 3, naming `r1 pull NAME`) when the model is not cached or only partly downloaded.
    """
    if ref.path is not None:
        return ref.path
    check_repo_id(ref)
    folder = _cached_snapshot(ref, token)
    what = f"{ref.repo}:{ref.gguf}" if ref.gguf else ref.repo
    if folder is None:
        raise ModelNotFoundError(f"{what} is not downloaded (cache: {cache_dir()}): run `r1 pull {ref.name}`")
    if ref.gguf:  # the one .gguf file of the snapshot that the tag names (a split one: its first part)
        local = [p.relative_to(folder).as_posix() for p in folder.rglob("*.gguf") if p.is_file()]
        try:
            first = pick_gguf(local, ref.gguf, ref.repo)
        except R1Error:
            raise ModelNotFoundError(
                f"{what} is not downloaded (cache: {cache_dir()}): run `r1 pull {ref.name}`"
            ) from None
        absent = [n for n in split_names(first) if not (folder / n).is_file()]
        if absent:
            raise ModelNotFoundError(f"{what} is only partly downloaded (missing {Path(absent[0]).name}"
                                     f"{f' and {len(absent) - 1} more' if len(absent) > 1 else ''}): "
                                     f"run `r1 pull {ref.name}` to finish")
        return folder / first
    missing = missing_weights(folder)
    ggufs = gguf_files([p.name for p in folder.rglob("*.gguf")]) if missing == ["config.json"] else []
    if ggufs:  # a repo of GGUF files, named without a tag
        types = ", ".join(sorted({quant_type(n) for n in ggufs}))
        raise UsageError(f"{ref.repo} holds GGUF files: name one as {ref.repo}:TYPE (TYPE: {types})")
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelNotFoundError(
            f"{ref.repo} is only partly downloaded (missing {missing[0]}{more}): run `r1 pull {ref.name}` to finish"
        )
    return folder


def _cached_snapshot(ref: ModelRef, token: str | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        # Resolves refs/<revision> to the snapshot folder the way transformers does; weights are checked below.
        return Path(
            snapshot_download(
                ref.repo, revision=ref.revision, cache_dir=cache_dir(), local_files_only=True,
                allow_patterns=[] if ref.gguf else ["config.json"], token=token,
            )
        )
    except (LocalEntryNotFoundError, HFValidationError):
        pass
    # `r1 list` shows short commits: accept them as revisions too.
    snapshots = _storage_folder(ref.repo) / "snapshots"
    if ref.revision and snapshots.is_dir():
        found = match_revisions(ref.revision, {p.name: set() for p in snapshots.iterdir()})
        if found:
            return snapshots / found[0]
    return None


_SHORT_COMMIT = re.compile(r"[0-9a-f]{4,40}")


def match_revisions(revision: str, commits: dict[str, set[str]]) -> list[str]:
    """The cached commits `revision` names, by one rule for run, show and rm: a ref (branch or tag) recorded in the
    cache, else a commit hash or a unique prefix of it of at least 4 hex digits. `commits`: commit -> its refs.
    A prefix matching several commits is a usage error listing them."""
    named = sorted(c for c, refs in commits.items() if revision in refs)
    if named or not _SHORT_COMMIT.fullmatch(revision):
        return named
    found = sorted(c for c in commits if c.startswith(revision))
    if len(found) > 1:
        raise UsageError(
            f"revision '{revision}' matches {len(found)} cached commits ({', '.join(c[:12] for c in found)}): "
            "give more of its digits"
        )
    return found


def check_repo_id(ref: ModelRef) -> None:
    """Refuse (exit 2) a repo id or revision that the Hub would not accept and that could name a path elsewhere
    in the cache: `..`, `.`, odd characters."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(ref.repo)
        if any(part in ("", ".", "..") for part in ref.repo.split("/")):
            raise HFValidationError(ref.repo)
    except HFValidationError:
        raise UsageError(
            f"'{ref.repo}' is not a Hub repo id: use org/name (letters, digits, '-', '_' and '.', no '..' or '--')"
        ) from None
    rev = ref.revision
    if rev is not None and (
        not re.fullmatch(r"[A-Za-z0-9._/-]+", rev) or rev.startswith("/") or ".." in rev.split("/")
    ):
        raise UsageError(f"'{rev}' is not a revision: use a branch, a tag or a commit hash (`r1 list` shows them)")


def missing_weights(folder: Path) -> list[str]:
    """Files a run needs that are absent from `folder`: config.json and every shard the index names."""
    if not (folder / "config.json").is_file():
        return ["config.json"]
    from .weights import read_index

    weight_map = read_index(folder)  # shard names confined to the folder
    if weight_map is not None:
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors")) or ["model.safetensors"]
    return [s for s in shards if not (folder / s).is_file()]  # is_file follows the snapshot's symlinks to blobs


def snapshot_of(path: Path) -> Path | None:
    """The snapshot folder holding `path` (a snapshot itself, or a file in one), or None outside the cache."""
    for folder in (path, *path.parents):
        if folder.parent.name == "snapshots":
            return folder
    return None


# -- GGUF files in a repo --------------------------------------------------------------------------------------

# llama.cpp's quant types as they appear in file names: Q4_K_M, Q8_0, IQ4_XS, UD-Q4_K_XL, BF16, F16...
_QUANT_RE = re.compile(r"(?<![A-Za-z0-9])((?:UD-)?I?Q\d+(?:_[A-Z0-9]+)*|BF16|F16|F32)(?=[-.]|$)", re.IGNORECASE)
_SPLIT_RE = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


def gguf_files(names: list[str]) -> list[str]:
    """The model GGUFs among a repo's files (not the vision projectors, mmproj-*)."""
    return sorted(n for n in names if n.lower().endswith(".gguf") and not Path(n).name.lower().startswith("mmproj"))


def quant_type(filename: str) -> str:
    """`DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf` -> `Q4_K_M` (the file name when it names no type)."""
    found = _QUANT_RE.findall(Path(filename).name)
    return found[-1].upper() if found else Path(filename).name


def pick_gguf(names: list[str], tag: str, repo: str) -> str:
    """The one GGUF file among `names` whose name carries the quant type `tag` (case-insensitive): exactly, as a
    word of its own, or else anywhere in the name. One-line errors list what the repo has."""
    ggufs = gguf_files(names)
    if not ggufs:
        raise R1Error(f"{repo} has no .gguf files: drop ':{tag}' to pull its safetensors")
    word = re.compile(rf"(?<![A-Za-z0-9]){re.escape(tag)}(?![A-Za-z0-9_])", re.IGNORECASE)
    matches = [n for n in ggufs if word.search(Path(n).name)]
    matches = matches or [n for n in ggufs if tag.lower() in Path(n).name.lower()]
    available = ", ".join(sorted({quant_type(n) for n in ggufs}))
    if not matches:
        raise ModelNotFoundError(f"{repo} has no GGUF file for '{tag}'; it has: {available}")
    if len(matches) > 1 and all(_SPLIT_RE.search(n) for n in matches):
        sets = {_SPLIT_RE.sub("", n) for n in matches}
        if len(sets) == 1:  # the parts of one split file: named by its first part
            return sorted(matches)[0]
    if len(matches) > 1:
        raise UsageError(
            f"'{tag}' matches {len(matches)} GGUF files in {repo} ({', '.join(matches)}); name one of: {available}"
        )
    return matches[0]


def split_names(name: str) -> list[str]:
    """Every part of the split GGUF whose part `name` is (`X-00001-of-00003.gguf` -> the three), else [name]."""
    m = re.search(r"-(\d{5})-of-(\d{5})\.gguf$", name, re.IGNORECASE)
    if not m or int(m.group(2)) < 2:
        return [name]
    stem = name[: m.start()]
    return [f"{stem}-{i:05d}-of-{int(m.group(2)):05d}.gguf" for i in range(1, int(m.group(2)) + 1)]


def _storage_folder(repo: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir() / repo_folder_name(repo_id=repo, repo_type="model")


# -- pull --------------------------------------------------------------------------------------------------------


def pull(
    ref: ModelRef,
    token: str | None = None,
    yes: bool = False,
    confirm: Confirm | None = None,
    console=None,
    confirm_above: int = CONFIRM_ABOVE_BYTES,
) -> Path:
    """Download the files that run `ref` into the HF cache and return the snapshot folder (for `org/name:TYPE`,
    the one GGUF file, in it).

    Shows total size and free disk first; refuses when the disk is too small; asks `confirm` above `confirm_above`
    bytes unless `yes` (without `confirm`, i.e. without a terminal, it refuses and names --yes). Files finished by an
    earlier, interrupted pull are kept and not downloaded again.
    """
    from huggingface_hub import HfApi, constants, snapshot_download

    say = _printer(console)
    if ref.path is not None:
        raise UsageError(f"{ref.name} is a local folder: there is nothing to pull")
    check_repo_id(ref)
    if constants.is_offline_mode():
        try:
            return local_path(ref, token)  # already complete: nothing to download
        except ModelNotFoundError:
            raise R1Error("offline mode is on (HF_HUB_OFFLINE): unset HF_HUB_OFFLINE to download models") from None
    cache = cache_dir()
    with hub_errors(ref, token):
        info = HfApi().model_info(ref.repo, revision=ref.revision, files_metadata=True, token=token)
        siblings = info.siblings or []
        if ref.gguf:  # one GGUF file: it holds the config, tokenizer and template too
            gguf_name = pick_gguf([s.rfilename for s in siblings], ref.gguf, ref.repo)
            parts = split_names(gguf_name)  # a split file: all its parts
            files = [s for s in siblings if s.rfilename in parts]
            if len(files) != len(parts):
                raise R1Error(f"{ref.repo} lacks parts of the split GGUF {gguf_name}: it has {len(files)} of {len(parts)}")
        else:
            files = [s for s in siblings if is_run_file(s.rfilename)]
        names = sorted(s.rfilename for s in files)
        if not ref.gguf and ("config.json" not in names or not any(n.endswith(".safetensors") for n in names)):
            ggufs = gguf_files([s.rfilename for s in siblings])
            if ggufs:
                types = ", ".join(sorted({quant_type(n) for n in ggufs}))
                raise UsageError(
                    f"{ref.repo} holds GGUF files: pull one with `r1 pull {ref.repo}:TYPE` (TYPE: {types})"
                )
            raise R1Error(
                f"{ref.repo} has no config.json with safetensors weights, nor GGUF files: r1 cannot run it"
            )
        total = sum(s.size or 0 for s in files)
        blobs = _storage_folder(ref.repo) / "blobs"
        # Blobs are named by their ETag: the LFS sha256, or the git blob id for small files.
        todo = sum(s.size or 0 for s in files if not (blobs / (s.lfs.sha256 if s.lfs else str(s.blob_id))).is_file())
        free = _free_disk(cache)
        say(
            f"{ref.repo}@{(info.sha or '?')[:7]}: {len(files)} files, {format_size(total)}"
            + (f" ({format_size(todo)} left to download)" if todo != total else "")
            + f"; free disk: {format_size(free)} in {cache}"
        )
        if todo > free:
            raise R1Error(
                f"not enough disk space for {ref.repo}: it needs {format_size(todo)}, "
                f"{cache} has {format_size(free)} free"
            )
        if todo > confirm_above and not yes:
            if confirm is None:
                raise UsageError(f"{ref.repo} is {format_size(todo)}: pass --yes to download it without a terminal")
            if not confirm(f"Download {format_size(todo)} of {ref.repo}?"):
                raise R1Error("download cancelled")
        # Exact names, not globs: what we sized is what we fetch. Progress bars go to stderr (tqdm).
        with (
            _exit_on_interrupt(blobs, f"interrupted: finished files are kept, `r1 pull {ref.name}` continues"),
            warnings.catch_warnings(),
        ):
            # We checked free space for the whole download above; its per-file warning would only add noise.
            warnings.filterwarnings("ignore", message="Not enough free disk space")
            folder = snapshot_download(
                ref.repo, revision=ref.revision, allow_patterns=names, cache_dir=cache, token=token,
            )
    return Path(folder) / gguf_name if ref.gguf else Path(folder)


@contextmanager
def _exit_on_interrupt(blobs: Path, message: str) -> Iterator[None]:
    """Make Ctrl-C stop a download now, with exit code 130.

    huggingface_hub downloads in a thread pool that the interpreter joins before exiting, so a KeyboardInterrupt
    would only take effect once every file is done. Instead, on SIGINT we remove the partial files this download
    started (huggingface_hub cannot resume them in another process) and leave at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    before = set(blobs.glob("*.incomplete")) if blobs.is_dir() else set()

    def stop(signum, frame):
        for partial in set(blobs.glob("*.incomplete")) - before:
            partial.unlink(missing_ok=True)
        print(f"\nr1: {message}", file=sys.stderr, flush=True)
        os._exit(130)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _free_disk(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent  # the cache may not exist yet: ask about the disk it will be created on
    return shutil.disk_usage(path).free


@contextmanager
def hub_errors(ref: ModelRef, token: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub, network and disk errors into one-line R1Errors (exit 1, or 3 for not found)."""
    try:
        yield
    except R1Error:
        raise
    except Exception as e:
        explained = _explain(e, ref, token)
        if explained is None:
            raise
        raise explained from e


def _explain(error: BaseException, ref: ModelRef, token: str | None) -> R1Error | None:
    """The first cause we can name, walking down the chain (huggingface_hub wraps e.g. a ConnectError in a
    LocalEntryNotFoundError). HTTP status errors are named before transport errors: anything left from the HTTP
    stack (httpx2, httpx or requests, depending on the huggingface_hub version) is a failed connection, timeout or
    transfer."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, GatedRepoError):  # a RepositoryNotFoundError: must come first
            page = f"{constants.ENDPOINT}/{ref.repo}"
            if token or get_token():
                return R1Error(f"your token has no access to the gated repo {ref.repo}: request access on {page}")
            return R1Error(f"{ref.repo} is gated: accept its conditions on {page}, then set HF_TOKEN or pass --token")
        if isinstance(e, RevisionNotFoundError):
            return ModelNotFoundError(f"{ref.repo} has no revision '{ref.revision}' on the Hub")
        if isinstance(e, RepositoryNotFoundError):
            return ModelNotFoundError(
                f"no model {ref.repo} on the Hub (for a private repo, set HF_TOKEN or pass --token)"
            )
        if isinstance(e, OfflineModeIsEnabled):
            return R1Error("offline mode is on (HF_HUB_OFFLINE): unset HF_HUB_OFFLINE to download models")
        if isinstance(e, HfHubHTTPError):
            status = e.response.status_code if e.response is not None else "?"
            if status == 401:
                return R1Error("the Hub rejected your token: check HF_TOKEN or --token")
            return R1Error(f"the Hub answered HTTP {status} for {ref.repo}: try again later")
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return R1Error(
                f"disk full while downloading {ref.repo} into {cache_dir()}: free some space (r1 rm) and rerun "
                f"`r1 pull {ref.name}`; finished files are kept"
            )
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.split(".")[0] in _HTTP_LIBRARIES:
            return R1Error(f"cannot reach the Hub at {constants.ENDPOINT}: check your network connection")
    if isinstance(error, OSError):  # e.g. huggingface_hub's size consistency check: keep its first line
        return R1Error(f"download of {ref.repo} failed: {str(error).splitlines()[0]}")
    return None


_HTTP_LIBRARIES = {"httpx2", "httpx", "httpcore", "requests", "urllib3"}


def _printer(console) -> Callable[[str], None]:
    if console is None:
        return lambda msg: print(msg, file=sys.stderr, flush=True)
    return lambda msg: console.print(msg, markup=False, highlight=False, soft_wrap=True)


# -- list and rm -------------------------------------------------------------------------------------------------


def _scan():
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan_cache_dir(cache_dir())
    except CacheNotFound:
        return None


def list_models() -> list[dict]:
    """Cached models r1 can run, one entry per cached revision (newest first within a repo)."""
    info = _scan()
    rows = []
    for repo in sorted(info.repos if info else [], key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            arch = _architecture(rev.snapshot_path)
            if arch not in SUPPORTED_ARCHITECTURES:
                rows.extend(_gguf_rows(repo.repo_id, rev))
                continue
            alias = alias_for_repo(repo.repo_id)
            rows.append({
                "alias": alias.name if alias else None,
                "repo": repo.repo_id,
                "revision": rev.commit_hash[:7],
                "refs": sorted(rev.refs),
                "size": rev.size_on_disk,
                "architecture": arch,
                "complete": _complete(rev.snapshot_path),
                "path": str(rev.snapshot_path),
            })
    return rows


def _complete(folder: Path) -> bool:
    try:
        return not missing_weights(folder)
    except R1Error:  # a broken index: listed as incomplete, `r1 show` or `r1 run` says what is wrong
        return False


def _gguf_rows(repo_id: str, rev) -> list[dict]:
    """One row per runnable GGUF file of a cached revision (`r1 run org/name:TYPE` names it)."""
    from .gguf import GGUFFile, architecture_of, split_parts

    rows = []
    for path in sorted(rev.snapshot_path.rglob("*.gguf")):
        if not path.is_file() or path.name.lower().startswith("mmproj"):
            continue
        parts = split_parts(path) or [path]  # a split file: one row, named by its first part
        if path != parts[0]:
            continue
        try:
            arch = architecture_of(GGUFFile(path))
        except R1Error:
            arch = None
        if arch is None:
            continue
        rows.append({
            "alias": None, "repo": repo_id, "gguf": quant_type(path.name), "revision": rev.commit_hash[:7],
            "refs": sorted(rev.refs), "size": sum(p.stat().st_size for p in parts if p.is_file()),
            "architecture": arch, "complete": all(p.is_file() for p in parts), "path": str(path),
        })
    return rows


def _architecture(folder: Path) -> str | None:
    try:
        archs = (read_json(folder / "config.json") or {}).get("architectures")
    except (OSError, R1Error):
        return None
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


def remove(ref: ModelRef, yes: bool = False, confirm: Confirm | None = None) -> dict:
    """Delete `ref`'s cached revisions (all of them, or the one named by @revision) and the blobs only they use."""
    if ref.path is not None:
        raise UsageError(f"{ref.name} is a local folder: r1 rm only removes models from the Hugging Face cache")
    check_repo_id(ref)
    info = _scan()
    repo = next(
        (r for r in (info.repos if info else []) if r.repo_type == "model" and r.repo_id.lower() == ref.repo.lower()),
        None,
    )
    if repo is None:
        raise ModelNotFoundError(f"{ref.repo} is not in the cache ({cache_dir()}): nothing to remove")
    commits = {r.commit_hash: set(r.refs) for r in repo.revisions}
    revisions = sorted(commits) if ref.revision is None else match_revisions(ref.revision, commits)
    if not revisions:
        raise ModelNotFoundError(f"{ref.repo} has no cached revision '{ref.revision}': see `r1 list`")
    # delete_revisions matches commit hashes across all repos, and two repos can share one (a duplicated repo):
    # give it a view of this repo only.
    strategy = dataclasses.replace(info, repos=frozenset([repo])).delete_revisions(*revisions)
    strategy, links, skipped = _confined(strategy, cache_dir(), Path(repo.repo_path))
    # the quantized weights r1 cached for these revisions (quant.cache_path) go with them
    from .quant import CACHE_DIR

    quant_dirs = []
    for d in (Path(repo.repo_path) / CACHE_DIR / rev for rev in revisions):
        if d.parent.is_symlink():
            skipped.append(d)  # a linked r1-quant folder: what it leads to is not ours
        elif d.is_symlink():
            links.append(d)  # the link goes, never what it points at
        elif d.is_dir() and _inside(d, cache_dir()):
            quant_dirs.append(d)
    freed = strategy.expected_freed_size + sum(p.stat().st_size for d in quant_dirs for p in d.rglob("*")
                                               if p.is_file() and not p.is_symlink())
    if not yes:
        if confirm is None:
            raise UsageError(f"removing {ref.repo} needs confirmation: pass --yes to remove it without a terminal")
        if not confirm(f"Remove {ref.repo} ({len(revisions)} revision(s), {format_size(freed)})?"):
            raise R1Error("nothing removed")
    for link in links:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
    strategy.execute()
    for d in quant_dirs:
        shutil.rmtree(d, ignore_errors=True)  # rmtree removes links inside, never their targets
    with contextlib.suppress(OSError):  # the cache folder itself, once empty
        (Path(repo.repo_path) / CACHE_DIR).rmdir()
    return {"repo": repo.repo_id, "revisions": revisions, "freed": freed, "skipped": [str(p) for p in skipped]}


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, every link on the way resolved, lies in `root` (resolved too)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def _confined(strategy, root: Path, repo_path: Path):
    """huggingface_hub's deletion plan, kept to the cache: a blob is deleted only in this repo's blobs folder (a
    snapshot entry linking to a file elsewhere loses its link, never the file), a snapshot, repo or ref folder that is itself a
    link is unlinked rather than followed, and an entry reached through a linked folder is skipped. Returns the plan,
    the links to unlink, and what was skipped (said to the user)."""
    links, skipped = [], []

    def keep(paths, whole: bool):
        kept = set()
        for p in paths:
            if whole and p.is_symlink() and _inside(p.parent, root):
                links.append(p)
            elif _inside(p if whole else p.parent, root) and (whole or p.is_symlink() or _inside(p, root)):
                kept.add(p)
            else:
                skipped.append(p)
        return frozenset(kept)

    # A blob is the first hop of a snapshot entry's link: one of this repo's blobs, or anything a planted link names.
    own_blobs = os.path.realpath(repo_path / "blobs")
    blobs = set()
    for b in strategy.blobs:
        (blobs.add(b) if os.path.realpath(b.parent) == own_blobs else skipped.append(b))
    strategy = dataclasses.replace(
        strategy, blobs=frozenset(blobs), repos=keep(strategy.repos, True), snapshots=keep(strategy.snapshots, True),
        refs=keep(strategy.refs, False), files=keep(strategy.files, False),
    )
    return strategy, links, skipped


# -- show --------------------------------------------------------------------------------------------------------

def show(ref: ModelRef, ctx: int = DEFAULT_CTX, token: str | None = None) -> dict:
    """What `r1 show` prints: architecture, parameters, context, dtype, sizes, memory at `ctx` tokens, sampling.
    A Hub model not (fully) downloaded is answered from its config.json alone (_show_before_download)."""
    try:
        folder = local_path(ref, token)
    except ModelNotFoundError:
        if ref.path is not None or ref.gguf:
            raise
        return _show_before_download(ref, ctx, token)
    if folder.is_file():
        return _show_gguf(ref, folder, ctx)
    return _show_folder(ref, folder, ctx)


def bundled_config(ref: ModelRef) -> Path | None:
    """The config.json shipped in r1cli/hub_configs for an alias's repo at its default revision, else None."""
    if ref.alias is None or ref.revision is not None:
        return None
    path = Path(__file__).parent / "hub_configs" / ref.repo.split("/")[1] / "config.json"
    return path if path.is_file() else None


def _show_before_download(ref: ModelRef, ctx: int, token: str | None) -> dict:
    """`r1 show` of a model that is not downloaded: the config of an alias ships with r1 (no network); any other
    repo's config.json alone is fetched (into the HF cache). The download size comes from the Hub's file list when
    it answers; what cannot be known before the download is listed under "unknown"."""
    from huggingface_hub import HfApi, constants, hf_hub_download

    config = bundled_config(ref)
    if config is None:
        if constants.is_offline_mode():
            raise ModelNotFoundError(f"{ref.repo} is not downloaded and offline mode is on (HF_HUB_OFFLINE): "
                                     f"unset it, or run `r1 pull {ref.name}` where the Hub is reachable")
        with hub_errors(ref, token):
            config = Path(hf_hub_download(ref.repo, "config.json", revision=ref.revision, token=token,
                                          cache_dir=cache_dir()))
    info = _show_config(ref, _read_json(config), ctx)
    unknown = ["chat template (in the tokenizer files)"]
    download, revision = None, None
    if not constants.is_offline_mode():
        try:
            with hub_errors(ref, token):
                remote = HfApi().model_info(ref.repo, revision=ref.revision, files_metadata=True, token=token)
            sizes = [s.size for s in remote.siblings or [] if is_run_file(s.rfilename)]
            download = sum(sizes) if sizes and None not in sizes else None
            revision = (remote.sha or "")[:7] or None
        except R1Error:
            pass
    if download is None:
        why = "offline mode" if constants.is_offline_mode() else "the Hub's file list did not answer"
        unknown.insert(0, f"exact file sizes ({why})")
    info.update(path=None, revision=revision, size_on_disk=None, download_size=download, chat_template=None,
                downloaded=False, unknown=unknown, config_folder=str(config.parent))
    return info


def _show_folder(ref: ModelRef, folder: Path, ctx: int) -> dict:
    from .tokenizer import Tokenizer

    info = _show_config(ref, _read_json(folder / "config.json"), ctx, folder)
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    info.update(
        path=str(folder),
        revision=folder.name[:7] if ref.path is None else None,
        size_on_disk=sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
        chat_template=bool(tok_cfg.get("chat_template")) or (folder / "chat_template.jinja").is_file(),
        sampling=_sampling(ref, lambda: Tokenizer.from_folder(folder)),
        downloaded=True,
        config_folder=str(folder),
    )
    return info


def _show_config(ref: ModelRef, cfg: dict, ctx: int, folder: Path | None = None) -> dict:
    """The fields of `r1 show` that config.json alone decides."""
    quant = cfg.get("quantization_config") or {}
    # transformers 5 writes "dtype" where older configs say "torch_dtype".
    dtype = "fp8" if quant.get("quant_method") == "fp8" else (cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    from .config import args_from_dict
    from .sizes import count_parameters, quantized_weight_bytes, show_memory

    args = args_from_dict(cfg)  # also refuses an architecture r1 cannot run
    from .weights import check_layers

    if folder is not None:  # before a download config.py's bounds on sizes are what holds
        check_layers(folder, args)  # before count_parameters builds the config's layers (on the meta device)
    total, activated = count_parameters(args)
    return {
        "name": ref.name,
        "repo": ref.repo,
        "path": None,
        "revision": None,
        "architecture": (cfg.get("architectures") or [None])[0],
        "parameters": {"total": total, "activated": activated},
        "context_length": cfg.get("max_position_embeddings"),
        "dtype": dtype,
        "size_on_disk": None,
        "memory": show_memory(args, ctx, dtype, total),
        "chat_template": None,
        "sampling": _sampling(ref, lambda: None),
        "quantized_weights": quantized_weight_bytes(args, 4 if dtype == "float32" else 2),
        "cpu": cpu_advice(),
        "mtp_layers": _mtp_layers(folder, args),
    }


def cpu_advice() -> dict:
    """Which weight format decodes fastest on this machine's CPU class, and why (cpu.fastest_format), and the int8
    kernel policy this process uses (quant_formats decides it from the same features)."""
    from .cpu import fastest_format
    from .quant_formats import int8_kernel, int8_kernel_reason

    advice, kernel = fastest_format(), int8_kernel()
    return {**advice, "why": f"{advice['why']}; int8 kernels: {int8_kernel_reason(kernel)}", "int8_kernel": kernel}


def _mtp_layers(folder: Path | None, args) -> int:
    """Multi-token-prediction layers (`r1 run --mtp`): the config's num_nextn_predict_layers, when the index lists
    their tensors (a folder without an index is trusted on its config)."""
    if not args.n_mtp_layers or folder is None:  # before a download the config is all there is
        return args.n_mtp_layers or 0
    index = _read_json(folder / "model.safetensors.index.json").get("weight_map")
    if isinstance(index, dict) and not any(k.startswith(f"model.layers.{args.n_layers}.") for k in index):
        return 0
    return args.n_mtp_layers


def _show_gguf(ref: ModelRef, path: Path, ctx: int) -> dict:
    """`r1 show` of a GGUF file: the same fields, from its metadata. Weights are counted as loaded (dequantized
    to bfloat16)."""
    from gguf import LlamaFileType

    from .gguf import model_args, open_gguf, tensor_types, tokenizer_summary
    from .gguf import tokenizer as gguf_tokenizer
    from .sizes import count_parameters, quantized_weight_bytes, show_memory

    f = open_gguf(path)
    args = model_args(f)  # also refuses an architecture r1 cannot run
    total, activated = count_parameters(args)
    try:
        file_type = LlamaFileType(f.metadata["general.file_type"]).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (KeyError, ValueError):
        file_type = ref.gguf or quant_type(path.name)
    snapshot = snapshot_of(path)
    template = f.metadata.get("tokenizer.chat_template")
    return {
        "name": ref.name,
        "repo": ref.repo,
        "path": str(path),
        "revision": snapshot.name[:7] if snapshot and ref.path is None else None,
        "architecture": args.architecture,
        "parameters": {"total": total, "activated": activated},
        "context_length": args.max_seq_len,
        "dtype": f"GGUF {file_type} ({_gguf_loaded_as(f)})",
        "size_on_disk": f.size,
        "memory": show_memory(args, ctx, "bfloat16", total),  # dequantized to bfloat16 ("quantized": the others)
        "chat_template": isinstance(template, str),
        "sampling": _sampling(ref, lambda: gguf_tokenizer(f)),
        "cpu": cpu_advice(),
        "quantized_weights": quantized_weight_bytes(args, 2),
        "gguf": {"architecture": f.metadata.get("general.architecture"), "file_type": file_type,
                 "parts": len(getattr(f, "parts", [f])), "tensor_types": tensor_types(f),
                 "tokenizer": tokenizer_summary(f)},
    }


def _gguf_loaded_as(f) -> str:
    """How `r1 run` loads the file by default on this CPU (loader.resolve_quant's auto)."""
    from .gguf import auto_quant

    scheme, why = auto_quant(f)
    if why is None:
        return "dequantized to bfloat16 when loaded"
    here = "dequantized to bfloat16" if scheme == "none" else f"kept as --quant {scheme}"
    return f"r1 run on this CPU: {here}, {why}; dequantized to bfloat16 on a GPU, with --dtype or --quant none"


def _sampling(ref: ModelRef, read_tokenizer) -> dict:
    """The defaults `r1 run` will use (sampling.generation_defaults, the same call); {} when the tokenizer cannot be
    read and the name is no R1 alias (`r1 run` would refuse the model)."""
    from .chat_format import family_for
    from .sampling import generation_defaults

    try:
        tokenizer = read_tokenizer()
    except R1Error:
        tokenizer = None
    if tokenizer is None and family_for(None, ref.alias) != "r1":
        return {}
    return generation_defaults(tokenizer, ref.alias)


def _read_json(path: Path) -> dict:
    return read_json(path) or {}  # regular files of bounded size only (files.py)


def human_count(n: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)

