"""On a GPU: speculative decoding's verify captured as CUDA graphs, one per (k+1, bucket), gives the eager verify's
logits, and speculative greedy decoding with graphs (the verify, a draft model's steps, DeepSeek's MTP layer's
steps) gives plain greedy decoding's tokens. Random weights in the real shapes (2 layers; R1 with 32 routed
experts so that float32 fits), float32 so that no bf16 tie can part them. Skipped without CUDA; run by
`python benchmarks/run.py gpu-checks` (and first in `benchmarks/run.py gpu`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from paths import HUB_CONFIGS

from r1cli.bench import random_model
from r1cli.config import args_from_dict, read_config_json
from r1cli.generate import Decoder, SamplingParams
from r1cli.speculative import ModelDraft, MTPDraft, SpeculativeDecoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


def shapes(name: str):
    cfg = dict(read_config_json(HUB_CONFIGS / name), num_hidden_layers=2)
    if name == "DeepSeek-R1":
        cfg["first_k_dense_replace"] = 1  # one dense layer, one MoE layer
    args = args_from_dict(cfg)
    if name == "DeepSeek-R1":
        args = dataclasses.replace(args, n_routed_experts=32)  # 8 groups of 4, 4 groups kept, 8 experts a token
    return args


@pytest.fixture(scope="module", params=["DeepSeek-R1-Distill-Qwen-1.5B", "DeepSeek-V2-Lite", "DeepSeek-R1"])
def model(request):
    model = random_model(shapes(request.param), CUDA, torch.float32, mtp=request.param == "DeepSeek-R1")
    yield model
    del model
    torch.cuda.empty_cache()


@torch.inference_mode()
def test_graph_captured_verify_gives_the_eager_verify_logits(model):
    vocab = model.args.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, 40), generator=g).to(CUDA)
    graph = Decoder(model, max_len=128, decode_mode="graph")
    cache = graph._ensure_cache()
    eager = model.new_cache(1, 128)
    model(prompt, cache=cache)
    model(prompt, cache=eager)
    # a verify of 5 tokens, then (2 kept) one of 5 from there: a new shape captured, then replayed with new inputs;
    # then a verify of 3 (another shape)
    pos = 40
    for T, keep in ((5, 2), (5, 5), (3, 0)):
        feed = torch.randint(0, vocab, (1, T), generator=g).to(CUDA)
        got = graph._decode(feed, pos).clone()
        want = model(feed, start_pos=pos, cache=eager)[0]
        assert got.shape == want.shape == (T, vocab)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        pos += keep
    assert graph._step.use_graphs and {key[0] for key in graph._step.graphs} == {5, 3}


PARAMS = SamplingParams(temperature=0, max_tokens=24)


@torch.inference_mode()
def test_speculative_greedy_with_graphs_is_plain_greedy(model):
    vocab = model.args.vocab_size
    prompt = torch.randint(0, vocab, (35,), generator=torch.Generator().manual_seed(1)).tolist()
    want = list(Decoder(model, max_len=128, decode_mode="eager").generate(prompt, PARAMS))
    assert len(want) == 24
    # the target as its own draft (every draft accepted: long verifies), then another random model of one layer
    # (rejections: the caches roll back), then the MTP layer where there is one
    other = random_model(dataclasses.replace(model.args, n_layers=1), CUDA, torch.float32, seed=1)
    drafts = [ModelDraft(model, 128), ModelDraft(other, 128)]
    if getattr(model, "mtp", None) is not None:
        drafts.append(MTPDraft(model, 128))
    for draft in drafts:
        spec = SpeculativeDecoder(Decoder(model, max_len=128, decode_mode="graph"), draft, max_k=4, adaptive=False)
        assert spec.static
        got = list(spec.generate(prompt, PARAMS))
        assert got == want, type(draft).__name__
        assert spec.target._step.use_graphs and any(key[0] > 1 for key in spec.target._step.graphs)
        assert draft.step.use_graphs and draft.step.graphs
