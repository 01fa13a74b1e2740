"""Issue #17: model-aware generation defaults (sampling.generation_defaults, the one source for run, chat, serve and
show), the repetition guard (generate.RepetitionGuard, finish_reason "repetition") and --repeat-penalty
(generate.penalize_repeats, against transformers' RepetitionPenaltyLogitsProcessor)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import steered
from paths import R1_TOKENIZER
from r1cli.chat_format import R1_MAX_TOKENS, R1_SAMPLING_DEFAULTS
from r1cli.cli import app
from r1cli.engine import stream_events
from r1cli.events import Done
from r1cli.generate import Decoder, RepetitionGuard, SamplingParams, penalize_repeats
from r1cli.registry import resolve_name
from r1cli.options import ModelOptions
from r1cli.engine import PLAIN_MAX_TOKENS, default_sampling, generation_defaults, open_model
from r1cli.tokenizer import Tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def r1_tok() -> Tokenizer:
    return Tokenizer.from_folder(R1_TOKENIZER)


def plain_tokenizer(generation_config: dict) -> Tokenizer:
    """The R1 vocabulary with a ChatML template: not an R1 model (chat_format.family_for)."""
    tok = Tokenizer.from_folder(R1_TOKENIZER)
    tok.chat_template = CHATML
    tok.generation_config = generation_config
    return tok


def without_source(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "source"}


# --- defaults ------------------------------------------------------------------------------------------------------


def test_r1_models_get_deepseeks_settings(r1_tok):
    r1_tok.generation_config = {}
    d = generation_defaults(r1_tok)
    # DeepSeek's model card: temperature 0.6, top-p 0.95; its evaluation: a maximum generation length of 32,768.
    assert (d["temperature"], d["top_p"], d["max_tokens"], d["repeat_guard"]) == (0.6, 0.95, 32768, True)
    assert SamplingParams(**without_source(d)).temperature == 0.6


def test_an_r1_alias_is_r1_even_before_its_tokenizer_is_read():
    assert without_source(generation_defaults(None, resolve_name("deepseek-r1:7b").alias)) == {
        **R1_SAMPLING_DEFAULTS, "max_tokens": R1_MAX_TOKENS, "repeat_guard": True}
    assert generation_defaults(None, resolve_name("deepseek-v3").alias)["max_tokens"] == PLAIN_MAX_TOKENS


@pytest.mark.parametrize("config", [
    {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},  # Qwen2.5-Instruct
    {"do_sample": True, "temperature": 0.6, "top_p": 0.9},  # Llama-3.1-Instruct
    {"do_sample": True},
    {"do_sample": False, "temperature": 0.7},
    {},  # nothing about sampling: greedy, as transformers decodes
])
def test_other_models_read_generation_config_as_transformers_does(config):
    from transformers import GenerationConfig

    d = generation_defaults(plain_tokenizer({"bos_token_id": 1, "eos_token_id": 2, **config}))
    # The oracle: transformers' GenerationConfig, its values for the keys the file leaves out.
    hf = GenerationConfig(**config)
    fallback = GenerationConfig._get_default_generation_params()
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        want = getattr(hf, key) if getattr(hf, key) is not None else fallback[key]
        if key == "temperature" and not (hf.do_sample if hf.do_sample is not None else fallback["do_sample"]):
            want = 0.0  # greedy
        assert d[key] == want, key
    assert d["max_tokens"] == PLAIN_MAX_TOKENS and d["repeat_guard"] is True
    params = default_sampling(plain_tokenizer(config), top_k=7)
    assert (params.temperature, params.top_k, params.max_tokens) == (d["temperature"], 7, PLAIN_MAX_TOKENS)


def test_a_temperature_without_do_sample_means_sampling():
    d = generation_defaults(plain_tokenizer({"temperature": 0.9}))
    assert (d["temperature"], d["top_p"], d["top_k"]) == (0.9, 1.0, 50)


@pytest.fixture(scope="module")
def plain_dir(steered_dir, tmp_path_factory) -> Path:
    """The steered checkpoint with a ChatML template and no sampling in generation_config.json: a plain model."""
    folder = tmp_path_factory.mktemp("plain")
    for f in steered_dir.iterdir():
        shutil.copy(f, folder / f.name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": steered.EOS}))
    return folder


@pytest.mark.parametrize("which", ["steered_dir", "plain_dir"])
def test_show_prints_the_defaults_run_uses(which, request):
    folder = request.getfixturevalue(which)
    shown = CliRunner().invoke(app, ["show", str(folder), "--json"])
    assert shown.exit_code == 0, shown.output
    sampling = json.loads(shown.stdout)["sampling"]
    m = open_model(ModelOptions(str(folder), device="cpu"))
    assert sampling == m.defaults
    params = m.sampling({})
    assert {k: getattr(params, k) for k in without_source(sampling)} == without_source(sampling)
    assert params.max_tokens == (R1_MAX_TOKENS if which == "steered_dir" else PLAIN_MAX_TOKENS)
    text = CliRunner().invoke(app, ["show", str(folder)]).stdout
    line = next(x for x in text.splitlines() if x.startswith("sampling"))
    assert f"max_tokens {params.max_tokens}" in line and "repetition guard on" in line


# --- the guard -----------------------------------------------------------------------------------------------------


def loops_by_definition(ids: list[int], max_period: int = 256, min_span: int = 1024) -> int | None:
    """The guard's rule written out plainly (no incremental state): the first index n at which the last `min_span`
    tokens repeat exactly with some period p <= max_period, each equal to the one p before it (the window equals
    itself shifted by p)."""
    assert max_period < min_span
    for n in range(min_span - 1, len(ids)):
        start = n - min_span + 1  # the window: ids[start:n + 1]
        for p in range(1, max_period + 1):
            # its last and first pairs first: a cheap no for most p before the whole comparison
            if ids[n] == ids[n - p] and ids[start] == ids[start + p] and ids[start + p:n + 1] == ids[start:n + 1 - p]:
                return n
    return None


def first_trip(ids: list[int], **kw) -> int | None:
    guard = RepetitionGuard(**kw)
    return next((i for i, t in enumerate(ids) if guard.add(t)), None)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=0, max_size=40), st.lists(st.integers(0, 3), min_size=1, max_size=12),
       st.integers(0, 40), st.lists(st.integers(0, 3), max_size=20))
def test_the_incremental_guard_follows_its_rule(head, cycle, turns, tail):
    ids = head + cycle * turns + tail
    assert first_trip(ids, max_period=8, min_span=24) == loops_by_definition(ids, max_period=8, min_span=24)


def test_a_loop_trips_the_guard_and_lists_tables_and_code_do_not(r1_tok):
    loop = r1_tok.encode("Paris est la capitale de la France, les Français, " + "les Français, " * 400)
    n = first_trip(loop)
    assert n is not None and n == loops_by_definition(loop)
    assert n < 1100  # about 1024 tokens into the loop, not thousands

    legit = {
        "numbered list": "\n".join(f"{i}. Item number {i}" for i in range(1, 600)),
        "markdown table": "| n | square | mod 7 |\n|---|---|---|\n" + "\n".join(f"| {i} | {i * i} | {i % 7} |" for i in range(300)),
        "code": "\n".join(f"    x{i} = compute(x{i - 1}, {i})  # step {i}" for i in range(1, 250)),
        "a row of zeros": "[" + ", ".join(["0"] * 300) + "]",  # an exact repeat, but shorter than 1024 tokens
    }
    for name, text in legit.items():
        ids = r1_tok.encode(text)
        assert len(ids) > 800, name
        assert first_trip(ids) is None, name
        assert loops_by_definition(ids) is None, name


def test_the_guard_keeps_a_bounded_state():
    guard = RepetitionGuard()
    for i in range(20000):
        guard.add(i * 7919 % 5000)
    assert len(guard.window) == guard.max_period and sum(map(len, guard.positions.values())) == guard.max_period
    assert len(guard.runs) <= guard.max_period


def test_a_looping_model_stops_with_finish_reason_repetition(looping_dir):
    result = CliRunner().invoke(app, ["run", str(looping_dir), "--json", "hi"])
    assert result.exit_code == 6, result.output
    data = json.loads(result.stdout)
    assert data["finish_reason"] == "repetition"
    loop_len = len(Tokenizer.from_folder(looping_dir).encode(steered.LOOP))
    # Stopped at the first token that makes 1024 in the cycle (not yielded, like a stop token).
    assert data["usage"]["completion_tokens"] == 1023
    assert loop_len == 3 and data["reasoning"].strip() == (steered.LOOP * (1023 // 3)).strip()
    notice = [line for line in result.stderr.splitlines() if line.startswith("r1: ")]
    assert notice == ["r1: stopped: the output was repeating itself in a loop after 1023 tokens (--repeat-penalty "
                      "1.1 makes repeats less likely; --no-repeat-guard lets it run)"]


def test_no_repeat_guard_lets_it_run(looping_dir):
    result = CliRunner().invoke(app, ["run", str(looping_dir), "--json", "--no-repeat-guard", "--max-tokens", "1200", "hi"])
    assert result.exit_code == 4, result.output  # stopped while thinking, at max_tokens
    data = json.loads(result.stdout)
    assert data["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 1200


class ScriptedLM(torch.nn.Module):
    """Stands in for a CausalLM in the Decoder: after any prompt it emits `script`, one token per step."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab, self.prompt_len = script, vocab, 0
        self.model = SimpleNamespace(embed_tokens=SimpleNamespace(weight=torch.zeros(1)))
        self.args = SimpleNamespace(max_seq_len=16384)

    def new_cache(self, batch_size, max_len):
        return object()

    def ensure_rope(self, n):
        pass

    def forward(self, tokens, start_pos=0, cache=None, last_only=True):
        i = start_pos + tokens.shape[1] - self.prompt_len  # how many scripted tokens came before this step's
        logits = torch.full((1, 1, self.vocab), -1e4)
        logits[0, 0, self.script[i] if i < len(self.script) else steered.EOS] = 0.0
        return logits


def scripted_reply(tokenizer: Tokenizer, script: list[int], params: SamplingParams):
    from r1cli.chat_format import build_prompt

    model = ScriptedLM(script, 151936)
    prompt = build_prompt(tokenizer, [{"role": "user", "content": "List them."}], family="plain")
    model.prompt_len = len(prompt.ids)
    events = list(stream_events(Decoder(model), tokenizer, prompt, params))
    assert isinstance(events[-1], Done)
    return events[-1].stats


def test_a_long_legitimate_list_is_generated_to_the_end():
    tok = plain_tokenizer({})
    text = "\n".join(f"{i}. Step {i}: add {i} to the total" for i in range(1, 300))
    script = tok.encode(text)
    assert len(script) > 3000
    stats = scripted_reply(tok, script, SamplingParams(temperature=0, max_tokens=8000))
    assert stats.finish_reason == "stop" and stats.content == text

    looping = tok.encode(text[:200] + " and so on," * 600)
    stats = scripted_reply(tok, looping, SamplingParams(temperature=0, max_tokens=8000))
    assert stats.finish_reason == "repetition" and stats.completion_tokens < 1200


# --- serve ---------------------------------------------------------------------------------------------------------


def test_serve_answers_finish_reason_repetition(looping_dir):
    from openai import OpenAI
    from starlette.testclient import TestClient

    from r1cli.serve import Server

    m = open_model(ModelOptions(str(looping_dir), device="cpu"))
    with TestClient(Server(m).app) as http:
        client = OpenAI(api_key="none", base_url="http://testserver/v1", http_client=http)
        reply = client.chat.completions.create(model="deepseek-reasoner", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].finish_reason == "repetition"
        assert reply.usage.completion_tokens == 1023
        chunks = list(client.chat.completions.create(model="deepseek-reasoner", stream=True,
                                                     messages=[{"role": "user", "content": "hi"}]))
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["repetition"]


# --- repeat penalty ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repeat_penalty_matches_transformers(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1000, generator=g) * 5
    ids = torch.randint(0, 1000, (1, 300), generator=g)  # with repeats
    seen = torch.zeros(1000, dtype=torch.bool)
    seen[ids[0]] = True
    want = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    got = penalize_repeats(logits, seen, penalty)
    assert torch.equal(got, want)
    assert not torch.equal(got, logits)


def test_greedy_with_a_repeat_penalty_matches_transformers_generate(tmp_path):
    from tiny import hf_model, qwen2_config, write_checkpoint

    from r1cli.loader import load_model

    write_checkpoint(qwen2_config(), tmp_path)
    ref, ours = hf_model(tmp_path), load_model(tmp_path, dtype="float32")
    prompt = [5, 17, 42, 99, 3, 250, 8, 5, 17]
    outputs = {}
    for penalty in (1.0, 1.5):
        with torch.no_grad():
            want = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                repetition_penalty=penalty)[0, len(prompt):].tolist()
        got = list(Decoder(ours, max_len=128).generate(
            prompt, SamplingParams(temperature=0, max_tokens=32, repetition_penalty=penalty)))
        assert got == want, penalty
        outputs[penalty] = got
    assert outputs[1.0] != outputs[1.5]  # the penalty changed the reply


def test_repeat_flags_reach_the_sampling_params(looping_dir):
    from r1cli.cli import _sampling
    from r1cli.errors import UsageError

    bad = CliRunner().invoke(app, ["run", str(looping_dir), "--repeat-penalty", "0", "hi"])
    assert isinstance(bad.exception, UsageError) and "--repeat-penalty must be above 0" in str(bad.exception)
    m = open_model(ModelOptions(str(looping_dir), device="cpu"))
    params = m.sampling(_sampling(None, None, None, None, None, None, 1.5, True))
    assert (params.repetition_penalty, params.repeat_guard) == (1.5, False)
    params = m.sampling(_sampling(None, None, None, None, None, None))
    assert (params.repetition_penalty, params.repeat_guard) == (1.0, True)


# --- chat ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_chat_says_the_reply_looped_and_goes_on(looping_dir, tmp_path):
    import pexpect

    from helpers import r1_env

    child = pexpect.spawn(sys.executable, ["-m", "r1cli", "chat", str(looping_dir), "--no-history"],
                          env={**r1_env(tmp_path), "TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1"},
                          dimensions=(40, 120), encoding="utf-8", timeout=120, cwd=str(tmp_path))
    try:
        child.expect(">>>")
        child.send("hi\r")
        child.expect(r"\[stopped: the reply was repeating itself in a loop")
        child.expect("1023 tokens")  # the footer counts what was kept
        child.expect(">>>")
        child.send("/set repetition_penalty 1.2\r")
        child.expect("repetition_penalty = 1.2")
        child.send("/exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


# --- tensor parallel -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_stop_the_loop_at_the_same_step(looping_dir):
    """Every rank runs the guard on the same broadcast tokens, so all end the turn together (no rank left waiting
    in a collective): rank 0 reports the repetition, and both exit with its code."""
    import socket
    import subprocess

    from helpers import r1_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "r1cli", "run", str(looping_dir), "--device", "cpu", "--json",
                               "hi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              env=r1_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                                         R1_DIST_TIMEOUT="60"))
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [6, 6], outs[0][1].decode()[-3000:]
    data = json.loads(outs[0][0])
    assert data["finish_reason"] == "repetition" and data["usage"]["completion_tokens"] == 1023
