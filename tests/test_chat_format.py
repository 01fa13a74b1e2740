import copy
import json
import shutil

import pytest

from r1cli.chat_format import answer_only, build_prompt, family_for, render_prompt
from r1cli.errors import R1Error
from r1cli.tokenizer import Tokenizer

from paths import R1_TOKENIZER as FIXTURE

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
ORIGINAL_ENDING = "{{'<｜Assistant｜>'}}{% endif %}"
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ONE_TURN = [{"role": "user", "content": "What is 2+2? 你好 🤖"}]
SEVERAL_TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nEasy: 2+2=4.\n</think>\n\nIt is **4**."},
    {"role": "user", "content": "And 3+3?"},
]
WITH_SYSTEM = [{"role": "system", "content": "Answer in French."}, *SEVERAL_TURNS]
WITH_REASONING_KEY = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
    {"role": "user", "content": "bye"},
]
WITH_TOOL_OUTPUT = [
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": "calling"},
    {"role": "tool", "content": '{"temp": 21}'},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_folder(FIXTURE)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """transformers' tokenizer for the fixture, with the chat template replaced when one is given."""
    transformers = pytest.importorskip("transformers")
    cache = {}

    def load(template=None):
        if template not in cache:
            folder = tmp_path_factory.mktemp("oracle")
            shutil.copy(FIXTURE / "tokenizer.json", folder)
            config = json.loads((FIXTURE / "tokenizer_config.json").read_text())
            if template is not None:
                config["chat_template"] = template
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
            cache[template] = transformers.AutoTokenizer.from_pretrained(folder)
        return cache[template]

    return load


def with_template(tok, template):
    other = copy.copy(tok)
    other.chat_template = template
    return other


def later_revision(tok):
    # The later Hub revision of the R1 template ends its generation prompt inside the reasoning.
    assert tok.chat_template.endswith(ORIGINAL_ENDING)
    return tok.chat_template[: -len(ORIGINAL_ENDING)] + "{{'<｜Assistant｜><think>\\n'}}{% endif %}"


def assert_same_as_transformers(tok, reference, messages, add_generation_prompt=True):
    text = render_prompt(tok, messages, add_generation_prompt=add_generation_prompt)
    expected = reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == expected
    expected_ids = reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    expected_ids = expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids
    assert tok.encode(text) == expected_ids
    return text


# --- render_prompt is transformers' apply_chat_template ---------------------------------------------------------


@pytest.mark.parametrize("messages", [ONE_TURN, SEVERAL_TURNS, WITH_SYSTEM, WITH_REASONING_KEY, WITH_TOOL_OUTPUT])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(tok, oracle, messages, add_generation_prompt):
    text = assert_same_as_transformers(tok, oracle(), messages, add_generation_prompt)
    assert text.startswith(BOS) and not text.startswith(BOS * 2)


def test_render_several_turns_text(tok):
    assert render_prompt(tok, SEVERAL_TURNS) == (
        f"{BOS}<｜User｜>What is 2+2?<｜Assistant｜>\n\nIt is **4**.{EOS}<｜User｜>And 3+3?<｜Assistant｜>"
    )


def test_render_later_revision_matches_transformers(tok, oracle):
    template = later_revision(tok)
    text = assert_same_as_transformers(with_template(tok, template), oracle(template), SEVERAL_TURNS)
    assert text.endswith("<｜Assistant｜><think>\n")


def test_render_plain_template_matches_transformers(tok, oracle):
    smol = with_template(tok, SMOLLM2_TEMPLATE)
    assert_same_as_transformers(smol, oracle(SMOLLM2_TEMPLATE), ONE_TURN)
    assert_same_as_transformers(smol, oracle(SMOLLM2_TEMPLATE), WITH_SYSTEM)


def test_template_helpers_match_transformers(tok, oracle):
    template = (
        "{% for m in messages %}\n  {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "{{ m | tojson }}|{{ {'k': m.content} | tojson(indent=1) }}|{{ bos_token }}{{ eos_token }}{{ pad_token }}\n"
        "{% endfor %}{% set d = dict(a=1) %}{{ d.a }}{% set ns = namespace(n=0) %}{% set ns.n = 5 %}{{ ns.n }}"
        "{{ strftime_now('%Y') | length }}{% if add_generation_prompt %}GEN{% endif %}{{ tools is none }}"
    )
    messages = [{"role": "user", "content": "<b>é</b> \"q\""}, {"role": "assistant", "content": "x"}, ONE_TURN[0]]
    text = assert_same_as_transformers(with_template(tok, template), oracle(template), messages)
    assert '"<b>é</b> \\"q\\""' in text and "GEN" in text  # no HTML escaping, no ASCII escaping


# --- build_prompt: DeepSeek's R1 rules --------------------------------------------------------------------------


def test_build_forces_think_with_the_original_template(tok):
    build = build_prompt(tok, ONE_TURN)
    assert build.text == render_prompt(tok, ONE_TURN) + "<think>\n"
    assert build.ids == tok.encode(build.text) and build.ids[-2:] == [151648, 198]
    assert build.ids[0] == 151646 and build.ids[1] != 151646  # exactly one bos
    assert build.starts_in_thinking and build.notices == []


def test_build_does_not_double_think_with_the_later_template(tok):
    later = with_template(tok, later_revision(tok))
    build = build_prompt(later, ONE_TURN)
    assert build.text == render_prompt(later, ONE_TURN)
    assert build.text.endswith("<｜Assistant｜><think>\n") and build.text.count("<think>") == 1
    assert build.starts_in_thinking


def test_build_moves_system_text_into_the_first_user_message(tok):
    build = build_prompt(tok, WITH_SYSTEM, system="Be brief.")
    assert build.text.startswith(f"{BOS}<｜User｜>Answer in French.\n\nBe brief.\n\nWhat is 2+2?<｜Assistant｜>")
    assert build.text.count("<｜User｜>") == 2 and "Be brief." not in build.text.split("<｜User｜>")[2]
    assert len(build.notices) == 1 and "system" in build.notices[0] and "\n" not in build.notices[0]
    # The system text alone, with no user message yet, becomes the user message.
    assert build_prompt(tok, [], system="Hi").text == f"{BOS}<｜User｜>Hi<｜Assistant｜><think>\n"


def test_build_never_sends_reasoning_back(tok):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>\nsecret 1\n</think>\n\nanswer 1"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "answer 2", "reasoning": "secret 2", "reasoning_content": "secret 3"},
        {"role": "user", "content": "c"},
    ]
    template = "{% for m in messages %}{{ m.role }}:{{ m.content }}|{{ m.reasoning_content }}|{{ m.thinking }}\n{% endfor %}"
    for tokenizer in (tok, with_template(tok, template), with_template(tok, later_revision(tok))):
        text = build_prompt(tokenizer, messages).text
        assert "secret" not in text and "answer 1" in text and "answer 2" in text
    assert "<｜Assistant｜>answer 1" + EOS in build_prompt(tok, messages).text
    assert messages[1]["content"].startswith("<think>")  # the caller's messages are not changed


def test_answer_only():
    assert answer_only("<think>\nr\n</think>\n\nThe answer") == "The answer"
    assert answer_only("r</think>a</think>b") == "a</think>b"  # the first close wins
    assert answer_only("no reasoning here") == "no reasoning here"


def test_plain_family_keeps_system_and_does_not_think(tok):
    smol = with_template(tok, SMOLLM2_TEMPLATE)
    assert family_for(smol) == "plain"
    build = build_prompt(smol, ONE_TURN, system="You are terse.", family="plain")
    assert build.text == render_prompt(smol, [{"role": "system", "content": "You are terse."}, *ONE_TURN])
    assert not build.starts_in_thinking and "<think>" not in build.text and build.notices == []
    assert build_prompt(smol, WITH_SYSTEM, family="plain").text == render_prompt(smol, WITH_SYSTEM)


def test_family_for(tok):
    assert family_for(tok) == "r1"
    assert family_for(with_template(tok, later_revision(tok))) == "r1"
    assert family_for(with_template(tok, None)) == "plain"
    no_think = copy.copy(tok)
    no_think.think_start_id = None
    assert family_for(no_think) == "plain"


def test_no_chat_template_falls_back_with_a_notice(tok):
    bare = with_template(tok, None)
    build = build_prompt(bare, SEVERAL_TURNS, family="plain")
    assert build.text == f"{BOS}User: What is 2+2?\n\nAssistant: {SEVERAL_TURNS[1]['content']}\n\nUser: And 3+3?\n\nAssistant:"
    assert len(build.notices) == 1 and "no chat template" in build.notices[0]
    assert build.ids.count(151646) == 1


# --- the sandbox --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ ''['__class__'] }}",
        "{{ messages.append(1) }}",
        "{% set ns = namespace(_private=1) %}",
        "{{ dict.__class__ }}",
    ],
)
def test_sandbox_stops_escapes_with_a_clean_error(tok, template):
    with pytest.raises(R1Error, match="unsafe|cannot set"):
        render_prompt(with_template(tok, template), ONE_TURN)


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ raise_exception('Only user and assistant roles are supported') }}", "Only user and assistant roles"),
        ("{% for %}", "chat template failed"),
        ("{{ messages[0]['content'] + 1 }}", "chat template failed"),
    ],
)
def test_template_errors_are_r1_errors(tok, template, message):
    with pytest.raises(R1Error, match=message):
        render_prompt(with_template(tok, template), ONE_TURN)
