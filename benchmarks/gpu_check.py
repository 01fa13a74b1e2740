"""On a GPU: the graph-captured and static decode steps give the eager path's greedy tokens (random weights)."""

import sys

import torch

from r1cli.bench import random_model
from r1cli.config import args_from_dict, read_config_json
from r1cli.generate import Decoder, SamplingParams

ok = True
for name, layers in [("DeepSeek-R1-Distill-Qwen-1.5B", 2), ("DeepSeek-V2-Lite", 2), ("DeepSeek-R1", 2)]:
    cfg = dict(read_config_json(f"benchmarks/configs/{name}"), num_hidden_layers=layers)
    if name == "DeepSeek-R1":
        cfg["first_k_dense_replace"] = 1
    args = args_from_dict(cfg)
    model = random_model(args, torch.device("cuda"), torch.float32)
    prompt = list(range(5, 40))
    params = SamplingParams(temperature=0, max_tokens=24)
    ref = list(Decoder(model, max_len=128, decode_mode="eager").generate(prompt, params))
    for mode in ("static", "graph"):
        got = list(Decoder(model, max_len=128, decode_mode=mode).generate(prompt, params))
        same = got == ref
        ok &= same
        print(f"{name} ({layers} layers) {mode} vs eager greedy tokens identical: {same}", flush=True)
    del model
    torch.cuda.empty_cache()
sys.exit(0 if ok else 1)
