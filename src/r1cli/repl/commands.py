"""Slash commands of `r1 chat`. Each takes the chat and the text after the command name."""

from __future__ import annotations

import base64
import sys
from typing import TYPE_CHECKING, Callable

from rich.text import Text

from ..errors import R1Error
from ..sampling import SAMPLING_RULES, check_sampling
from ..session import ChatSession
from ..settings import save_setting
from .render import THINK_MODES, reasoning_panel, thought_summary

if TYPE_CHECKING:
    from .app import Chat

EXIT = object()  # returned by /exit
SETTABLE = tuple(SAMPLING_RULES)  # checked by the command line's rules (sampling.check_sampling)


def cmd_help(chat: Chat, arg: str):
    for name, (_, usage, text) in COMMANDS.items():
        # Text, not markup: "[show|hide|collapse]" would be read as a style tag and vanish
        chat.console.print(Text.assemble("  ", (usage or "/" + name, "bold"), f"  {text}"), highlight=False)
    chat.console.print("  Enter sends · Alt+Enter or Esc Enter: new line · Ctrl-T: show the last reasoning · "
                       "Ctrl-C: stop generating / clear the line · Ctrl-D: quit", style="dim")


def cmd_think(chat: Chat, arg: str):
    if not arg:
        return show_last_reasoning(chat)
    if arg not in THINK_MODES:
        raise R1Error(f"/think {arg}: use /think show, /think hide or /think collapse (or /think alone)")
    chat.think = arg
    save_setting("think", arg)
    chat.info(f"thinking display: {arg} (saved)")


def show_last_reasoning(chat: Chat):
    turn = next((t for t in reversed(chat.session.turns) if t.reasoning), None)
    if turn is None:
        return chat.info("no reasoning yet")
    title = thought_summary(turn.stats.get("thinking_ms", 0) / 1000, turn.stats.get("reasoning_tokens", 0))
    chat.console.print(reasoning_panel(turn.reasoning, title))


def cmd_clear(chat: Chat, arg: str):
    chat.session.clear()
    chat.info("conversation cleared")


def cmd_undo(chat: Chat, arg: str):
    turn = chat.session.undo()
    chat.info("removed the last turn" if turn else "nothing to undo")


def cmd_retry(chat: Chat, arg: str):
    turn = chat.session.undo()
    if turn is None:
        return chat.info("nothing to retry")
    chat.console.print(Text(f">>> {turn.user}", style="dim"))
    chat.turn(turn.user)


def cmd_system(chat: Chat, arg: str):
    if not arg:
        return chat.info(f"system prompt: {chat.session.system!r}" if chat.session.system else "no system prompt")
    chat.session.system = None if arg in ("off", "none", "clear") else arg
    chat.info("system prompt removed" if chat.session.system is None else "system prompt set")


def cmd_set(chat: Chat, arg: str):
    if not arg:
        params = chat.model.sampling(chat.sampling)
        return chat.info(" · ".join(f"{k} {getattr(params, k)}" for k in SETTABLE))
    key, _, value = arg.partition(" ")
    if key not in SETTABLE or not value.strip():
        raise R1Error(f"/set: use /set NAME VALUE with NAME one of {', '.join(SETTABLE)}")
    value = value.strip()
    if value.lower() in ("none", "default"):
        chat.sampling[key] = None
    else:
        chat.sampling[key] = check_sampling(key, value, f"/set {key}")
    chat.info(f"{key} = {chat.sampling[key] if chat.sampling[key] is not None else 'default'}")


def cmd_save(chat: Chat, arg: str):
    if not arg:
        raise R1Error("/save FILE: a .json name saves JSON (loadable with /load), any other name Markdown")
    chat.info(f"saved {chat.session.save(arg)}")


def cmd_load(chat: Chat, arg: str):
    if not arg:
        raise R1Error("/load FILE.json: a transcript saved with /save FILE.json")
    loaded = ChatSession.load(arg)
    loaded.model = chat.session.model
    chat.session = loaded
    chat.info(f"loaded {len(loaded.turns)} turns from {arg}")


def cmd_stats(chat: Chat, arg: str):
    turns = [t.stats for t in chat.session.turns if t.stats]
    completion = sum(s.get("completion_tokens", 0) for s in turns)
    decode_s = sum(s.get("total_ms", 0) - s.get("ttft_ms", 0) for s in turns) / 1000
    chat.info(f"{len(chat.session.turns)} turns · {completion} tokens generated "
              f"({sum(s.get('reasoning_tokens', 0) for s in turns)} thinking) · "
              f"{completion / decode_s if decode_s > 0 else 0:.1f} tokens/s"
              + (f" · context {chat.context[0]}/{chat.context[1]} tokens" if chat.context else ""))


def cmd_copy(chat: Chat, arg: str):
    answer = next((t.answer for t in reversed(chat.session.turns) if t.answer), None)
    if answer is None:
        return chat.info("no answer to copy")
    # OSC 52: the terminal puts the text on the clipboard (works over ssh; tmux needs set-clipboard on).
    sys.stdout.write(f"\x1b]52;c;{base64.b64encode(answer.encode()).decode()}\x07")
    sys.stdout.flush()
    chat.info(f"copied {len(answer)} characters")


def cmd_exit(chat: Chat, arg: str):
    return EXIT


COMMANDS: dict[str, tuple[Callable, str, str]] = {
    "help": (cmd_help, "", "this help"),
    "think": (cmd_think, "/think [show|hide|collapse]", "show the last reasoning in full, or set how thinking shows"),
    "clear": (cmd_clear, "", "forget the conversation"),
    "retry": (cmd_retry, "", "ask the last question again"),
    "undo": (cmd_undo, "", "remove the last question and answer"),
    "system": (cmd_system, "/system [TEXT|off]", "show or set the system prompt"),
    "set": (cmd_set, "/set [NAME VALUE]", f"show or set sampling: {', '.join(SETTABLE)}"),
    "save": (cmd_save, "/save FILE", "save the transcript with reasoning (.json or Markdown)"),
    "load": (cmd_load, "/load FILE.json", "continue a saved conversation"),
    "stats": (cmd_stats, "", "tokens, speed and context use of this session"),
    "copy": (cmd_copy, "", "copy the last answer to the clipboard (OSC 52)"),
    "exit": (cmd_exit, "", "quit (or Ctrl-D)"),
}


def dispatch(chat: Chat, line: str):
    name, _, arg = line.strip()[1:].partition(" ")
    matches = [n for n in COMMANDS if n.startswith(name.lower())] if name else []
    if name.lower() in COMMANDS:
        matches = [name.lower()]
    if len(matches) != 1:
        raise R1Error(f"unknown command /{name}: /help lists them" if not matches else
                      f"/{name} is ambiguous: {', '.join('/' + m for m in matches)}")
    return COMMANDS[matches[0]][0](chat, arg.strip())
