"""Chat prompts: the model's own chat template rendered like transformers does, plus DeepSeek's rules for R1.

R1 rules (DeepSeek's usage recommendations): no system prompt (its text goes to the start of the first user
message), the reply begins with "<think>\\n", and earlier assistant turns are sent back with their answer only.

A template comes from an untrusted repo: it renders in jinja2's immutable sandbox with bounds on time, steps,
sizes and recursion (`RenderLimits`, docs/security.md); crossing one is a CheckpointError.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.runtime import LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import CheckpointError, R1Error
from .tokenizer import Tokenizer

THINK_START, THINK_END = "<think>", "</think>"
R1_ASSISTANT_TAG = "<｜Assistant｜>"
# The one copy of DeepSeek's settings for R1 models (its usage recommendations: temperature 0.6, top-p 0.95; its
# evaluations: "a maximum generation length of 32,768 tokens"). sampling.generation_defaults applies them.
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


@dataclass(frozen=True)
class RenderLimits:
    """What one rendering of a chat template may spend. Sizes count characters (a list: its items; an int: its
    bytes); the size limits grow with the input so that long conversations still render."""

    seconds: float = 5.0  # wall clock for the whole render
    steps: int = 1_000_000  # loop iterations plus calls, over the whole render
    range_items: int = 100_000  # items of all range() calls together
    depth: int = 64  # calls inside calls (macros calling macros, recursive loops)
    base_size: int = 1_000_000  # one value, and the whole output: this plus 4 x the input's characters
    allocation_factor: int = 32  # all values the template computes, together: this many times the size limit


LIMITS = RenderLimits()


class TemplateLimitError(jinja2.exceptions.SecurityError):
    """A chat template went past one of RenderLimits."""


class _Budget:
    """The running account of one render (a context variable: renders in several threads stay apart)."""

    def __init__(self, limits: RenderLimits, input_size: int):
        self.limits = limits
        self.size = limits.base_size + 4 * input_size
        self.allocation = self.size * limits.allocation_factor
        self.deadline = time.monotonic() + limits.seconds
        self.steps = self.range_items = self.depth = self.allocated = 0

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.limits.steps:
            raise TemplateLimitError(f"{self.limits.steps} loop iterations and calls")
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"{self.limits.seconds:g} seconds of rendering")

    def check_size(self, estimate: int, what: str) -> None:
        """Before computing a value of about `estimate` characters (items, bits)."""
        if estimate > self.size:
            raise TemplateLimitError(f"{self.size} characters for one value ({what} would make about {estimate})")

    def check_printed(self, value, what: str) -> int:
        """Before `value` is turned into text (output, `~`, formatting, a string filter): its printed size, which
        for a list of references to one long string is far more than its length."""
        n = _printed(value, self.size + 1)
        if n > self.size:
            raise TemplateLimitError(f"{self.size} characters for one value ({what} would print about {n} or more)")
        return n

    def charge(self, value, what: str):
        """After computing `value`: count it against the per-value and total allocation limits."""
        n = _size(value)
        if n:
            self.check_size(n, what)
            self.allocated += n
            if self.allocated > self.allocation:
                raise TemplateLimitError(f"{self.allocation} characters computed in all")
        return value


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("r1_template_budget", default=None)
_BIG_DIGITS = 7  # a width or count written with this many digits is past every size limit anyway


def _size(value) -> int:
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 8  # in bytes: an int's memory
    return 0


def _printed(value, limit: int, depth: int = 0) -> int:
    """About how many characters str(value) makes, counting up to `limit` (then it stops: it is past it)."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 3 + 1  # decimal digits, about
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if not isinstance(value, (list, tuple, set, frozenset)):
        return 16
    total = 2
    for item in value:
        total += 4 + (_printed(item, limit - total, depth + 1) if depth < 32 else 16)
        if total > limit:
            break
    return total


def _print_limit() -> int:
    budget = _BUDGET.get()
    return budget.size + 1 if budget is not None else 1 << 62


def _input_size(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_input_size(k) + _input_size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_input_size(v) for v in value)
    return 0


def _format_estimate(fmt: str, values) -> int:
    """The most characters `fmt % values` or `fmt.format(*values)` can make: its widths and precisions count."""
    specs = re.findall(r"%[^a-zA-Z%]*|\{[^{}]*\}", fmt)
    digits = [d for spec in specs for d in re.findall(r"\d+", spec)]
    if any(len(d) >= _BIG_DIGITS for d in digits):
        return 10**_BIG_DIGITS * max(1, len(digits))
    return len(fmt) + sum(int(d) for d in digits) + sum(_printed(v, _print_limit()) for v in values)


def _replace_estimate(s: str, old: str, new: str) -> int:
    if len(new) <= len(old):
        return len(s)
    return len(s) + (s.count(old) if old else len(s) + 1) * (len(new) - len(old))


def _join_estimate(sep, items) -> int | None:
    if not isinstance(items, (list, tuple, str)):
        return None  # a generator: its items are counted as they come, the result after the join
    return sum(_printed(v, _print_limit()) for v in items) + _size(sep) * max(0, len(items) - 1)


def _estimate_call(name: str, owner, args, kwargs) -> int | None:
    """Characters a str method or a filter may make, for the ones that can make far more than they read."""
    arg = lambda i, key, default=None: args[i] if len(args) > i else kwargs.get(key, default)  # noqa: E731
    if not isinstance(owner, str):
        return None
    if name in ("center", "ljust", "rjust", "zfill"):
        width = arg(0, "width", 0)
        return max(len(owner), width if isinstance(width, int) else 0)
    if name == "expandtabs":
        tabsize = arg(0, "tabsize", 8)
        return len(owner) * max(1, tabsize if isinstance(tabsize, int) else 1)
    if name == "replace":
        old, new = arg(0, "old", ""), arg(1, "new", "")
        if isinstance(old, str) and isinstance(new, str):
            return _replace_estimate(owner, old, new)
    if name == "join" and args:
        return _join_estimate(owner, args[0])
    if name == "indent":
        width = arg(0, "width", 4)
        width = width if isinstance(width, int) else len(str(width))
        return len(owner) + (owner.count("\n") + 1) * width
    if name == "wordwrap":
        wrap = arg(2, "wrapstring", "\n")
        return len(owner) * (1 + len(wrap if isinstance(wrap, str) else "\n"))
    if name == "format":
        return _format_estimate(owner, list(args) + list(kwargs.values()))
    return None


# Filters that never turn their (container) input into text; every other one may (lower, trim, string, tojson...).
_STRUCTURAL_FILTERS = frozenset({"attr", "batch", "count", "d", "default", "dictsort", "first", "groupby", "items",
                                 "last", "length", "list", "map", "max", "min", "random", "reject", "rejectattr",
                                 "reverse", "select", "selectattr", "slice", "sort", "sum", "unique", "join"})


def _budgeted_filter(name: str, f):
    # Every filter's result is counted; those that can blow up their input are estimated before they run.
    @functools.wraps(f)
    def run(*args, **kwargs):
        budget = _BUDGET.get()
        if budget is None:
            return f(*args, **kwargs)
        budget.step()
        pass_arg = getattr(f, "jinja_pass_arg", None)
        value_args = args[1:] if pass_arg is not None else args  # after the context/environment argument
        if value_args:
            if name not in _STRUCTURAL_FILTERS and isinstance(value_args[0], (list, tuple, dict, set, frozenset)):
                budget.check_printed(value_args[0], f"the {name} filter")
            if name == "join":
                estimate = _join_estimate(value_args[1] if len(value_args) > 1 else kwargs.get("d", ""), value_args[0])
            elif name == "tojson":
                indent = value_args[2] if len(value_args) > 2 else kwargs.get("indent")
                estimate = 0 if not isinstance(indent, int) or indent <= 16 else budget.size + 1
            else:
                estimate = _estimate_call(name, value_args[0], value_args[1:], kwargs)
            if estimate is not None:
                budget.check_size(estimate, f"the {name} filter")
        return budget.charge(f(*args, **kwargs), f"the {name} filter")

    return run


def _counted(iterable):
    """A loop's items, each one a step of the budget."""
    budget = _BUDGET.get()
    for item in iterable:
        if budget is not None:
            budget.step()
        yield item


def _range(*args):
    r = range(*args)
    budget = _BUDGET.get()
    if budget is not None:
        budget.range_items += len(r)
        if budget.range_items > budget.limits.range_items:
            raise TemplateLimitError(f"{budget.limits.range_items} items of range() in all")
    return r


def _sized(value):
    # The result of a `~` or a slice (see _wrap_sized).
    budget = _BUDGET.get()
    return value if budget is None else budget.charge(value, "~ or a slice")


def _printable(value):
    # What is about to become text: an operand of `~` (see _wrap_sized).
    budget = _BUDGET.get()
    if budget is not None and not isinstance(value, str):
        budget.check_printed(value, "~")
    return value


def _emitted(value):
    # Each piece of output, also inside `{% set %}` blocks and macros, whose pieces are joined later: its printed
    # size counts toward the one-value and total limits (see _wrap_sized).
    budget = _BUDGET.get()
    if budget is not None:
        budget.allocated += budget.check_printed(value, "output")
        if budget.allocated > budget.allocation:
            raise TemplateLimitError(f"{budget.allocation} characters computed in all")
    return value


class _Sandbox(ImmutableSandboxedEnvironment):
    # Jinja's sandbox answers an unsafe attribute (`''.__class__`) with an Undefined that only fails when used
    # further; fail at once instead, so probing a template is always an error and never a silent empty string.
    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")

    # Operators that can make huge values from small ones: checked before they run.
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, op, left, right):
        budget = _BUDGET.get()
        if budget is None:
            return super().call_binop(context, op, left, right)
        budget.step()
        is_int = lambda v: isinstance(v, int)  # noqa: E731 - bool too
        if op == "*":
            if is_int(left) and is_int(right):
                budget.check_size((left.bit_length() + right.bit_length()) // 8, "*")
            elif is_int(right) or is_int(left):
                count, seq = (right, left) if is_int(right) else (left, right)
                budget.check_size(_size(seq) * max(count, 0), "*")
        elif op == "**" and is_int(left) and is_int(right) and right > 0 and abs(left) > 1:
            budget.check_size(left.bit_length() * right // 8, "**")
        elif op == "+" and not (is_int(left) or isinstance(left, float)):
            budget.check_size(_size(left) + _size(right), "+")
        elif op == "%" and isinstance(left, str):
            values = right if isinstance(right, tuple) else (right,)
            budget.check_size(_format_estimate(left, values), "%")
        return budget.charge(super().call_binop(context, op, left, right), op)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - the sandbox's own signature
        budget = _BUDGET.get()
        if budget is None:
            return super().call(__context, __obj, *args, **kwargs)
        budget.step()
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        estimate = _estimate_call(getattr(target, "__name__", ""), getattr(target, "__self__", None), args, kwargs)
        if estimate is not None:
            budget.check_size(estimate, f"{target.__name__}()")
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level: its items count too
            args = (_counted(args[0]), *args[1:])
        nested = isinstance(__obj, (Macro, LoopContext))
        if nested:
            budget.depth += 1
            if budget.depth > budget.limits.depth:
                raise TemplateLimitError(f"a depth of {budget.limits.depth} nested macro calls")
        try:
            return budget.charge(super().call(__context, __obj, *args, **kwargs), "a call")
        finally:
            if nested:
                budget.depth -= 1


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
        range=_range,
        _r1_counted=_counted,
        _r1_sized=_sized,
        _r1_printable=_printable,
        _r1_emitted=_emitted,
    )
    env.filters = {name: _budgeted_filter(name, f) for name, f in env.filters.items()}
    tree = env.parse(template)
    # Every loop's items, `~` result and slice go through the budget: jinja's sandbox has no hook for them.
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Call(nodes.Name("_r1_counted", "load"), [loop.iter], [], None, None)
    _wrap_sized(tree)
    # Jinja folds constant expressions while compiling (filters included): under a budget, so a fold that would
    # cross a limit is left to the render, which then stops.
    token = _BUDGET.set(_Budget(LIMITS, 0))
    try:
        return env.from_string(tree)
    finally:
        _BUDGET.reset(token)


def _wrap_sized(tree: nodes.Template) -> None:
    """Put every `~` (Concat) and every slice `x[a:b]` (which jinja compiles without the sandbox's getitem) inside
    a call of _r1_sized, each operand of a `~` inside _r1_printable, and each piece of output inside _r1_emitted."""
    call = lambda fn, node: nodes.Call(nodes.Name(fn, "load"), [node], [], None, None)  # noqa: E731
    sized = lambda v: isinstance(v, nodes.Concat) or (isinstance(v, nodes.Getitem) and isinstance(v.arg, nodes.Slice))  # noqa: E731
    every = [tree, *tree.find_all(nodes.Node)]  # before any change
    for node in every:
        if isinstance(node, nodes.Concat):
            node.nodes = [call("_r1_printable", v) for v in node.nodes]
        elif isinstance(node, nodes.Output):
            node.nodes = [call("_r1_emitted", nodes.Const(v.data) if isinstance(v, nodes.TemplateData) else v)
                          for v in node.nodes]
    for parent in every:
        for name in parent.fields:
            value = getattr(parent, name, None)
            if sized(value):
                setattr(parent, name, call("_r1_sized", value))
            elif isinstance(value, list):
                value[:] = [call("_r1_sized", v) if sized(v) else v for v in value]


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


def _render_bounded(template: jinja2.Template, context: dict, limits: RenderLimits | None = None) -> str:
    """template.render(context) within `limits` (default LIMITS): the output counts toward the size limit."""
    budget = _Budget(limits or LIMITS, _input_size(context))
    token = _BUDGET.set(budget)
    try:
        parts, length = [], 0
        for part in template.generate(context):
            length += len(part)
            if length > budget.size:
                raise TemplateLimitError(f"{budget.size} characters of output")
            parts.append(part)
        return "".join(parts)
    finally:
        _BUDGET.reset(token)


def render_prompt(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render `messages` with the model's chat template exactly as transformers' apply_chat_template does."""
    if tokenizer.chat_template is None:
        return _fallback_prompt(tokenizer, messages, add_generation_prompt)
    variables = {**tokenizer.special_tokens, "tools": None, "documents": None}
    try:
        template = _compile(tokenizer.chat_template)
        context = dict(messages=_template_messages(messages), add_generation_prompt=add_generation_prompt,
                       **_plain(variables))
        return _render_bounded(template, context)
    except TemplateLimitError as e:
        raise CheckpointError(f"the chat template of this model exceeded {e} and was stopped: "
                              f"a template from a model repo may not loop, recurse or allocate without bound") from None
    except (MemoryError, OverflowError, RecursionError) as e:
        raise CheckpointError(f"the chat template of this model exceeded what it may compute and was stopped "
                              f"({type(e).__name__}{': ' + str(e) if str(e) else ''})") from None
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
    defaults (sampling.generation_defaults) and `r1 show` all follow it."""
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
