
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1cli.reasoning import Delta, ReasoningSplitter

from paths import R1_TOKENIZER as FIXTURE
START_ID, END_ID = 151648, 151649


def run(chunks, start_in_thinking=False, **kwargs):
    """Feed chunks (text, or (text, token_id)); return the splitter and all its deltas."""
    splitter = ReasoningSplitter(start_in_thinking, **kwargs)
    deltas = []
    for chunk in chunks:
        text, token_id = chunk if isinstance(chunk, tuple) else (chunk, None)
        deltas += splitter.feed(text, token_id)
    deltas += splitter.finish()
    # The deltas add up to the texts the splitter reports.
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == splitter.reasoning_text
    assert "".join(d.text for d in deltas if d.kind == "answer") == splitter.answer_text
    assert all(d.text for d in deltas)
    return splitter, deltas


def split(chunks, start_in_thinking=False, **kwargs):
    splitter, _ = run(chunks, start_in_thinking, **kwargs)
    return splitter.reasoning_text, splitter.answer_text


def test_starts_inside_reasoning_when_the_prompt_ends_with_think():
    splitter, deltas = run(["Let me ", "think.\n", "</think>", "\n\n", "The answer ", "is 4."], start_in_thinking=True)
    assert (splitter.reasoning_text, splitter.answer_text) == ("Let me think.", "The answer is 4.")
    assert deltas[0] == Delta("reasoning", "Let me") and deltas[-1] == Delta("answer", "is 4.")
    assert not splitter.truncated_in_thinking


def test_reasoning_streams_as_it_comes():
    splitter = ReasoningSplitter(start_in_thinking=True)
    assert splitter.feed("\nOkay, so") == [Delta("reasoning", "Okay, so")]
    assert splitter.feed(" the") == [Delta("reasoning", " the")]
    assert splitter.in_thinking


@pytest.mark.parametrize("start_in_thinking", [True, False])
def test_tags_split_across_chunks(start_in_thinking):
    stream = ("" if start_in_thinking else "<think>") + "\nstep 1 < 2\n</think>\n\nanswer </ok>"
    assert split(list(stream), start_in_thinking) == ("step 1 < 2", "answer </ok>")
    assert split(["<th", "ink>r</", "thi", "nk", ">a"]) == ("r", "a")


def test_no_closing_tag_is_truncated_in_thinking():
    splitter, _ = run(["\nStill thinking", " about it\n"], start_in_thinking=True)
    assert (splitter.reasoning_text, splitter.answer_text) == ("Still thinking about it", "")
    assert splitter.truncated_in_thinking
    # A partial closing tag at the very end is reasoning text.
    assert split(["hmm </thi"], start_in_thinking=True) == ("hmm </thi", "")
    # Nothing at all: still no answer.
    assert run([], start_in_thinking=True)[0].truncated_in_thinking


def test_finish_takes_the_text_the_decoder_held():
    splitter = ReasoningSplitter(start_in_thinking=True)
    splitter.feed("r</think>", None)
    assert splitter.finish("\n\nend") == [Delta("answer", "end")]
    assert (splitter.reasoning_tokens, splitter.answer_tokens) == (1, 0)


def test_truncated_only_after_finish():
    splitter = ReasoningSplitter(start_in_thinking=True)
    splitter.feed("x")
    assert not splitter.truncated_in_thinking
    splitter.finish()
    assert splitter.truncated_in_thinking


@pytest.mark.parametrize("start_in_thinking, stream", [(False, "<think>\n\n</think>\n\nHi"), (True, "\n\n</think>\n\nHi")])
def test_empty_thinking(start_in_thinking, stream):
    splitter, deltas = run([stream], start_in_thinking)
    assert (splitter.reasoning_text, splitter.answer_text) == ("", "Hi")
    assert deltas == [Delta("answer", "Hi")] and not splitter.truncated_in_thinking


def test_text_before_any_tag():
    # Whitespace before a leading <think> is dropped.
    assert split(["\n \n", "<think>r</think>a"]) == ("r", "a")
    # Other text before any tag makes the stream an answer: later tags are answer text.
    assert split(["Sure. ", "<think>x</think> done"]) == ("", "Sure. <think>x</think> done")
    assert split(["</think>a"]) == ("", "</think>a")
    # No tags at all: a plain model.
    splitter, _ = run(["\n\nHello", " there"])
    assert (splitter.reasoning_text, splitter.answer_text) == ("", "Hello there")
    assert not splitter.truncated_in_thinking
    # A lone partial tag at the end is answer text; whitespace only is nothing.
    assert split(["<thi"]) == ("", "<thi")
    assert split([" \n"]) == ("", "")


def test_first_close_wins_and_later_tags_are_answer():
    assert split(["r</think>a </think> b"], True) == ("r", "a </think> b")
    assert split(["r</think>\n\na\n<think>\nmore\n</think>\nb"], True) == ("r", "a\n<think>\nmore\n</think>\nb")
    # A <think> inside the reasoning is reasoning text.
    assert split(["<think>a<think>b</think>c"]) == ("a<think>b", "c")


def test_whitespace_around_reasoning_and_answer():
    assert split(["\n\n  r1\n\n r2  \n", "\n</think>", "\n", "\n", "  indented"], True) == ("r1\n\n r2", "  indented")
    assert split(["r \n", "more"], True) == ("r \nmore", "")  # inner whitespace is kept once text follows


# --- token ids ----------------------------------------------------------------------------------------------------

IDS = {"think_start_id": START_ID, "think_end_id": END_ID}


def test_token_ids_recognise_tags_exactly():
    tokens = [("Okay", 1), ("</", 2), ("think", 3), (">", 4), (" so", 5), ("</think>", END_ID), ("\n\n", 6), ("4", 7)]
    splitter, _ = run(tokens, True, **IDS)
    assert (splitter.reasoning_text, splitter.answer_text) == ("Okay</think> so", "4")
    assert (splitter.reasoning_tokens, splitter.answer_tokens) == (6, 2)


def test_token_ids_from_the_start():
    tokens = [("\n", 9), ("<think>", START_ID), ("\n", 9), ("r", 1), ("</think>", END_ID), ("a", 2), ("<think>", START_ID)]
    splitter, _ = run(tokens, False, **IDS)
    assert (splitter.reasoning_text, splitter.answer_text) == ("r", "a<think>")
    assert (splitter.reasoning_tokens, splitter.answer_tokens) == (5, 2)


def test_tag_token_with_text_the_decoder_held_back():
    # The stream decoder may release held-back text together with the tag token's text.
    assert split([("a", 1), ("b</think>", END_ID), ("c", 2)], True, **IDS) == ("ab", "c")
    assert split([("", 1), ("</think>", END_ID)], True, **IDS) == ("", "")


def test_token_counts_in_text_mode():
    splitter, _ = run(["\n", "<think>", "r", "</think>", "\n\n", "a", "b"])
    assert (splitter.reasoning_tokens, splitter.answer_tokens) == (4, 3)
    splitter, _ = run(["hello", " world"])
    assert (splitter.reasoning_tokens, splitter.answer_tokens) == (0, 2)


@pytest.mark.parametrize("with_ids", [True, False])
def test_real_tokenizer_stream_decoder_into_splitter(with_ids):
    from r1cli.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(FIXTURE)
    reasoning, answer = "思考一下：鑫龘 🤖 𠀀 嗯。", "答案是 👩‍👩‍👧 **4** ✓"
    ids = tok.encode(f"{reasoning}\n</think>\n\n{answer}")
    assert END_ID in ids and any("\ufffd" in tok.decode([i]) for i in ids)
    decoder = tok.stream_decoder()
    splitter = ReasoningSplitter(True, think_start_id=tok.think_start_id, think_end_id=tok.think_end_id)
    deltas, pieces = [], []
    for token_id in ids:
        pieces.append(decoder.add(token_id))
        deltas += splitter.feed(pieces[-1], token_id if with_ids else None)
    deltas += splitter.finish(decoder.flush())
    assert "" in pieces  # some text was held back for a whole character
    assert all("\ufffd" not in d.text for d in deltas)
    assert (splitter.reasoning_text, splitter.answer_text) == (reasoning, answer)
    if with_ids:
        assert splitter.reasoning_tokens == ids.index(END_ID) + 1
        assert splitter.reasoning_tokens + splitter.answer_tokens == len(ids)


# --- property: chunking never changes the split -------------------------------------------------------------------

PIECES = ["<think>", "</think>", "<", "</", "<th", "think", "ink>", ">", "\n", "\n\n", " ", "a", "b", "思", "🤖", "x y"]


def chunked(text, cuts):
    points = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[i:j] for i, j in zip(bounds, bounds[1:])]


def outcome(chunks, start_in_thinking, **kwargs):
    splitter, _ = run(chunks, start_in_thinking, **kwargs)
    return splitter.reasoning_text, splitter.answer_text, splitter.truncated_in_thinking


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=25), st.lists(st.integers(0, 10_000), max_size=30), st.booleans())
def test_every_chunking_gives_the_same_split(pieces, cuts, start_in_thinking):
    text = "".join(pieces)
    whole = outcome([text], start_in_thinking)
    assert outcome(chunked(text, cuts), start_in_thinking) == whole
    assert outcome(list(text), start_in_thinking) == whole


TOKENS = [("<think>", START_ID), ("</think>", END_ID), ("\n", 198), ("\n\n", 271), (" ", 220), ("a", 64), ("思", 1), ("<", 27)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=25), st.booleans())
def test_token_ids_and_text_agree_when_tags_are_whole_tokens(tokens, start_in_thinking):
    # No piece but the tags spells a tag, so text mode sees the same tags as id mode.
    text = "".join(t for t, _ in tokens)
    assert outcome(tokens, start_in_thinking, **IDS) == outcome([text], start_in_thinking)
