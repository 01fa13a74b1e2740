"""How long the compiled CPU decode step takes to start: a first process on a machine (nothing cached: export and
AOTInductor compile, waited for) against later ones (the package from the first, compile_cache.py), each a fresh
process, with its own empty Inductor folder, so nothing but r1's package carries the compile over. Prints, per
process: import + model load seconds, the first reply's seconds (8 tokens, with the compile or the package load in
it), the peak resident memory after the load and after the first reply (the compile's own, in-process and the
C++ compiler's), whether the step ran compiled, and then the decode speed of the eager and compiled steps, alternated in rounds
in that process (best round each).

    python benchmarks/compile_start.py MODEL_FOLDER [--quant int4] [--dtype bfloat16] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import SRC, add_threads_arg

CHILD = """
import time
t0 = time.perf_counter()
import json, sys
import torch
from r1cli.generate import Decoder, SamplingParams
from r1cli.loader import load_model

torch.set_num_threads(int(sys.argv[4]))
from r1cli.options import head_int8
model = load_model(sys.argv[1], dtype=sys.argv[3], quant=sys.argv[2], cache=False,
                   quant_head=head_int8(sys.argv[2], None))  # as the command line opens it
loaded = time.perf_counter() - t0
import resource
peak_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # GB (ru_maxrss is in KB on Linux)
gen = Decoder(model, max_len=512, decode_mode="compile")
t = time.perf_counter()
ids = list(gen.generate([1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=8, repeat_guard=False)))
first = time.perf_counter() - t
peak_first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # the C++ compiler's, at most
eager = Decoder(model, max_len=512, decode_mode="eager")
params = SamplingParams(temperature=0, max_tokens=int(sys.argv[5]), repeat_guard=False)
best = {"eager": 0.0, "compiled": 0.0}
for _ in range(int(sys.argv[6])):
    for name, g in (("eager", eager), ("compiled", gen)):
        g.reset()
        list(g.generate([5, 6, 7, 8], params))
        best[name] = max(best[name], g.stats.decode_tokens_per_s)
package = gen._step.load_s
print(json.dumps({"load_s": round(loaded, 2), "first_reply_s": round(first, 2), "compiled": gen._step.compiled,
                  "package_load_s": package and round(package, 2),
                  "peak_gb": [round(peak_loaded, 2), round(peak_first, 2), round(peak_children, 2)],
                  "ids": ids, "tok_s": {k: round(v, 2) for k, v in best.items()}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--quant", default="none")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--runs", type=int, default=2)
    add_threads_arg(ap)
    ap.add_argument("--tokens", type=int, default=32, help="tokens per speed round")
    ap.add_argument("--rounds", type=int, default=2, help="speed rounds (0: start-up only)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="r1-compile-start-"))
    for i in range(a.runs):
        env = {**os.environ, "PYTHONPATH": str(SRC), "XDG_CACHE_HOME": str(work / "xdg"),
               "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor{i}"), "OMP_NUM_THREADS": str(a.threads)}
        p = subprocess.run([sys.executable, "-c", CHILD, a.folder, a.quant, a.dtype, str(a.threads), str(a.tokens),
                            str(a.rounds)], capture_output=True, text=True, env=env)
        if p.returncode:
            sys.exit(p.stderr[-3000:])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        label = "first start (nothing cached)" if i == 0 else "later start (r1's package)"
        print(f"{label:<30} import+load {r['load_s']:6.1f} s   first reply {r['first_reply_s']:7.1f} s   "
              f"(package load {r['package_load_s']} s)   peak RSS GB loaded/after first reply/compiler "
              f"{r['peak_gb']}   compiled {r['compiled']}   decode tok/s {r['tok_s']}   tokens {r['ids']}", flush=True)


if __name__ == "__main__":
    main()
