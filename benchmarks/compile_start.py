"""How long the compiled decode step takes to start: a first process on a machine (nothing cached) against a later
one (r1's compile cache from the first, compile_cache.py), each in a fresh process with an empty Inductor folder,
so nothing but r1's own file carries the compile over. Prints the first compiled reply's seconds (compile + a few
tokens) and the Inductor cache hits and misses of each.

    python benchmarks/compile_start.py MODEL_FOLDER [--quant int8] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import SRC

CHILD = """
import json, sys, time
import torch
from torch._dynamo.utils import counters
from r1cli.generate import Decoder, SamplingParams
from r1cli.loader import load_model

torch.set_num_threads(2)
model = load_model(sys.argv[1], dtype="bfloat16", quant=sys.argv[2], cache=False)
gen = Decoder(model, max_len=512, decode_mode="compile")
t = time.perf_counter()
ids = list(gen.generate([1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=8)))
first = time.perf_counter() - t
print(json.dumps({"first_reply_s": round(first, 2), "hit": counters["inductor"]["fxgraph_cache_hit"],
                  "miss": counters["inductor"]["fxgraph_cache_miss"], "ids": ids}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--quant", default="none")
    ap.add_argument("--runs", type=int, default=2)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="r1-compile-start-"))
    for i in range(a.runs):
        env = {**os.environ, "PYTHONPATH": str(SRC), "XDG_CACHE_HOME": str(work / "xdg"),
               "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor{i}")}
        p = subprocess.run([sys.executable, "-c", CHILD, a.folder, a.quant], capture_output=True, text=True, env=env)
        if p.returncode:
            sys.exit(p.stderr[-3000:])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        label = "first start (nothing cached)" if i == 0 else "later start (r1's compile cache)"
        print(f"{label:<34} first reply {r['first_reply_s']:7.1f} s   inductor hits {r['hit']}, misses {r['miss']}   "
              f"tokens {r['ids']}", flush=True)


if __name__ == "__main__":
    main()
