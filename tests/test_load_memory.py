"""Streaming load: peak resident memory stays close to the size of the weights."""

from __future__ import annotations

import pytest

from memprobe import measure_load
from tiny import qwen2_config, write_checkpoint


@pytest.mark.slow
def test_peak_memory_close_to_weight_size(tmp_path):
    folder = tmp_path / "mid"
    # About 200 MB of float32 weights: big enough that copies would show, small enough for CI.
    write_checkpoint(qwen2_config(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                                  num_attention_heads=8, num_key_value_heads=4), folder)
    for dtype in ("float32", "bfloat16"):
        m = measure_load("load_model(sys.argv[1], dtype=sys.argv[2])", folder, dtype,
                         setup="from r1cli.loader import load_model")
        grew = m["grew"]
        assert m["weights"] > (90e6 if dtype == "bfloat16" else 180e6)
        # peak while loading <= 1.15 x the final weights (+16 MB for allocator slack)
        assert grew <= 1.15 * m["weights"] + 16e6, (dtype, m)
