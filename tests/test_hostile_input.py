"""Issue #14: chat templates, the chat REPL and the command line as attack surface.

Templates come from untrusted model repos: each hostile one must stop with one clear CheckpointError, within a
few seconds and without allocating much. /save must never replace anything but a regular file, /set and the
command line share one set of sampling rules, a prompt must be valid UTF-8, and a device that is not there is a
usage error, all before the model loads."""

from __future__ import annotations

import copy
import time
import tracemalloc

import pytest

from r1cli.chat_format import render_prompt
from r1cli.errors import CheckpointError
from r1cli.tokenizer import Tokenizer

from paths import R1_TOKENIZER


@pytest.fixture(scope="module")
def r1_tok():
    return Tokenizer.from_folder(R1_TOKENIZER)


@pytest.fixture
def broken_model(tmp_path):
    """A model folder whose config.json is not JSON: loading it is exit 1, so an exit 2 shows that a check ran
    before the model was opened."""
    folder = tmp_path / "broken-model"
    folder.mkdir()
    (folder / "config.json").write_text("not json")
    return folder


def _with_template(tok, template):
    other = copy.copy(tok)
    other.chat_template = template
    return other


# --- chat templates --------------------------------------------------------------------------------------------

BIG = "{% set s = 'x' * 900000 %}"
HOSTILE_TEMPLATES = {
    # the cases
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "string times 3e9": "{{ 'x' * 3000000000 }}",
    "range(10**9)": "{% for i in range(10**9) %}{% endfor %}",
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "string times 10**12": "{{ 'x' * 10**12 }}",
    # other ways to spend time or memory
    "macro fan-out 2**40 calls": "{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
    "power tower": "{{ 10 ** (10 ** 10) }}",
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "doubling with +": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "squaring an int": "{% set ns = namespace(n=10) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "center filter": "{{ 'x'|center(3000000000) }}",
    "str.ljust": "{{ 'x'.ljust(3000000000) }}",
    "printf width": "{{ '%03000000000d' % 1 }}",
    "str.format width": "{{ '{:>3000000000}'.format(1) }}",
    "format filter width": "{{ '%03000000000d'|format(1) }}",
    "replace blow-up": BIG + "{{ s|replace('x', s) }}",
    "join blow-up": BIG + "{{ s|join(s) }}",
    "indent blow-up": "{% set s = '\n' * 900000 %}{{ s|indent(900000) }}",
    "expandtabs blow-up": "{{ ('\t' * 900000).expandtabs(900000) }}",
    "huge output": "{% for i in range(90000) %}{{ 'x' * 900000 }}{% endfor %}",
    "growing list": "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = ns.l + ['x' * 900000 ~ i] %}{% endfor %}",
    "many slices kept": BIG + "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = ns.l + [s[i:]] %}{% endfor %}",
    "busy loop body": BIG + "{% for i in range(100000) %}{% set t = s|replace('x', 'y') %}{% endfor %}",
    "nested loops over a string": BIG + "{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "recursive loop": "{% set l = [[1, 2], [3, 4]] %}{% for x in l recursive %}{{ loop(l) }}{% endfor %}",
    "tojson indent": "{{ messages|tojson(indent=100000000) }}",
    # a list of a million references to one long string is small, but not once printed
    "printing a big list": "{% set l = ['x' * 900000] * 1000000 %}{{ l }}",
    "~ on a big list": "{% set l = ['x' * 900000] * 1000000 %}{{ l ~ '' }}",
    "string filter on a big list": "{% set l = ['x' * 900000] * 1000000 %}{{ l|string }}",
    "tojson on a big list": "{% set l = ['x' * 900000] * 1000000 %}{{ l|tojson }}",
    "printf of a big list": "{% set l = ['x' * 900000] * 1000000 %}{{ '%s' % (l,) }}",
    # output captured by a block or a macro is joined later, past the output limit
    "set block": BIG + "{% set b %}{% for i in range(100000) %}{{ s }}{% endfor %}{% endset %}{{ b|length }}",
    "set block of literal text": "{% set b %}{% for i in range(100000) %}" + "y" * 900000 + "{% endfor %}{% endset %}",
    "macro output": BIG + "{% macro f() %}{% for i in range(100000) %}{{ s }}{% endfor %}{% endmacro %}{{ f()|length }}",
}


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
def test_hostile_template_stops_with_one_clear_error_quickly_and_small(r1_tok, name):
    tok = _with_template(r1_tok, HOSTILE_TEMPLATES[name])
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(CheckpointError) as info:
            render_prompt(tok, [{"role": "user", "content": "hi"}])
        seconds = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert info.value.exit_code == 1
    assert message.startswith("the chat template of this model exceeded "), message
    assert "\n" not in message
    assert seconds < 10, seconds  # the wall-clock limit is 5 s; most stop in milliseconds
    assert peak < 300 * 2**20, peak  # the per-value limit is about a million characters, the total 32 times that


def test_templates_that_are_long_but_fine_still_render(r1_tok):
    """The limits grow with the input: R1's own template renders a 2000-turn conversation of 1.2 M characters."""
    messages = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}: " + "hello there " * 50}
                for i in range(2001)]
    text = render_prompt(r1_tok, messages)
    assert text.count("<｜User｜>") == 1001 and "turn 2000: " in text


def test_a_template_within_the_limits_renders_like_transformers(r1_tok):
    """Loops, ranges, slices, filters and string methods the limits watch still give transformers' text."""
    transformers = pytest.importorskip("transformers")
    template = ("{% for i in range(messages|length) %}{% set m = messages[i] %}{{ loop.index }}/{{ loop.length }} "
                "{{ m['role']|center(12) }}{{ m['content'][:5] ~ '|' ~ m['content'][5:]|replace('o', '0') }}"
                "{{ '%-6s|' % m['role'] }}{{ '{:>8}'.format(m['role']) }}{{ ('=' * 3) + '\\n' }}{% endfor %}"
                "{{ messages|map(attribute='role')|join(', ') }}{{ messages|tojson(indent=2) }}")
    messages = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "good morning"}]
    ours = render_prompt(_with_template(r1_tok, template), messages, add_generation_prompt=False)
    folder_tok = transformers.AutoTokenizer.from_pretrained(R1_TOKENIZER)
    theirs = folder_tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert ours == theirs


# --- /save ------------------------------------------------------------------------------------------------------


def _saving_chat(tmp_path):
    """What cmd_save and cmd_set use of a Chat: a session with one turn, sampling overrides, and info lines."""
    from types import SimpleNamespace

    from r1cli.events import TurnStats
    from r1cli.session import ChatSession

    session = ChatSession(model="steered")
    session.add("How many pears?", TurnStats(reasoning="count", content="three", finish_reason="stop"))
    lines = []
    return SimpleNamespace(session=session, sampling={}, info=lines.append, lines=lines)


def _special_file(tmp_path, kind):
    """A FIFO, a symlink to a file, a directory or a character device (a /dev/null twin, made in tmp_path: the
    real /dev/null is never touched)."""
    import os
    import stat

    path = tmp_path / f"target-{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        (tmp_path / "real.md").write_text("keep me\n")
        path.symlink_to(tmp_path / "real.md")
    elif kind == "directory":
        path.mkdir()
    elif kind == "char device":
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("making a character device needs root (the FIFO and symlink cases still run)")
    return path


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "char device"])
def test_save_refuses_anything_but_a_regular_file_and_leaves_it_as_it_was(tmp_path, kind):
    import os

    from r1cli.errors import R1Error
    from r1cli.repl.commands import dispatch

    chat = _saving_chat(tmp_path)
    path = _special_file(tmp_path, kind)
    before = os.lstat(path)
    with pytest.raises(R1Error) as info:
        dispatch(chat, f"/save {path}")
    message = str(info.value)
    assert str(path) in message and "regular file" in message and "\n" not in message
    after = os.lstat(path)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)
    if kind == "symlink":
        assert (tmp_path / "real.md").read_text() == "keep me\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert chat.lines == [] and len(chat.session.turns) == 1  # nothing claimed "saved"; the chat is as it was


def test_save_replaces_a_regular_file_keeping_its_mode_and_a_failed_save_keeps_the_old_one(tmp_path, monkeypatch):
    import errno
    import json
    import os

    from r1cli.errors import R1Error
    from r1cli.repl.commands import dispatch

    chat = _saving_chat(tmp_path)
    path = tmp_path / "chat.json"
    path.write_text("old\n")
    os.chmod(path, 0o644)
    dispatch(chat, f"/save {path}")
    assert json.loads(path.read_text())["turns"][0]["answer"] == "three"
    assert os.stat(path).st_mode & 0o777 == 0o644 and chat.lines == [f"saved {path}"]

    path.write_text("old\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(R1Error, match="cannot save .*No space left"):
        dispatch(chat, f"/save {path}")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]


# --- /set and the command line: one set of rules ------------------------------------------------------------------

BAD_SAMPLING = [("seed", "99999999999999999999999"), ("seed", str(-(1 << 63) - 1)), ("temperature", "nan"),
                ("temperature", "inf"), ("max_tokens", "-5"), ("top_p", "7"), ("top_k", "-3"), ("min_p", "nan"),
                ("min_p", "-0.5"), ("top_k", "2.5")]


@pytest.mark.parametrize("name,value", BAD_SAMPLING)
def test_set_and_the_command_line_refuse_the_same_values(tmp_path, broken_model, capsys, name, value):
    from r1cli.cli import main
    from r1cli.errors import UsageError
    from r1cli.repl.commands import dispatch

    chat = _saving_chat(tmp_path)
    with pytest.raises(UsageError) as info:
        dispatch(chat, f"/set {name} {value}")
    assert str(info.value).startswith(f"/set {name}: ") and chat.sampling == {}

    # The command line: exit 2 with one line, before opening the model (that would be exit 1).
    with pytest.raises(SystemExit) as exited:
        main(["run", str(broken_model), "hi", f"--{name.replace('_', '-')}", value])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("r1: ") and f"--{name.replace('_', '-')}" in err, err


@pytest.mark.parametrize("seed", [-(1 << 63) - 1, -(1 << 63), -1, 0, (1 << 63), (1 << 64) - 1, 1 << 64, 10**23])
def test_a_seed_is_accepted_exactly_when_torch_generator_takes_it(seed):
    import torch

    from r1cli.errors import UsageError
    from r1cli.sampling import check_sampling

    try:
        torch.Generator().manual_seed(seed)
        torch_takes = True
    except (RuntimeError, ValueError, OverflowError):
        torch_takes = False
    try:
        check_sampling("seed", str(seed), "/set seed")
        we_take = True
    except UsageError:
        we_take = False
    assert we_take == torch_takes


def test_set_accepts_good_values_and_default(tmp_path):
    from r1cli.repl.commands import dispatch

    chat = _saving_chat(tmp_path)
    for line in ("/set seed 18446744073709551615", "/set temperature 0", "/set top_p 1", "/set max_tokens 7",
                 "/set top_k default"):
        dispatch(chat, line)
    assert chat.sampling == {"seed": (1 << 64) - 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 7, "top_k": None}


# --- prompts that are not UTF-8, devices that are not there ------------------------------------------------------


@pytest.mark.parametrize("errors", ["surrogateescape", "strict"])  # a C locale's stdin, a UTF-8 locale's
def test_invalid_utf8_on_stdin_is_a_usage_error_naming_stdin(errors):
    import io

    from r1cli.errors import UsageError
    from r1cli.run import read_prompt

    stdin = io.TextIOWrapper(io.BytesIO("Résumé: ".encode() + b"caf\xe9\n"), encoding="utf-8", errors=errors)
    with pytest.raises(UsageError) as info:
        read_prompt(["summarise"], stdin)
    assert info.value.exit_code == 2
    assert "stdin is not valid UTF-8 (byte 13: b'\\xe9')" in str(info.value)  # "Résumé: caf" is 13 bytes


def test_invalid_utf8_in_an_argument_is_a_usage_error_naming_it():
    import io

    from r1cli.errors import UsageError
    from r1cli.run import read_prompt

    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python hands over such an argv word
    tty = type("Tty", (io.StringIO,), {"isatty": lambda self: True})()
    with pytest.raises(UsageError, match=r"prompt argument 2 is not valid UTF-8 \(byte 3: b'\\xe9'\)"):
        read_prompt(["hello", bad], tty)


def _absent_devices() -> list[str]:
    import torch

    absent = [f"cuda:{torch.cuda.device_count()}"]  # one past the last GPU, on any machine
    if not torch.cuda.is_available():
        absent.append("cuda")
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        absent.append("mps")
    return absent + ["tpu"]


@pytest.mark.parametrize("command", ["run", "bench"])
@pytest.mark.parametrize("device", _absent_devices())
def test_a_device_that_is_not_there_is_one_usage_line_before_anything_loads(broken_model, capsys, device, command):
    from r1cli.cli import main

    argv = [command, str(broken_model)] + (["hi"] if command == "run" else [])
    with pytest.raises(SystemExit) as exited:
        main(argv + ["--device", device])  # opening the model would be exit 1
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("r1: ") and "unexpected" not in err, err
    assert device in err


@pytest.mark.slow
def test_invalid_utf8_is_refused_before_the_model_is_opened(tmp_path, broken_model):
    """Real processes: the bytes arrive through a pipe and through argv; exit 2, not 1 (opening the model)."""
    import subprocess
    import sys

    from helpers import one_line_error, r1_env

    model_arg = str(broken_model)
    p = subprocess.run([sys.executable, "-m", "r1cli", "run", model_arg], input=b"caf\xe9\n", capture_output=True,
                       env=r1_env(tmp_path), timeout=120)
    assert "stdin" in one_line_error(p, 2)
    p = subprocess.run([sys.executable.encode(), b"-m", b"r1cli", b"run", model_arg.encode(), b"hi", b"caf\xe9"],
                       capture_output=True, env=r1_env(tmp_path), stdin=subprocess.DEVNULL, timeout=120)
    assert "prompt argument 2" in one_line_error(p, 2)
    p = subprocess.run([sys.executable.encode(), b"-m", b"r1cli", b"run", model_arg.encode(), b"hi",
                        b"--system", b"caf\xe9"], capture_output=True, env=r1_env(tmp_path), stdin=subprocess.DEVNULL,
                       timeout=120)
    assert "--system" in one_line_error(p, 2)


@pytest.mark.slow
def test_gpus_beyond_the_machine_is_one_usage_line_before_torchrun(steered_dir):
    """`--gpus N --device cuda` with fewer than N GPUs (none here): one line, exit 2, and torchrun never starts
    (before the fix: the r1 line once per rank, then torchrun's traceback)."""
    import torch

    from helpers import one_line_error, run_r1

    gpus = max(2, torch.cuda.device_count() + 1)
    p = run_r1("run", steered_dir, "hi", "--gpus", gpus, "--device", "cuda", timeout=120)
    line = one_line_error(p, 2)
    assert "cuda" in line and "torch.distributed" not in p.stderr and "ChildFailedError" not in p.stderr


@pytest.mark.slow
def test_the_chat_goes_on_after_refused_set_and_save(steered_dir, tmp_path):
    """A real `r1 chat` reading lines from a pipe: bad /set values and /save to a FIFO or a symlink are refused
    with one line each, the turn still runs with the settings it had, and a later /save keeps the whole chat."""
    import json
    import os

    import steered
    from helpers import r1_env, run_r1, strip_ansi

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "real.md").write_text("keep me\n")
    (tmp_path / "link.md").symlink_to(tmp_path / "real.md")
    script = "\n".join(["/set seed 99999999999999999999999", "/set temperature nan", "/set max_tokens -5",
                        "caf\udce9", "How many pears?", f"/save {fifo}", f"/save {tmp_path / 'link.md'}",
                        f"/save {tmp_path / 'chat.json'}", ""]).encode("utf-8", "surrogateescape")  # b"caf\xe9"
    for locale in ("C.UTF-8", "C"):  # stdin strict, and with Python's surrogateescape
        p = run_r1("chat", steered_dir, "--no-history", "--temperature", "0", input=script,
                   env=r1_env(tmp_path, LC_ALL=locale, LANG=locale))
        out = strip_ansi((p.stdout + p.stderr).decode("utf-8", "replace"))
        assert p.returncode == 0 and "this message is not valid UTF-8 (byte 3" in out, out
    assert p.returncode == 0, out
    assert "/set seed: 99999999999999999999999 is out of range" in out
    assert "/set temperature: nan is not a finite number" in out and "/set max_tokens: -5 is out of range" in out
    assert "named pipe" in out and "symbolic link" in out
    assert "Traceback" not in out and "unexpected error" not in out
    assert os.path.islink(tmp_path / "link.md") and (tmp_path / "real.md").read_text() == "keep me\n"
    import stat

    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    turns = json.loads((tmp_path / "chat.json").read_text())["turns"]
    assert len(turns) == 1 and turns[0]["answer"] == steered.ANSWER


@pytest.mark.slow
def test_r1_run_with_a_hostile_template_is_one_line_exit_1(steered_dir, tmp_path):
    """The steered model with its chat template replaced by a loop of 10**9 (a hard link to its weights)."""
    import json
    import os
    import shutil

    from helpers import one_line_error, r1_env, run_r1

    model = tmp_path / "hostile-model"
    model.mkdir()
    for f in steered_dir.iterdir():
        try:
            os.link(f, model / f.name)
        except OSError:
            shutil.copy(f, model / f.name)
    config = json.loads((steered_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for i in range(10**9) %}{{ i }}{% endfor %}"
    (model / "tokenizer_config.json").unlink()
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    p = run_r1("run", model, "hi", env=r1_env(tmp_path), timeout=120)
    assert one_line_error(p, 1).startswith("r1: the chat template of this model exceeded 100000 items of range()")
