"""Peak resident memory (VmHWM) of an `r1 serve` process answering six concurrent chat requests whose prompt is
about 1 MB (just under the default --max-request-bytes), then six of about 5 MB (issue #14: large bodies were
rendered and tokenised, all at once, before any check). The model is tests/steered.py's tiny checkpoint with the
real R1 tokenizer, so the memory measured is the request handling's, not the model's.

    python benchmarks/serve_request_memory.py [--src SRC_FOLDER_TO_RUN] [--dir /tmp/steered]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from common import SRC


def main() -> None:
    import steered

    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(SRC), help="the r1cli sources the server runs (another checkout's)")
    ap.add_argument("--dir", default="/tmp/r1-steered-bench")
    args = ap.parse_args()
    folder = Path(args.dir)
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        steered.write_steered(folder, steered.r1_tokenizer_dir(), steered.chain_ids(steered.r1_tokenizer_dir()))
    env = {**os.environ, "PYTHONPATH": args.src, "OMP_NUM_THREADS": "1"}
    env.pop("R1_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "r1cli", "serve", str(folder), "--port", "0"], env=env,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    while not (started := [m for line in lines if (m := re.search(r" on (http://\S+/v1)", line))]):
        assert proc.poll() is None, "".join(lines)
        time.sleep(0.2)
    url = started[0].group(1)

    def peak_mb() -> int:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) // 1024

    print(f"loaded: peak RSS {peak_mb()} MB")
    try:
        for size in (1_000_000, 5_000_000):
            body = json.dumps({"model": "deepseek-reasoner",
                               "messages": [{"role": "user", "content": "apple pear " * (size // 11)}]})

            def ask(_) -> int | str:
                try:
                    return httpx.post(url + "/chat/completions", content=body, timeout=300,
                                      headers={"Content-Type": "application/json"}).status_code
                except httpx.HTTPError as e:
                    return type(e).__name__

            t0 = time.perf_counter()
            with ThreadPoolExecutor(6) as pool:
                codes = list(pool.map(ask, range(6)))
            print(f"{len(body)} bytes x6: {codes} in {time.perf_counter() - t0:.1f} s, peak RSS {peak_mb()} MB")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
