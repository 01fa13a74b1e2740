"""Peak resident memory of loading a model, measured in a fresh process (the test process's own allocations would
hide it). Used by test_load_memory, test_quant and test_gguf."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

_PROBE = r"""
import gc, json, resource, sys
import torch
{setup}
torch.ones(1) @ torch.ones(1)  # settle torch's one-off allocations before the baseline
gc.collect()
base = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
model = {load}
# VmHWM: this process's peak resident set (ru_maxrss would inherit the forking parent's peak across exec)
peak = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
unique = {{t.data_ptr(): t for t in model.state_dict().values()}}  # a tied head shares the embedding
print(json.dumps({{"base": base, "peak": peak, "weights": sum(t.numel() * t.element_size() for t in unique.values())}}))
"""


def measure_load(load: str, *argv, setup: str = "") -> dict:
    """Run `model = <load>` (with sys.argv[1:] = argv) after `setup` and a settled baseline: returns base, peak and
    grew (bytes of resident set) and weights (bytes of the loaded tensors)."""
    script = _PROBE.format(setup=setup, load=load)
    out = subprocess.run([sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    return {**m, "grew": m["peak"] - m["base"]}
