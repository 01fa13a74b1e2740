"""Chat sessions: what goes back to the model, transcripts, and saves that cannot lose the old file."""

import io
import os

import pytest
from rich.console import Console

import steered
from r1cli.errors import R1Error
from r1cli.events import TurnStats
from r1cli.repl import Chat
from r1cli.options import ModelOptions
from r1cli.engine import open_model
from r1cli.session import ChatSession, Turn
from r1cli.tokenizer import Tokenizer


@pytest.fixture
def r1_tokenizer():
    return Tokenizer.from_folder(steered.r1_tokenizer_dir())


def two_turn_session():
    return ChatSession(turns=[Turn("What is 2+2?", "It is 4.", "SECRET-ONE adding two and two"),
                              Turn("And 3+3?", "It is 6.", "SECRET-TWO adding three")])


def test_prompt_never_contains_earlier_reasoning(r1_tokenizer):
    from transformers import AutoTokenizer

    session = two_turn_session()
    prompt = session.prompt(r1_tokenizer, "r1", "And 4+4?")
    assert "SECRET" not in prompt.text and "It is 4." in prompt.text and "It is 6." in prompt.text
    # Oracle: transformers renders the answer-only conversation to the same ids (plus R1's forced "<think>\n").
    hf = AutoTokenizer.from_pretrained(steered.r1_tokenizer_dir())
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
                {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It is 6."},
                {"role": "user", "content": "And 4+4?"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + "<think>\n"
    assert prompt.ids == hf.encode(text, add_special_tokens=False)


def test_chat_turns_send_back_answers_only(steered_dir):
    """End to end: after two turns the KV cache holds prompt 2 and reply 2; the reasoning is in it once (reply 2)."""
    model = open_model(ModelOptions(str(steered_dir), "cpu"))
    chat = Chat(model, Console(file=io.StringIO(), width=100), "collapse", {}, history=False)
    chat.turn("How many pears?")
    chat.turn("Are you sure?")
    in_cache = model.tokenizer.decode(model.decoder.cached_ids)
    assert in_cache.count(steered.REASONING) == 1
    assert in_cache.count(steered.ANSWER) == 2
    assert [t.answer for t in chat.session.turns] == [steered.ANSWER] * 2
    assert chat.session.turns[1].stats["cached_tokens"] > 0  # the shared prefix was reused


def test_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "chat.json"
    two_turn_session().save(path)
    before = path.read_text()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    bigger = two_turn_session()
    bigger.turns.append(Turn("more", "text"))
    with pytest.raises(R1Error, match="No space left"):
        bigger.save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]  # no temporary file left behind


def test_json_round_trip_and_markdown(tmp_path):
    session = two_turn_session()
    session.system = "Be brief."
    session.save(tmp_path / "t.json")
    loaded = ChatSession.load(tmp_path / "t.json")
    assert loaded.turns == session.turns and loaded.system == "Be brief."
    markdown = session.save(tmp_path / "t.md").read_text()
    assert "<details><summary>" in markdown and "SECRET-ONE" in markdown and "It is 6." in markdown
    with pytest.raises(R1Error, match="not a JSON transcript"):
        ChatSession.load(tmp_path / "t.md")


def test_undo_clear_and_interrupted_turns():
    session = two_turn_session()
    stats = TurnStats(reasoning="partial thought", content="Part", finish_reason="interrupted")
    turn = session.add("Tell me more", stats)
    assert turn.finish_reason == "interrupted" and "reasoning" not in turn.stats
    assert session.messages()[-1] == {"role": "assistant", "content": "Part"}
    assert session.undo() is turn and len(session.turns) == 2
    session.clear()
    assert session.messages("hi") == [{"role": "user", "content": "hi"}]
