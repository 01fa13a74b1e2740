"""`r1 run` through Typer's runner and as a subprocess with pipes, on the steered tiny checkpoint (tests/steered.py):
its output is known token for token, so every check compares against the exact text."""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import steered
from helpers import r1_env, run_r1
from r1cli.chat_format import build_prompt
from r1cli.cli import app
from r1cli.errors import ModelNotFoundError, UsageError
from r1cli.run import looks_like_model, read_prompt
from r1cli.tokenizer import Tokenizer

SRC = Path(__file__).resolve().parents[1] / "src"


def r1(*args, input=None, timeout=120, env=None):
    return run_r1(*args, input=input, timeout=timeout, env=r1_env(**(env or {})))


def prompt_len(folder, text):
    return len(build_prompt(Tokenizer.from_folder(folder), [{"role": "user", "content": text}]).ids)


# --- in process --------------------------------------------------------------------------------------------------


def test_answer_on_stdout_reasoning_hidden(steered_dir):
    result = CliRunner().invoke(app, ["run", str(steered_dir), "How many pears?"])
    assert result.exit_code == 0, result.output
    assert result.stdout == steered.ANSWER + "\n"
    assert steered.REASONING not in result.stderr  # stderr is not a terminal: reasoning hidden


def test_json_object(steered_dir):
    result = CliRunner().invoke(app, ["run", str(steered_dir), "--json", "How many pears?"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == str(steered_dir) and data["repo"] is None
    assert (data["reasoning"], data["content"]) == (steered.REASONING, steered.ANSWER)
    assert data["finish_reason"] == "stop" and data["truncated_in_thinking"] is False
    reasoning_ids = Tokenizer.from_folder(steered_dir).encode(steered.REASONING)
    answer_ids = Tokenizer.from_folder(steered_dir).encode("\n\n" + steered.ANSWER)
    assert data["usage"] == {"prompt_tokens": prompt_len(steered_dir, "How many pears?"),
                             "reasoning_tokens": len(reasoning_ids) + 1,  # with </think>
                             "completion_tokens": len(reasoning_ids) + 1 + len(answer_ids)}
    assert set(data["timings"]) == {"ttft_ms", "thinking_ms", "total_ms", "decode_tokens_per_s"}
    assert 0 < data["timings"]["ttft_ms"] <= data["timings"]["thinking_ms"] <= data["timings"]["total_ms"]


def test_stdin_then_blank_line_then_arguments(steered_dir):
    result = CliRunner().invoke(app, ["run", str(steered_dir), "--json", "Summarize."], input="line one\nline two\n")
    assert result.exit_code == 0, result.output
    expected = prompt_len(steered_dir, "line one\nline two\n\nSummarize.")
    assert json.loads(result.stdout)["usage"]["prompt_tokens"] == expected


def test_read_prompt():
    piped = io.StringIO("from stdin\n")
    assert read_prompt(["explain", "this"], piped) == "from stdin\n\nexplain this"
    assert read_prompt(["-"], io.StringIO("only stdin\n")) == "only stdin"
    assert read_prompt(["args", "only"], io.StringIO("")) == "args only"


def test_first_word_is_the_model_only_when_it_looks_like_one(steered_dir):
    assert looks_like_model(str(steered_dir)) and looks_like_model("deepseek-r1:7b")
    assert looks_like_model("org/name@main") and looks_like_model("deepseek-r1:7bb")  # a typo fails, not a prompt
    assert not looks_like_model("hello") and not looks_like_model("what is 2+2?")


def test_jsonl_events(steered_dir):
    result = CliRunner().invoke(app, ["run", str(steered_dir), "--jsonl", "How many pears?"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert "".join(e["text"] for e in events if e["event"] == "reasoning") == steered.REASONING
    assert "".join(e["text"] for e in events if e["event"] == "answer") == steered.ANSWER
    assert len([e for e in events if e["event"] == "answer"]) > 1  # streamed, not one blob
    assert events[-1]["content"] == steered.ANSWER


def test_thinking_to_stdout(steered_dir):
    result = CliRunner().invoke(app, ["run", str(steered_dir), "--think", "stdout", "hi"])
    assert result.stdout == f"<think>\n{steered.REASONING}\n</think>\n\n{steered.ANSWER}\n"


def test_think_flag_spelling(steered_dir):
    # `--think` as in `r1 chat --think`; the earlier `--thinking` still works but is left out of the help.
    old = CliRunner().invoke(app, ["run", str(steered_dir), "--thinking", "stdout", "hi"])
    assert old.exit_code == 0, old.output
    assert old.stdout == f"<think>\n{steered.REASONING}\n</think>\n\n{steered.ANSWER}\n"
    bad = CliRunner().invoke(app, ["run", str(steered_dir), "--think", "loud", "hi"])
    assert isinstance(bad.exception, UsageError) and "unknown --think 'loud'" in str(bad.exception)
    usage = CliRunner().invoke(app, ["run", "--help"], terminal_width=200)
    assert "--think " in usage.stdout and "--thinking" not in usage.stdout


def test_missing_model_in_process():
    result = CliRunner().invoke(app, ["run", "deepseek-r1:70b", "hi"])
    assert isinstance(result.exception, ModelNotFoundError) and result.exception.exit_code == 3


# --- subprocess with pipes ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pipe_stdin_no_escape_codes(steered_dir):
    proc = r1("run", steered_dir, "--think", "stderr", input="How many pears?\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == steered.ANSWER + "\n"
    assert steered.REASONING in proc.stderr
    assert "\x1b" not in proc.stdout + proc.stderr
    forced = r1("run", steered_dir, "--think", "stderr", "--color", "always", "hi")
    assert "\x1b[2m" in forced.stderr  # the check above can fail: colour is there when asked for


@pytest.mark.slow
def test_exit_codes(steered_dir, tmp_path):
    usage = r1("run", steered_dir, "--no-such-flag", "hi")
    assert usage.returncode == 2 and usage.stderr.startswith("r1: ")
    assert r1("run", steered_dir).returncode == 2  # no prompt
    missing = r1("run", "deepseek-r1:7b", "hi", env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert missing.returncode == 3 and "r1 pull deepseek-r1:7b" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    thinking = r1("run", steered_dir, "--max-tokens", "3", "hi")
    assert thinking.returncode == 4
    assert thinking.stdout == ""
    assert "stopped while thinking" in thinking.stderr and "no answer" in thinking.stderr


@pytest.mark.slow
def test_closed_pipe_ends_quietly(looping_dir):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-m", "r1cli", "run", str(looping_dir), "--think", "stdout",
                             "--no-repeat-guard", "hi"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.read(40).startswith(b"<think>\nthink more and think")
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""


@pytest.mark.slow
def test_interrupt_exits_130(looping_dir):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-m", "r1cli", "run", str(looping_dir), "--jsonl", "--no-repeat-guard", "hi"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert json.loads(proc.stdout.readline())["event"] == "start"
    assert json.loads(proc.stdout.readline())["event"] == "reasoning"  # it is generating: it would think forever
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    done = json.loads(out.splitlines()[-1])
    assert done["event"] == "done" and done["finish_reason"] == "interrupted"
    assert done["reasoning"] and (steered.LOOP * 100).strip().startswith(done["reasoning"])  # the partial text is kept
    assert b"interrupted" in err


@pytest.mark.slow
def test_decode_modes_give_the_same_answer(steered_dir, tmp_path, monkeypatch):
    """--decode-mode picks the decode step (static: the fixed-shape step torch.compile and CUDA graphs use; compile:
    that step compiled); the steered model's known answer comes out of each. An unknown mode is a one-line usage
    error."""
    from r1cli import aot_step

    # nothing compiled or announced yet in this process: another test of the worker may have done both
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(aot_step, "_announced", set())
    for mode in ("eager", "static", "compile"):
        result = CliRunner().invoke(app, ["run", str(steered_dir), "--decode-mode", mode, "--verbose", "How many pears?"])
        assert result.exit_code == 0, result.output
        assert result.stdout == steered.ANSWER + "\n"
        # compile says why the first reply will pause (on a CPU: the step is compiled for this machine, once)
        assert ("r1: compiling the decode step for this machine" in result.stderr) == (mode == "compile")
    bad = r1("run", steered_dir, "--decode-mode", "warp", "hi")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "r1: unknown --decode-mode 'warp': use auto, eager, static, compile, graph"]


def test_every_front_end_takes_every_sampling_field():
    """Sampling field names come from SamplingParams (sampling.py): the command line, the chat's /set, the remote
    client and the server's request parser each take all of them, so a new field cannot be left out of one."""
    from r1cli.cli import _sampling
    from r1cli.remote import SAMPLING_KEYS
    from r1cli.repl.commands import SETTABLE
    from r1cli.sampling import SAMPLING_FIELDS, SAMPLING_RULES, SamplingParams
    from r1cli.serve import parse_request

    numeric = set(SAMPLING_FIELDS) - {"repeat_guard"}
    assert set(SAMPLING_RULES) == set(SETTABLE) == set(SAMPLING_KEYS) == numeric
    assert set(_sampling(*[None] * 7)) == set(SAMPLING_FIELDS)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **{k: 1 for k in SAMPLING_RULES}}
    assert set(parse_request(body).sampling) == numeric
    assert SamplingParams(**{k: 1 for k in SAMPLING_RULES}).top_k == 1
