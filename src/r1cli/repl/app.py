"""`r1 chat`: the read-generate loop. Input through prompt_toolkit on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.text import Text

from ..errors import R1Error
from ..events import ChatModel, Start
from ..options import ModelOptions
from ..run import check_text
from ..session import ChatSession
from ..settings import state_dir
from . import commands
from .render import TurnView

PROMPT = ">>> "


@contextmanager
def keys_held():
    """While a reply streams, the terminal neither echoes nor line-edits what is typed (ECHO and ICANON off; ISIG
    stays, so Ctrl-C still stops the reply). Echoed keys would land inside the live display, which then redraws
    over the wrong lines (a duplicated line; a typed-ahead `/clear` or ^L shown inside the answer). The keys wait
    in the terminal's input queue, unread, and the next prompt starts with them (docs/chat.md, "Typing ahead")."""
    if not sys.stdin.isatty():
        yield
        return
    import termios

    fd = sys.stdin.fileno()
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)  # TCSANOW: keys already typed stay queued
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


class Chat:
    def __init__(self, model: ChatModel, console: Console, think: str, sampling: dict, system: str | None = None,
                 history: bool = True):
        self.model, self.console, self.think = model, console, think
        self.sampling = dict(sampling)  # /set overrides on top of the model's defaults
        self.session = ChatSession(system=system, model=model.name)
        self.history = history
        self.notices_shown: set[str] = set()
        self.context: tuple[int, int] | None = None  # tokens in the context after the last turn, and its length

    def info(self, message: str) -> None:
        self.console.print(Text(message, style="dim"))

    def turn(self, user: str) -> None:
        """Send one message and render the reply; Ctrl-C stops it, keeping the partial answer (marked)."""
        stream = self.model.chat(self.session.messages(user), self.session.system, self.sampling)
        start: Start = next(stream)  # always first, before the model runs
        for notice in start.notices:
            if notice not in self.notices_shown:  # once per session, not every turn
                self.notices_shown.add(notice)
                self.info(notice)
        with keys_held():
            view = TurnView(self.console, self.think, start.starts_in_thinking)
            try:
                stats = stream.drive(view.on_event)
            finally:
                view.live.stop()
            view.finish(stats)
        if start.max_len:  # a local model: its context length
            self.context = (stats.prompt_tokens + stats.completion_tokens, start.max_len)
        self.session.add(user, stats)

    # --- input ---------------------------------------------------------------------------------------------------

    def _prompt_session(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.application import run_in_terminal
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        bindings = KeyBindings()

        @bindings.add("enter")
        def _send(event):
            event.current_buffer.validate_and_handle()

        @bindings.add("escape", "enter")  # Alt+Enter sends the same keys
        def _newline(event):
            event.current_buffer.insert_text("\n")

        @bindings.add("c-t")
        def _expand_reasoning(event):
            run_in_terminal(lambda: commands.show_last_reasoning(self))

        if self.history:
            folder = state_dir()
            folder.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(folder / "chat_history"))
        else:
            history = InMemoryHistory()
        # multiline: pasted text keeps its newlines and stays one message; Enter is rebound to send.
        return PromptSession(history=history, multiline=True, key_bindings=bindings,
                             prompt_continuation=lambda width, line, wrap: "... ".rjust(width))

    def _read_lines(self):
        """Messages without a terminal: one per line of stdin."""
        try:  # a line that is not UTF-8 then reaches check_text (one refused turn) instead of ending the chat
            sys.stdin.reconfigure(errors="surrogateescape")
        except (AttributeError, ValueError):
            pass
        for line in sys.stdin:
            yield line.rstrip("\n")

    def loop(self) -> None:
        interactive = sys.stdin.isatty()
        session = self._prompt_session() if interactive else None
        lines = None if interactive else self._read_lines()
        if interactive:
            self.info("Type a message, /help for commands, Ctrl-D to quit.")
        while True:
            try:
                text = session.prompt(PROMPT) if session else next(lines)
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line
            except (EOFError, StopIteration):
                break
            if not text.strip():
                continue
            try:
                if text.lstrip().startswith("/"):
                    if commands.dispatch(self, text) is commands.EXIT:
                        break
                else:
                    check_text(text, "this message")  # bytes that are not UTF-8 (a piped file) end only this turn
                    self.turn(text)
            except R1Error as e:
                self.console.print(Text(f"r1: {e}", style="red"))


def run_chat(model: ModelOptions, sampling: dict | None = None, system: str | None = None, think: str | None = None,
             history: bool = True, url: str | None = None, api_key: str | None = None, shard=None,
             torch_device=None) -> int:
    """A local model, opened as `model` (options.ModelOptions) says; or, with `url`, an OpenAI-compatible server
    (`model.name`: the model it serves, default its first).
    Tensor parallel (`shard`): rank 0 owns the terminal; the other ranks load their part and follow its turns
    (slash commands act on rank 0; what reaches the model travels with each turn's generation command)."""
    from ..settings import load_settings

    if shard is not None and not shard.leader:
        from ..engine import open_model

        return open_model(model, shard=shard, torch_device=torch_device).follow()
    console = Console(highlight=False)
    console.soft_wrap = not console.is_terminal  # no wrapping of lines written to a file or pipe
    think = think or load_settings().get("think", "collapse")
    if think not in ("show", "hide", "collapse"):
        think = "collapse"
    announce = lambda line: console.print(Text(line, style="dim"))  # noqa: E731
    from .. import progress

    # A local model's load draws its own progress bars on stderr (progress.py): one live display at a time.
    spinner = console.is_terminal and (url or not progress.enabled())
    with console.status("loading the model…", spinner="dots") if spinner else _nothing():
        if url:
            from ..remote import RemoteModel

            opened = RemoteModel.connect(url, api_key, model.name)
            announce(f"{opened.base} · model {opened.name}")
        else:
            from ..engine import open_model

            opened = open_model(model, interactive=sys.stdin.isatty() and shard is None, announce=announce,
                                shard=shard, torch_device=torch_device)
    Chat(opened, console, think, sampling or {}, system, history).loop()
    return 0


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
