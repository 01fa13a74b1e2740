"""A chat's history: what was said, what is sent back to the model, and transcripts.

An assistant turn is stored with its parsed answer and, separately, its reasoning. Only the answer goes back into
the next prompt (DeepSeek's rule for R1); the reasoning is for display and transcripts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .chat_format import PromptBuild, build_prompt
from .errors import R1Error
from .settings import atomic_write
from .tokenizer import Tokenizer


@dataclass
class Turn:
    user: str
    answer: str = ""
    reasoning: str = ""
    finish_reason: str = "stop"  # stop | length | interrupted | repetition
    stats: dict = field(default_factory=dict)  # TurnStats.to_dict() without the texts


@dataclass
class ChatSession:
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)
    model: str = ""

    def messages(self, next_user: str | None = None) -> list[dict]:
        """The conversation as chat messages, answers only, optionally followed by a new user message."""
        out: list[dict] = []
        for turn in self.turns:
            out += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.answer}]
        if next_user is not None:
            out.append({"role": "user", "content": next_user})
        return out

    def prompt(self, tokenizer: Tokenizer, family: str, user: str) -> PromptBuild:
        return build_prompt(tokenizer, self.messages(user), system=self.system, family=family)

    def add(self, user: str, stats) -> Turn:
        """Record a finished (or interrupted) turn from its events.TurnStats."""
        numbers = {k: v for k, v in stats.to_dict().items() if k not in ("reasoning", "content")}
        turn = Turn(user, stats.content, stats.reasoning, stats.finish_reason, numbers)
        self.turns.append(turn)
        return turn

    def undo(self) -> Turn | None:
        return self.turns.pop() if self.turns else None

    def clear(self) -> None:
        self.turns.clear()

    # --- transcripts -------------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        data = {"format": "r1cli-chat/1", "model": self.model, "system": self.system,
                "turns": [asdict(t) for t in self.turns]}
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    def to_markdown(self) -> str:
        parts = [f"# Chat with {self.model}\n" if self.model else "# Chat\n"]
        if self.system:
            parts.append(f"**System:** {self.system}\n")
        for turn in self.turns:
            parts.append(f"## User\n\n{turn.user}\n")
            parts.append("## Assistant\n")
            if turn.reasoning:
                summary = f"Thought for {turn.stats.get('thinking_ms', 0) / 1000:.1f} s, {turn.stats.get('reasoning_tokens', 0)} tokens"
                parts.append(f"<details><summary>{summary}</summary>\n\n{turn.reasoning}\n\n</details>\n")
            parts.append(turn.answer + "\n")
            if turn.finish_reason == "interrupted":
                parts.append("*(interrupted)*\n")
            elif turn.finish_reason == "repetition":
                parts.append("*(stopped: repeating itself in a loop)*\n")
        return "\n".join(parts)

    def save(self, path: str | Path) -> Path:
        """Markdown, or JSON when the name ends in .json; written atomically (a failed save keeps the old file)."""
        path = Path(path).expanduser()
        text = self.to_json() if path.suffix.lower() == ".json" else self.to_markdown()
        try:
            atomic_write(path, text)
        except OSError as e:
            raise R1Error(f"cannot save {path}: {e.strerror or e}") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> ChatSession:
        """Load a JSON transcript written by save()."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            turns = [Turn(**t) for t in data["turns"]]
        except OSError as e:
            raise R1Error(f"cannot read {path}: {e.strerror or e}") from None
        except (ValueError, KeyError, TypeError):
            raise R1Error(f"{path} is not a JSON transcript saved by r1 chat (/save NAME.json)") from None
        return cls(system=data.get("system"), turns=turns, model=data.get("model", ""))
