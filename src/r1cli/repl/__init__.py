"""The `r1 chat` REPL: app.py (the loop and input), render.py (thinking panel, answer, footer), commands.py."""

from .app import Chat, run_chat

__all__ = ["Chat", "run_chat"]
