"""Streaming load: peak resident memory stays close to the size of the weights."""

from __future__ import annotations

import json
import subprocess
import sys

from tiny import qwen2_config, write_checkpoint

PROBE = r"""
import json, resource, sys, gc
import torch
from r1cli.loader import load_model
torch.ones(1) @ torch.ones(1)  # settle torch's one-off allocations before the baseline
gc.collect()
def rss():  # current resident set, bytes
    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
base = rss()
model = load_model(sys.argv[1], dtype=sys.argv[2])
# VmHWM: this process's peak resident set (ru_maxrss would inherit the forking parent's peak across exec)
peak = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"base": base, "peak": peak, "weights": weights}))
"""


def test_peak_memory_close_to_weight_size(tmp_path):
    folder = tmp_path / "mid"
    # About 200 MB of float32 weights: big enough that copies would show, small enough for CI.
    write_checkpoint(qwen2_config(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                                  num_attention_heads=8, num_key_value_heads=4), folder)
    for dtype in ("float32", "bfloat16"):
        out = subprocess.run([sys.executable, "-c", PROBE, str(folder), dtype], capture_output=True, text=True,
                             check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        grew = m["peak"] - m["base"]
        assert m["weights"] > (90e6 if dtype == "bfloat16" else 180e6)
        # peak while loading <= 1.15 x the final weights (+16 MB for allocator slack)
        assert grew <= 1.15 * m["weights"] + 16e6, (dtype, m, out.stderr[-2000:])
