"""On a GPU: the graph-captured and static decode steps give the eager path's greedy tokens, on random weights in
the real shapes (2 layers each) of a dense distill, DeepSeek-V2-Lite (MLA + MoE) and DeepSeek-R1 (one dense layer,
one MoE layer), in float32 so that no bf16 tie can part them. Skipped without CUDA; run by
`python benchmarks/run.py gpu-checks` (and first in `benchmarks/run.py gpu`)."""

from __future__ import annotations

import pytest
import torch
from paths import HUB_CONFIGS

from r1cli.bench import random_model
from r1cli.config import args_from_dict, read_config_json
from r1cli.generate import Decoder, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module", params=["DeepSeek-R1-Distill-Qwen-1.5B", "DeepSeek-V2-Lite", "DeepSeek-R1"])
def model(request):
    cfg = dict(read_config_json(HUB_CONFIGS / request.param), num_hidden_layers=2)
    if request.param == "DeepSeek-R1":
        cfg["first_k_dense_replace"] = 1  # one dense layer, one MoE layer
    model = random_model(args_from_dict(cfg), torch.device("cuda"), torch.float32)
    yield model
    del model
    torch.cuda.empty_cache()


@pytest.mark.parametrize("mode", ["static", "graph"])
def test_fast_decode_step_gives_the_eager_tokens(model, mode):
    prompt, params = list(range(5, 40)), SamplingParams(temperature=0, max_tokens=24)
    eager = list(Decoder(model, max_len=128, decode_mode="eager").generate(prompt, params))
    fast = list(Decoder(model, max_len=128, decode_mode=mode).generate(prompt, params))
    assert len(eager) == 24
    assert fast == eager
