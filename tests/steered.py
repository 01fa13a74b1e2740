"""Tiny Qwen2 checkpoints with the real R1 tokenizer that emit a chosen token sequence, for deterministic tests.

The trick: with o_proj and down_proj zeroed, attention and MLP add nothing to the residual stream, so the hidden
state at the last position is just the embedding of the last token. Each token of the chain gets its own
one-hot direction in the embedding, and the lm_head row of the token that should follow it points the same way:
the model is a lookup table "token -> next token", a bigram chain. The chain's tokens must be distinct (a token
has one successor), and there are at most hidden_size of them. A chain may end in a cycle (a model that thinks
forever) or in eos.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tiny import qwen2_config

NEWLINE = 198  # the last prompt token: R1 prompts end with "<think>\n"
THINK_END, EOS = 151649, 151643
REASONING = "Let me count the apples carefully."
ANSWER = "There are *three* pears!"
LOOP = " think more and"  # the looping model's reasoning, repeated until max_tokens or the context ends


def r1_tokenizer_dir() -> Path:
    from paths import R1_TOKENIZER

    return R1_TOKENIZER


def chain_ids(tokenizer_dir: Path, reasoning: str = REASONING, answer: str = ANSWER) -> list[int]:
    """The token ids the steered model emits after the prompt: reasoning, </think>, blank line, answer, eos."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    return enc(reasoning) + [THINK_END] + enc("\n\n") + enc(answer) + [EOS]


def write_steered(folder: Path, tokenizer_dir: Path, emitted: list[int], loop_to: int | None = None,
                  hidden_size: int = 64, max_positions: int = 32768) -> Path:
    """Write a checkpoint that, after a prompt ending in "\\n", emits `emitted`; then, if loop_to is given, jumps
    back to emitted[loop_to] forever (the last emitted token's successor), else stops at emitted's final eos."""
    from transformers import AutoModelForCausalLM

    chain = [NEWLINE] + emitted
    states = chain if loop_to is not None else chain[:-1]  # tokens that need a successor
    assert len(set(states)) == len(states), "the chain's tokens must be distinct"
    assert len(states) <= hidden_size
    config = qwen2_config(vocab_size=151936, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        for k, token in enumerate(states):
            nxt = chain[k + 1] if k + 1 < len(chain) else emitted[loop_to]
            emb[token, k] = 1.0
            head[nxt, k] = 30.0  # after the final norm the direction has norm sqrt(hidden): a margin of ~240
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, Path(folder) / name)
    # Greedy by default (do_sample false, honoured like transformers does): fast, and deterministic anyway.
    generation_config = {"bos_token_id": 151646, "eos_token_id": EOS, "do_sample": False}
    (Path(folder) / "generation_config.json").write_text(json.dumps(generation_config))
    return Path(folder)
