"""Splits a model's output stream into reasoning and answer, for `r1 run`, `r1 chat` and `r1 serve`.

Rules (see docs/prompting.md):
- The stream starts inside the reasoning when the prompt ends with "<think>\\n" (`start_in_thinking`); otherwise
  whitespace before a leading <think> is dropped, and any other text before a tag makes the whole stream answer.
- The first </think> ends the reasoning; later <think> and </think> are answer text, as is a <think> met inside
  the reasoning (reasoning text, then).
- The reasoning is stripped of surrounding whitespace (R1 writes "<think>\\n...\\n</think>"); the answer of its
  leading newlines (R1 writes "</think>\\n\\n").
- With token ids and single-token tags the tags are recognised by id only; otherwise in the text, where a tag may
  be split across chunks: a suffix that could begin a tag is held back until it is resolved.
"""

from __future__ import annotations

from typing import NamedTuple

PRE, THINKING, ANSWER = "pre", "thinking", "answer"


class Delta(NamedTuple):
    kind: str  # "reasoning" or "answer"
    text: str


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    """Feed it the decoded text of each token (and the id when known); it returns reasoning and answer deltas."""

    def __init__(
        self,
        start_in_thinking: bool,
        think_start: str = "<think>",
        think_end: str = "</think>",
        think_start_id: int | None = None,
        think_end_id: int | None = None,
    ):
        self.think_start, self.think_end = think_start, think_end
        self.think_start_id, self.think_end_id = think_start_id, think_end_id
        self._state = THINKING if start_in_thinking else PRE
        self._pending = ""  # text held back: a possible partial tag, or whitespace that may yet be dropped
        self._at_start = {THINKING: True, ANSWER: True}  # nothing emitted yet in that part: strip leading space
        self._reasoning: list[str] = []
        self._answer: list[str] = []
        self._pre_tokens = 0  # tokens fed before we know whether they open a reasoning or an answer
        self.reasoning_tokens = 0
        self.answer_tokens = 0
        self._tags_seen = 0  # tags applied so far: a token that applied one counts as reasoning
        self._finished = False

    # --- public ----------------------------------------------------------------------------------------------------

    @property
    def reasoning_text(self) -> str:
        return "".join(self._reasoning)

    @property
    def answer_text(self) -> str:
        return "".join(self._answer)

    @property
    def in_thinking(self) -> bool:
        return self._state == THINKING

    @property
    def truncated_in_thinking(self) -> bool:
        """The stream ended inside the reasoning: no answer was produced."""
        return self._finished and self._state == THINKING

    def feed(self, text: str, token_id: int | None = None) -> list[Delta]:
        """Take one token's text (or any chunk of text); return the deltas it completes."""
        out: list[Delta] = []
        state_before, tags_before = self._state, self._tags_seen
        by_id = token_id is not None and self.think_start_id is not None and self.think_end_id is not None
        if by_id and token_id in (self.think_start_id, self.think_end_id):
            tag = self.think_start if token_id == self.think_start_id else self.think_end
            # The stream decoder may release held-back text together with the tag's text.
            self._consume(text[: -len(tag)] if text.endswith(tag) else text, out, scan=False)
            if not self._enter_tag(tag):
                self._consume(tag, out, scan=False)  # a tag out of place is text
        else:
            self._consume(text, out, scan=not by_id)
        self._count(state_before, tags_before)
        return _merge(out)

    def finish(self, text: str = "") -> list[Delta]:
        """End of stream: release what was held back. `text`: what the stream decoder still held (not a token)."""
        out: list[Delta] = []
        self._consume(text, out, scan=self.think_start_id is None or self.think_end_id is None)
        pending, self._pending = self._pending, ""
        if self._state == PRE and pending.strip():
            self._state = ANSWER  # e.g. a lone "<thi" at the very end
            self._emit(ANSWER, pending, out)
        elif self._state == THINKING:
            self._emit(THINKING, pending.rstrip(), out)  # a partial "</thi" is reasoning text
        self.answer_tokens += self._pre_tokens
        self._pre_tokens = 0
        self._finished = True
        return _merge(out)

    # --- internals -------------------------------------------------------------------------------------------------

    def _count(self, state_before: str, tags_before: int) -> None:
        # A token counts as reasoning when any of it was inside the reasoning (tags included). Tokens before the
        # first tag or text wait until we know which part they begin.
        if self._state == PRE:
            self._pre_tokens += 1
            return
        n, self._pre_tokens = 1 + self._pre_tokens, 0
        if THINKING in (state_before, self._state) or self._tags_seen != tags_before:
            self.reasoning_tokens += n
        else:
            self.answer_tokens += n

    def _enter_tag(self, tag: str) -> bool:
        """Apply a tag; False when it does not change the state here (and so is plain text)."""
        if tag == self.think_start and self._state == PRE:
            self._pending = ""  # whitespace before a leading <think> is dropped
            self._state = THINKING
            self._tags_seen += 1
            return True
        if tag == self.think_end and self._state == THINKING:
            self._pending = ""  # trailing whitespace of the reasoning
            self._state = ANSWER
            self._tags_seen += 1
            return True
        return False

    def _consume(self, text: str, out: list[Delta], scan: bool) -> None:
        buf, self._pending = self._pending + text, ""
        while buf:
            if self._state == PRE:
                at = buf.find(self.think_start) if scan else -1
                head = buf[:at] if at >= 0 else buf[: len(buf) - (_partial_tag_len(buf, self.think_start) if scan else 0)]
                if head.strip():  # text before any tag: the stream is an answer
                    self._state = ANSWER
                    continue
                if at < 0:
                    self._pending = buf  # only whitespace and maybe the start of "<think>" so far
                    return
                self._enter_tag(self.think_start)
                buf = buf[at + len(self.think_start) :]
            elif self._state == THINKING:
                at = buf.find(self.think_end) if scan else -1
                if at >= 0:
                    self._emit(THINKING, buf[:at].rstrip(), out)
                    self._enter_tag(self.think_end)
                    buf = buf[at + len(self.think_end) :]
                    continue
                keep = _partial_tag_len(buf, self.think_end) if scan else 0
                text_part = buf[: len(buf) - keep]
                stripped = text_part.rstrip()  # trailing whitespace waits: it is dropped if </think> follows
                self._emit(THINKING, stripped, out)
                self._pending = buf[len(stripped) :]
                return
            else:
                self._emit(ANSWER, buf, out)
                return

    def _emit(self, state: str, text: str, out: list[Delta]) -> None:
        if self._at_start[state]:
            text = text.lstrip() if state == THINKING else text.lstrip("\r\n")
        if not text:
            return
        self._at_start[state] = False
        kind = "reasoning" if state == THINKING else "answer"
        (self._reasoning if state == THINKING else self._answer).append(text)
        out.append(Delta(kind, text))


def _merge(deltas: list[Delta]) -> list[Delta]:
    merged: list[Delta] = []
    for d in deltas:
        if merged and merged[-1].kind == d.kind:
            merged[-1] = Delta(d.kind, merged[-1].text + d.text)
        else:
            merged.append(d)
    return merged
