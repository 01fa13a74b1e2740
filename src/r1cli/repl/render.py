"""How a chat turn looks: the thinking panel, its collapse to one line, the answer as Markdown, the footer.

The thinking panel lives in `TurnView._thinking_panel`; it collapses in `TurnView._collapse` when the first answer
text arrives. `think` modes: collapse (default: live panel, then one line), show (the full reasoning stays on
screen), hide (a one-line spinner instead of the panel, then one line).
"""

from __future__ import annotations

import textwrap
import time

from rich.console import Console, RenderableType
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.text import Text

from ..events import AnswerDelta, Event, ReasoningDelta, TurnStats

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
THINK_MODES = ("show", "hide", "collapse")
TAIL_LINES = 6  # how much of the reasoning the live panel shows


def thought_summary(seconds: float, tokens: int) -> str:
    return f"Thought for {seconds:.1f} s, {tokens} tokens"


def reasoning_panel(reasoning: str, title: str) -> Panel:
    return Panel(Text(reasoning, style="dim"), title=title, title_align="left", border_style="dim")


def footer(stats: TurnStats) -> str:
    parts = [f"ttft {stats.ttft_ms / 1000:.2f} s"]
    if stats.reasoning_tokens:
        parts.append(f"thought {stats.thinking_ms / 1000:.1f} s")
    parts.append(f"{stats.completion_tokens} tokens ({stats.reasoning_tokens} thinking)")
    parts.append(f"{stats.decode_tokens_per_s:.1f} tokens/s")
    if stats.acceptance_rate is not None:  # speculative decoding (--draft, --mtp)
        parts.append(f"draft {stats.acceptance_rate:.0%} accepted, {stats.tokens_per_step:.2f} tokens/step")
    parts.append(f"prompt {stats.prompt_tokens} ({stats.cached_tokens} cached)")
    return " · ".join(parts)


def _split_finished_blocks(text: str) -> tuple[str, str]:
    """Markdown up to the last blank line outside a code fence (final, can be printed for good), and the rest."""
    cut = 0
    fence_open = False
    pos = 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        if line.lstrip().startswith(("```", "~~~")):
            fence_open = not fence_open
        elif not line.strip() and not fence_open and pos < len(text):
            cut = pos
    return text[:cut], text[cut:]


class TurnView:
    """Renders one turn's events on a rich console. Call on_event for each event, then finish(stats). The token
    counts come with the deltas (events.py)."""

    def __init__(self, console: Console, think: str, starts_in_thinking: bool = True):
        self.console, self.think = console, think
        self.starts_in_thinking = starts_in_thinking
        self.reasoning, self.answer = "", ""
        self.printed = 0  # answer characters printed for good (finished Markdown blocks)
        self.t0 = time.perf_counter()
        self.tokens = 0  # generated so far, as the last delta said
        self.tokens_at_last_reasoning = 0
        self.summary: str | None = None  # the collapsed line, once the answer began
        self.thought_s: float | None = None  # thinking time as the collapsed line says it; the footer says the same
        self.live = self._live(self._thinking_panel, transient=True)

    # --- phases ------------------------------------------------------------------------------------------------

    def _tokens_so_far(self) -> int:
        return self.tokens if self.reasoning else 0

    def _thinking_panel(self) -> RenderableType:
        elapsed = time.perf_counter() - self.t0
        spin = SPINNER[int(elapsed * 10) % len(SPINNER)]
        doing = "Thinking" if self.starts_in_thinking or self.reasoning else "Waiting"
        title = f"{spin} {doing} · {elapsed:.1f} s · {self._tokens_so_far()} tokens"
        if self.think == "hide" or not self.reasoning:
            return Text(title, style="dim")
        width = max(20, self.console.width - 4)
        lines = [w for line in self.reasoning.splitlines() for w in (textwrap.wrap(line, width) or [""])]
        return Panel(Text("\n".join(lines[-TAIL_LINES:]), style="dim"), title=title, title_align="left",
                     border_style="dim")

    def _answer_tail(self) -> RenderableType:
        return Markdown(self.answer[self.printed :])

    def _live(self, get_renderable, **kw) -> Live:
        # Without a terminal nothing is drawn live: finished blocks and the final tail are printed once.
        live = Live(console=self.console, get_renderable=get_renderable, refresh_per_second=8, **kw)
        if self.console.is_terminal:
            live.start()
        return live

    def _collapse(self) -> None:
        """The answer began: replace the live panel by one line (or the full reasoning in 'show' mode)."""
        self.live.stop()  # transient: the panel disappears
        if self.reasoning:
            tokens = self.tokens_at_last_reasoning + 1  # and the </think> token
            self.thought_s = time.perf_counter() - self.t0
            self.summary = thought_summary(self.thought_s, tokens)
            if self.think == "show":
                self.console.print(reasoning_panel(self.reasoning, self.summary))
            else:
                self.console.print(Text(self.summary, style="dim"))
        self.live = self._live(self._answer_tail, vertical_overflow="visible")

    # --- events ------------------------------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        if isinstance(event, (ReasoningDelta, AnswerDelta)):
            self.tokens = event.tokens
        if isinstance(event, ReasoningDelta):
            self.reasoning += event.text
            self.tokens_at_last_reasoning = event.tokens
        elif isinstance(event, AnswerDelta):
            if self.summary is None and not self.answer:
                self._collapse()
            self.answer += event.text
            done, _ = _split_finished_blocks(self.answer)
            if len(done) > self.printed:
                # Finished paragraphs are printed for good, so the live part stays short (no redraw artefacts).
                self.live.console.print(Markdown(self.answer[self.printed : len(done)]))
                self.printed = len(done)

    def finish(self, stats: TurnStats) -> None:
        """Ends the turn on screen. The thinking time shown when the panel collapsed becomes the turn's (stats, so
        the footer, /think and saved transcripts repeat that one measurement)."""
        self.live.stop()
        if self.thought_s is not None:
            stats.thinking_ms = 1000 * self.thought_s
        if not self.console.is_terminal and self.answer[self.printed :]:
            self.console.print(self._answer_tail())
        if not self.answer and stats.reasoning:
            summary = thought_summary(stats.thinking_ms / 1000, stats.reasoning_tokens)
            if self.think == "show":
                self.console.print(reasoning_panel(stats.reasoning, summary))
            else:
                self.console.print(Text(summary, style="dim"))
        if stats.finish_reason == "interrupted":
            self.console.print(Text("[interrupted]", style="yellow"))
        elif stats.finish_reason == "repetition":
            self.console.print(Text("[stopped: the reply was repeating itself in a loop; /set repetition_penalty 1.1 "
                                    "makes repeats less likely]", style="yellow"))
        elif stats.truncated_in_thinking:
            self.console.print(Text("Stopped while thinking: no answer was produced (/set max_tokens N for more).",
                                    style="yellow"))
        elif stats.finish_reason == "length":
            self.console.print(Text("[cut off at max_tokens]", style="yellow"))
        self.console.print(Text(footer(stats), style="dim"))
