"""Our models against transformers (the oracle) on tiny random checkpoints, in float32."""

from __future__ import annotations

import pytest
import torch

from r1cli.generate import Decoder, SamplingParams
from r1cli.loader import load_model
from tiny import hf_model, llama_config, qwen2_config, v2_config, v3_config, write_checkpoint

VARIANTS = {
    "llama-llama3-scaling": lambda: llama_config(),
    "llama-tied": lambda: llama_config(tie_word_embeddings=True, rope_scaling=None),
    "qwen2-biases": lambda: qwen2_config(),
    "qwen2-sliding-window": lambda: qwen2_config(use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "v3-qlora-groups-yarn": lambda: v3_config(),
    "v3-two-dense-layers": lambda: v3_config(first_k_dense_replace=2, n_group=8, topk_group=3, num_experts_per_tok=2),
    "v2-greedy-no-qlora": lambda: v2_config(),
    "v2-group-limited": lambda: v2_config(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                          routed_scaling_factor=1.5),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    # Half the variants keep transformers 5's config layout, half get the Hub's (rope_theta / rope_scaling).
    hub_layout = sorted(VARIANTS).index(request.param) % 2 == 0
    write_checkpoint(VARIANTS[request.param](), folder, hub_layout=hub_layout)
    return request.param, folder, hf_model(folder), load_model(folder, dtype="float32")


def test_logits_match_transformers(checkpoint):
    _, _, ref, ours = checkpoint
    tokens = torch.randint(0, ref.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(tokens).logits
        got = ours(tokens)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


def test_greedy_tokens_through_cache_match_generate(checkpoint):
    _, _, ref, ours = checkpoint
    prompt = [5, 17, 42, 99, 3, 250, 8]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(prompt):]
    gen = Decoder(ours, max_len=128)
    got = list(gen.generate(prompt, SamplingParams(temperature=0, max_tokens=32)))
    assert got == want.tolist()


def test_prefill_continues_on_a_warm_cache(checkpoint):
    """A prompt prefilled in chunks (a conversation continuing at start_pos > 0) gives the full forward's logits."""
    _, _, ref, ours = checkpoint
    tokens = torch.randint(0, ref.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(tokens)
        cache = ours.new_cache(1, 64)
        parts = [ours(tokens[:, a:b], start_pos=a, cache=cache) for a, b in [(0, 9), (9, 10), (10, 24)]]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-4


def test_left_padded_batch_matches_transformers(checkpoint):
    name, _, ref, ours = checkpoint
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, ref.config.vocab_size, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    with torch.no_grad():
        want = ref.generate(tokens, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, 12:]
        cache = ours.new_cache(3, 32)
        logits = ours(tokens, cache=cache, padding_mask=mask.bool())
        # Logits at real positions agree with transformers' forward on the same padded batch.
        ref_logits = ref(tokens, attention_mask=mask).logits
        assert (logits - ref_logits)[mask.bool()].abs().max().item() <= 1e-4
        got, pos = [], 12
        nxt = logits[:, -1].argmax(-1)
        for _ in range(8):
            got.append(nxt)
            nxt = ours(nxt[:, None], start_pos=pos, cache=cache)[:, -1].argmax(-1)
            pos += 1
    assert torch.stack(got, dim=1).tolist() == want.tolist()
