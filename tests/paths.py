"""Where the tests' data lives: everything inside this repository (a user's clone has nothing beside it)."""

from __future__ import annotations

from pathlib import Path

import r1cli.hub_configs as _hub_configs

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SRC = ROOT / "src"
FIXTURES = TESTS / "fixtures"
# The real R1-Distill tokenizer (tokenizer.json + tokenizer_config.json), public data; see fixtures/README.md.
R1_TOKENIZER = FIXTURES / "r1-distill-qwen-tokenizer"
# The Hub config.json of every alias ships inside the package (`r1 show` answers before a download).
HUB_CONFIGS = Path(_hub_configs.__file__).resolve().parent
