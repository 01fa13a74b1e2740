import json
import shutil

import pytest

from r1cli.errors import CheckpointError
from r1cli.tokenizer import Tokenizer

from paths import R1_TOKENIZER as FIXTURE

MULTILINGUAL = (
    "Hello, world! 你好，世界。鑫龘𠀀 — Привет мир; مرحبا بالعالم; こんにちは 🤖🧠👩‍👩‍👧 café naïve\n"
    "  indented\tcode() {}\n\n<think>x</think> <｜User｜> 1234567 ∑∫√ ok"
)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_folder(FIXTURE)


def test_special_token_ids(tok):
    assert (tok.bos_token, tok.bos_id) == ("<｜begin▁of▁sentence｜>", 151646)
    assert tok.eos_ids == {151643}
    assert tok.pad_id == 151643
    assert (tok.think_start_id, tok.think_end_id) == (151648, 151649)
    assert tok.chat_template and "<｜Assistant｜>" in tok.chat_template
    assert tok.encode("<｜User｜>hi") == [151644, 6023]


def test_encode_adds_bos_only_when_asked(tok):
    assert tok.encode("hi", add_special_tokens=True) == [151646, *tok.encode("hi")]


@pytest.mark.parametrize("text", [MULTILINGUAL, "", " ", "\n\n\n", "a" * 1000])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_skip_special_tokens_keeps_think_tags(tok):
    # <think> and </think> are added tokens but not special: they survive skip_special_tokens.
    ids = [151646, *tok.encode("<think>\nhm\n</think>\n\nok"), 151643]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nhm\n</think>\n\nok"


def test_matches_transformers(tok):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(FIXTURE)
    assert tok.encode(MULTILINGUAL) == reference.encode(MULTILINGUAL, add_special_tokens=False)
    assert tok.encode(MULTILINGUAL, add_special_tokens=True) == reference.encode(MULTILINGUAL)
    assert tok.decode(tok.encode(MULTILINGUAL)) == reference.decode(reference.encode(MULTILINGUAL, add_special_tokens=False))
    assert tok.bos_id == reference.bos_token_id and reference.eos_token_id in tok.eos_ids


@pytest.mark.parametrize("use_decode_stream", [True, False])
def test_stream_decoder_never_emits_half_a_character(tok, use_decode_stream):
    ids = tok.encode(MULTILINGUAL)
    # The text really does split characters across tokens, or this test proves nothing.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    decoder = tok.stream_decoder()
    if not use_decode_stream:
        decoder = type(decoder)(tok, use_decode_stream=False)
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    assert sum(1 for p in pieces if p) > len(ids) // 2  # it streams, it does not hold everything to the end


@pytest.mark.parametrize("use_decode_stream", [True, False])
def test_stream_decoder_flush_cuts_at_a_character_boundary(tok, use_decode_stream):
    """A stream stopped inside a character (max tokens in the middle of an emoji) ends at the last whole one."""
    ids = tok.encode("ok 🤖")
    split = next(i for i in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:i]))
    decoder = type(tok.stream_decoder())(tok, use_decode_stream=use_decode_stream)
    text = "".join(decoder.add(i) for i in ids[:split])
    assert "\ufffd" not in text
    assert text + decoder.flush() == tok.decode(ids[:split]).rstrip("\ufffd") == "ok "


def _copy_fixture(tmp_path, config_changes=None, name="model", **extra_files):
    """A model folder with the fixture's tokenizer; extra files by name, with "__" for "." (config__json)."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(FIXTURE / "tokenizer.json", folder)
    config = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    config.update(config_changes or {})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in extra_files.items():
        (folder / name.replace("__", ".")).write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def test_eos_from_generation_config_never_from_config_json(tmp_path):
    folder = _copy_fixture(
        tmp_path,
        generation_config__json={"bos_token_id": 151646, "eos_token_id": [151643, 151644]},
        config__json={"bos_token_id": 151643, "eos_token_id": 151643},  # the distills' stale values
    )
    tok = Tokenizer.from_folder(folder)
    assert tok.bos_id == 151646 and tok.eos_ids == {151643, 151644}
    folder2 = _copy_fixture(tmp_path, name="b", generation_config__json={"eos_token_id": 151645})
    assert Tokenizer.from_folder(folder2).eos_ids == {151643, 151645}


def test_chat_template_as_named_list_and_as_jinja_file(tmp_path):
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    assert Tokenizer.from_folder(_copy_fixture(tmp_path, {"chat_template": templates})).chat_template == "DEFAULT"
    folder = _copy_fixture(tmp_path, name="b", chat_template__jinja="FROM FILE")
    assert Tokenizer.from_folder(folder).chat_template == "FROM FILE"


def test_no_template_and_token_dicts(tmp_path):
    config = {"chat_template": None, "bos_token": {"content": "<｜begin▁of▁sentence｜>", "lstrip": False}}
    tok = Tokenizer.from_folder(_copy_fixture(tmp_path, config))
    assert tok.chat_template is None and tok.bos_id == 151646


def test_missing_tokenizer_json_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json") as info:
        Tokenizer.from_folder(tmp_path)
    assert "\n" not in str(info.value)
