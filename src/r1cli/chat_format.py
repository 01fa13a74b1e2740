"""Chat prompts: the model's own chat template rendered like transformers does, plus DeepSeek's rules for R1.

R1 rules (DeepSeek's usage recommendations): no system prompt (its text goes to the start of the first user
message), the reply begins with "<think>\\n", and earlier assistant turns are sent back with their answer only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import R1Error
from .tokenizer import Tokenizer

THINK_START, THINK_END = "<think>", "</think>"
R1_ASSISTANT_TAG = "<｜Assistant｜>"
# The one copy of DeepSeek's settings for R1 models (its usage recommendations: temperature 0.6, top-p 0.95; its
# evaluations: "a maximum generation length of 32,768 tokens"). runner.generation_defaults applies them.
R1_SAMPLING_DEFAULTS = {"temperature": 0.6, "top_p": 0.95}
R1_MAX_TOKENS = 32768
# Message keys that hold a turn's reasoning (transformers aliases them to one another).
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


@dataclass
class PromptBuild:
    text: str  # the rendered prompt, including a forced "<think>\n" for R1
    ids: list[int]
    starts_in_thinking: bool  # the completion begins inside the reasoning: hand this to ReasoningSplitter
    notices: list[str] = field(default_factory=list)  # one-line messages for the user


# --- the sandbox -------------------------------------------------------------------------------------------------


class _Sandbox(ImmutableSandboxedEnvironment):
    # Jinja's sandbox answers an unsafe attribute (`''.__class__`) with an Undefined that only fails when used
    # further; fail at once instead, so probing a template is always an error and never a silent empty string.
    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")


class _TemplateNamespace(jinja2.utils.Namespace):
    # As in transformers: a namespace may not hold underscore names (a way to reach CPython internals).
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")


class _TemplateDict:
    # `dict` for templates, without the class's attributes.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping, unlike jinja's built-in filter.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=_TemplateDict(),
        namespace=_TemplateNamespace,
    )
    return env.from_string(template)


def _plain(value):
    # Everything a template sees is rebuilt from JSON types, so it cannot call methods of rich objects.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for base in (str, int, float):  # subclasses such as enums
        if isinstance(value, base):
            return base(value)
    return f"<{type(value).__name__}>"


def _template_messages(messages: list[dict]) -> list[dict]:
    # As transformers does: drop None-valued keys, and give reasoning under all the names templates read.
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise R1Error(f"a chat message must be a dict, not {type(message).__name__}")
        message = {k: v for k, v in _plain(message).items() if v is not None}
        reasoning = next((message[k] for k in REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# --- rendering -----------------------------------------------------------------------------------------------------


def _fallback_prompt(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    # For a model without a chat template: a plain, readable transcript.
    parts = [tokenizer.bos_token or ""]
    for message in messages:
        parts.append(f"{str(message.get('role', 'user')).capitalize()}: {message.get('content') or ''}\n\n")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


def render_prompt(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render `messages` with the model's chat template exactly as transformers' apply_chat_template does."""
    if tokenizer.chat_template is None:
        return _fallback_prompt(tokenizer, messages, add_generation_prompt)
    variables = {**tokenizer.special_tokens, "tools": None, "documents": None}
    try:
        template = _compile(tokenizer.chat_template)
        return template.render(
            messages=_template_messages(messages), add_generation_prompt=add_generation_prompt, **_plain(variables)
        )
    except jinja2.exceptions.SecurityError as e:
        raise R1Error(f"the chat template tried something unsafe and was stopped: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise R1Error(f"the model's chat template failed: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise R1Error(f"the model's chat template failed: {type(e).__name__}: {e}") from None


def answer_only(content: str) -> str:
    """An assistant turn's answer: the text after the first `</think>` (R1 never gets its reasoning back)."""
    _, close, after = content.partition(THINK_END)
    return after.lstrip("\r\n") if close else content


def family_for(tokenizer: Tokenizer | None, alias=None) -> str:
    """"r1" for a deepseek-r1 alias (registry.Alias), or when the tokenizer has single <think> and </think> tokens
    and the template is DeepSeek's; else "plain". The one test of "is this an R1 model": prompt rules, sampling
    defaults (runner.generation_defaults) and `r1 show` all follow it."""
    if alias is not None and alias.name.startswith("deepseek-r1"):
        return "r1"
    has_think = tokenizer is not None and tokenizer.think_start_id is not None and tokenizer.think_end_id is not None
    return "r1" if has_think and R1_ASSISTANT_TAG in (tokenizer.chat_template or "") else "plain"


def _r1_messages(messages: list[dict], system: str | None, notices: list[str]) -> list[dict]:
    """DeepSeek's rules: system text moved into the first user message, assistant turns without reasoning."""
    system_texts = [m.get("content") or "" for m in messages if m.get("role") == "system"]
    system_text = "\n\n".join(t for t in [*system_texts, system or ""] if t.strip())
    out = []
    for message in messages:
        role = message.get("role")
        if role == "system":
            continue
        if role == "assistant":
            message = {k: v for k, v in message.items() if k not in REASONING_KEYS}
            if isinstance(message.get("content"), str):
                message["content"] = answer_only(message["content"])
        out.append(message)
    if system_text:
        notices.append("R1 models take no system prompt: the system text was put at the start of the first user message")
        first_user = next((i for i, m in enumerate(out) if m.get("role") == "user"), None)
        if first_user is None:
            out.insert(0, {"role": "user", "content": system_text})
        else:
            content = out[first_user].get("content") or ""
            out[first_user] = {**out[first_user], "content": f"{system_text}\n\n{content}" if content else system_text}
    return out


def build_prompt(tokenizer: Tokenizer, messages: list[dict], system: str | None = None, family: str = "r1") -> PromptBuild:
    """The prompt for the next assistant turn: rendered text, token ids, and whether the reply starts in thinking.

    family "r1": DeepSeek's rules (see the module docstring); `system` joins the messages' system texts.
    Otherwise the template as is; `system` replaces the messages' system messages.
    """
    notices: list[str] = []
    if tokenizer.chat_template is None:
        notices.append("the model has no chat template: using a plain 'User:/Assistant:' prompt format")
    if family == "r1":
        messages = _r1_messages(messages, system, notices)
    elif system:
        messages = [{"role": "system", "content": system}, *[m for m in messages if m.get("role") != "system"]]
    text = render_prompt(tokenizer, messages, add_generation_prompt=True)
    starts_in_thinking = False
    if family == "r1":
        # Later template revisions end with "<｜Assistant｜><think>\n"; older ones stop at the tag: force it.
        if not text.endswith(THINK_START + "\n"):
            text += "\n" if text.endswith(THINK_START) else THINK_START + "\n"
        starts_in_thinking = True
    # The template emits bos itself, so encode without special tokens; a template that adds bos twice is cut back.
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token * 2):
        text = text[len(tokenizer.bos_token) :]
    ids = tokenizer.encode(text, add_special_tokens=False)
    return PromptBuild(text=text, ids=ids, starts_in_thinking=starts_in_thinking, notices=notices)
