"""Issue #14: chat templates, the chat REPL and the command line as attack surface.

Templates come from untrusted model repos: each hostile one must stop with one clear CheckpointError, within a
few seconds and without allocating much. /save must never replace anything but a regular file, /set and the
command line share one set of sampling rules, a prompt must be valid UTF-8, and a device that is not there is a
usage error, all before the model loads."""

from __future__ import annotations

import copy
import time
import tracemalloc

import pytest

from r1cli.chat_format import render_prompt
from r1cli.errors import CheckpointError
from r1cli.tokenizer import Tokenizer

from paths import R1_TOKENIZER


@pytest.fixture(scope="module")
def r1_tok():
    return Tokenizer.from_folder(R1_TOKENIZER)


def _with_template(tok, template):
    other = copy.copy(tok)
    other.chat_template = template
    return other


# --- chat templates --------------------------------------------------------------------------------------------

BIG = "{% set s = 'x' * 900000 %}"
HOSTILE_TEMPLATES = {
    # the cases
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "string times 3e9": "{{ 'x' * 3000000000 }}",
    "range(10**9)": "{% for i in range(10**9) %}{% endfor %}",
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "string times 10**12": "{{ 'x' * 10**12 }}",
    # other ways to spend time or memory
    "macro fan-out 2**40 calls": "{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
    "power tower": "{{ 10 ** (10 ** 10) }}",
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "doubling with +": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "squaring an int": "{% set ns = namespace(n=10) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "center filter": "{{ 'x'|center(3000000000) }}",
    "str.ljust": "{{ 'x'.ljust(3000000000) }}",
    "printf width": "{{ '%03000000000d' % 1 }}",
    "str.format width": "{{ '{:>3000000000}'.format(1) }}",
    "format filter width": "{{ '%03000000000d'|format(1) }}",
    "replace blow-up": BIG + "{{ s|replace('x', s) }}",
    "join blow-up": BIG + "{{ s|join(s) }}",
    "indent blow-up": "{% set s = '\n' * 900000 %}{{ s|indent(900000) }}",
    "expandtabs blow-up": "{{ ('\t' * 900000).expandtabs(900000) }}",
    "huge output": "{% for i in range(90000) %}{{ 'x' * 900000 }}{% endfor %}",
    "growing list": "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = ns.l + ['x' * 900000 ~ i] %}{% endfor %}",
    "many slices kept": BIG + "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = ns.l + [s[i:]] %}{% endfor %}",
    "busy loop body": BIG + "{% for i in range(100000) %}{% set t = s|replace('x', 'y') %}{% endfor %}",
    "nested loops over a string": BIG + "{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "recursive loop": "{% set l = [[1, 2], [3, 4]] %}{% for x in l recursive %}{{ loop(l) }}{% endfor %}",
    "tojson indent": "{{ messages|tojson(indent=100000000) }}",
}


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
def test_hostile_template_stops_with_one_clear_error_quickly_and_small(r1_tok, name):
    tok = _with_template(r1_tok, HOSTILE_TEMPLATES[name])
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(CheckpointError) as info:
            render_prompt(tok, [{"role": "user", "content": "hi"}])
        seconds = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert info.value.exit_code == 1
    assert message.startswith("the chat template of this model exceeded "), message
    assert "\n" not in message
    assert seconds < 10, seconds  # the wall-clock limit is 5 s; most stop in milliseconds
    assert peak < 300 * 2**20, peak  # the per-value limit is about a million characters, the total 32 times that


def test_templates_that_are_long_but_fine_still_render(r1_tok):
    """The limits grow with the input: R1's own template renders a 2000-turn conversation of 1.2 M characters."""
    messages = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}: " + "hello there " * 50}
                for i in range(2001)]
    text = render_prompt(r1_tok, messages)
    assert text.count("<｜User｜>") == 1001 and "turn 2000: " in text


def test_a_template_within_the_limits_renders_like_transformers(r1_tok):
    """Loops, ranges, slices, filters and string methods the limits watch still give transformers' text."""
    transformers = pytest.importorskip("transformers")
    template = ("{% for i in range(messages|length) %}{% set m = messages[i] %}{{ loop.index }}/{{ loop.length }} "
                "{{ m['role']|center(12) }}{{ m['content'][:5] ~ '|' ~ m['content'][5:]|replace('o', '0') }}"
                "{{ '%-6s|' % m['role'] }}{{ '{:>8}'.format(m['role']) }}{{ ('=' * 3) + '\\n' }}{% endfor %}"
                "{{ messages|map(attribute='role')|join(', ') }}{{ messages|tojson(indent=2) }}")
    messages = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "good morning"}]
    ours = render_prompt(_with_template(r1_tok, template), messages, add_generation_prompt=False)
    folder_tok = transformers.AutoTokenizer.from_pretrained(R1_TOKENIZER)
    theirs = folder_tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert ours == theirs
