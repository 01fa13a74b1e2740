"""What the repetition guard (generate.RepetitionGuard) costs per token, on real tokenized text and inside a loop.

    python benchmarks/repeat_guard.py            # prose and code of this repository, random ids, a 3-token loop
"""

from __future__ import annotations

import random
import time

from common import ROOT

from r1cli.generate import RepetitionGuard
from r1cli.tokenizer import Tokenizer


def per_token_us(ids: list[int], rounds: int = 5) -> tuple[float, int | None]:
    """Best of `rounds` passes (the machine is shared): microseconds per token, and where it tripped."""
    best, tripped = float("inf"), None
    for _ in range(rounds):
        guard, t0, n = RepetitionGuard(), time.perf_counter(), 0
        for n, token in enumerate(ids, 1):
            if guard.add(token):
                tripped = n
                break
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best, tripped


def main() -> None:
    tok = Tokenizer.from_folder(ROOT / "tests" / "fixtures" / "r1-distill-qwen-tokenizer")
    text = "".join((ROOT / p).read_text() for p in ("README.md", "docs/architecture.md", "src/r1cli/generate.py"))
    ids = tok.encode(text)
    rng = random.Random(0)
    for name, seq in [("prose and code", ids), ("random ids", [rng.randrange(151936) for _ in ids]),
                      ("a 3-token loop", tok.encode(" les Français," * 1000))]:
        us, tripped = per_token_us(seq)
        print(f"{name:16} {len(seq):6} tokens  {us:6.2f} us/token  tripped at {tripped}")


if __name__ == "__main__":
    main()
