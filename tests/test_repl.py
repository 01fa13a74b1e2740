"""`r1 chat` in a real pseudo-terminal (pexpect), on the steered tiny checkpoints of tests/steered.py."""

import json
import re
import sys

import pexpect
import pytest
import torch

import steered
from helpers import r1_env, strip_ansi



def spawn(folder, tmp_path, *args):
    env = r1_env(tmp_path, TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1")
    child = pexpect.spawn(sys.executable, ["-m", "r1cli", "chat", str(folder), "--no-history", *args], env=env,
                          dimensions=(40, 120), encoding="utf-8", timeout=90, cwd=str(tmp_path))
    child.expect(">>>")
    return child


plain = strip_ansi


def test_steered_checkpoint_emits_its_sequence(steered_dir):
    """The oracle for everything below: transformers itself generates exactly the steered sequence."""
    from transformers import AutoModelForCausalLM

    from r1cli.chat_format import build_prompt
    from r1cli.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(steered_dir)
    ids = build_prompt(tokenizer, [{"role": "user", "content": "How many pears?"}]).ids
    model = AutoModelForCausalLM.from_pretrained(steered_dir, dtype=torch.float32)
    out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
    expected = steered.chain_ids(steered_dir)
    assert out[: len(expected)] == expected
    assert tokenizer.decode(out) == f"{steered.REASONING}</think>\n\n{steered.ANSWER}<｜end▁of▁sentence｜>"


@pytest.mark.slow
def test_turn_panel_collapses_and_think_expands(steered_dir, tmp_path):
    child = spawn(steered_dir, tmp_path)
    child.send("garbage")
    child.sendintr()  # Ctrl-C at the prompt clears the line...
    child.send("/stats\r")
    child.expect(r"0 turns")  # ...so this ran /stats, not "garbage/stats"

    child.send("How many pears?\r")
    child.expect("Thinking")  # the live panel's title
    child.expect(r"Thought for \d+\.\d s, 8 tokens")  # collapsed to one line when the answer started
    child.expect(r"ttft [\d.]+ s · thought [\d.]+ s · 17 tokens \(8 thinking\)")
    after_collapse = plain(child.before)
    assert "pears!" in after_collapse and "three" in after_collapse
    assert steered.REASONING not in after_collapse  # the reasoning is gone from the screen

    child.send("/think\r")
    child.expect(re.escape(steered.REASONING))  # expanded in full
    child.expect(">>>")
    child.send("\x14")  # Ctrl-T at the prompt does the same
    child.expect(re.escape(steered.REASONING))

    child.send("line one\x1b\rline two\r")  # Esc Enter: a newline inside the message
    child.expect("17 tokens")
    child.send("\x1b[200~pasted one\npasted two\x1b[201~\r")  # a bracketed paste stays one message
    child.expect("17 tokens")
    child.send("/save chat.md\r")
    child.expect("saved")
    child.send("/save chat.json\r")
    child.expect("saved")
    child.expect(">>>")  # control keys typed before the prompt is up would go to the tty driver instead
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    markdown = (tmp_path / "chat.md").read_text()
    assert "## User\n\nHow many pears?" in markdown and steered.REASONING in markdown and steered.ANSWER in markdown
    turns = json.loads((tmp_path / "chat.json").read_text())["turns"]
    assert [t["user"] for t in turns] == ["How many pears?", "line one\nline two", "pasted one\npasted two"]
    assert all(t["answer"] == steered.ANSWER and t["reasoning"] == steered.REASONING for t in turns)


@pytest.mark.slow
def test_ctrl_c_stops_generation_and_the_session_goes_on(looping_dir, tmp_path):
    child = spawn(looping_dir, tmp_path, "--no-repeat-guard")
    child.send("hi\r")
    child.expect("think more and think more")  # the tail of the reasoning in the live panel
    child.sendintr()
    child.expect(r"\[interrupted\]")
    child.expect("tokens/s")
    child.expect(">>>")
    child.send("/set max_tokens 4\r")
    child.expect("max_tokens = 4")
    child.send("again\r")
    child.expect("Stopped while thinking: no answer")
    child.expect(r"4 tokens \(4 thinking\)")
    child.send("/think show\r")
    child.expect("saved")
    child.send("/save t.json\r")
    child.expect("saved")
    child.send("/exit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    turns = json.loads((tmp_path / "t.json").read_text())["turns"]
    assert [t["finish_reason"] for t in turns] == ["interrupted", "length"]
    assert turns[0]["reasoning"].startswith("think more and think more")
    assert turns[1]["reasoning"] == "think more and think"
    assert json.loads((tmp_path / "config" / "r1cli" / "config.json").read_text())["think"] == "show"
