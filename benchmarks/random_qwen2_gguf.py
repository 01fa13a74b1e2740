"""Write a random-weight Qwen2 GGUF in a config's shape, so that r1 and llama.cpp can be timed on the same file at a
shape we have no real GGUF for. The tokenizer is the real R1-Distill one (tests/fixtures/r1-distill-qwen-tokenizer,
padded to the config's vocabulary as llama.cpp's converter pads it), so r1 opens the file like a downloaded one.

    python benchmarks/random_qwen2_gguf.py DeepSeek-R1-Distill-Qwen-1.5B out.gguf Q4_K_M   # a config name, folder
    python benchmarks/random_qwen2_gguf.py Qwen2.5-0.5B out.gguf Q4_0                      # or file; then the type

F16 and F32 are written directly (norms in F32); Q4_0 and Q8_0 by the gguf package's quantizers; any other type
(Q4_K_M, Q5_K_M, Q6_K, ...) is written as F16 and then quantized by llama.cpp's own quantizer (llama-cpp-python), so
the file has exactly llama.cpp's type mix for that preset.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import gguf
import numpy as np
from common import TESTS, config_dir
from gguf_files import add_metadata, tokenizer_metadata

R1_TOKENIZER = TESTS / "fixtures" / "r1-distill-qwen-tokenizer"
DIRECT = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
          "Q4_0": gguf.GGMLQuantizationType.Q4_0, "Q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
              "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def write(cfg: dict, out: str, qtype: str) -> None:
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    h, kv, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    hd = d // h
    q = DIRECT[qtype]
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(out, "qwen2")
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_block_count(L)
    w.add_head_count(h)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_rope_freq_base(cfg.get("rope_theta", 1e6))
    w.add_file_type(FILE_TYPES[qtype])
    for key, value in tokenizer_metadata(R1_TOKENIZER, vocab_size=vocab).items():
        add_metadata(w, key, value)

    def rand(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * 0.02

    def lin(name, n, k):
        values = rand(n, k)
        if q in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(name, values.astype(np.float16 if qtype == "F16" else np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(values, q), raw_dtype=q)

    w.add_tensor("token_embd.weight", rand(vocab, d).astype(np.float16))
    if not cfg.get("tie_word_embeddings", False):
        lin("output.weight", vocab, d)
    w.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(d, dtype=np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(d, dtype=np.float32))
        lin(p + "attn_q.weight", h * hd, d)
        lin(p + "attn_k.weight", kv * hd, d)
        lin(p + "attn_v.weight", kv * hd, d)
        w.add_tensor(p + "attn_q.bias", np.zeros(h * hd, dtype=np.float32))
        w.add_tensor(p + "attn_k.bias", np.zeros(kv * hd, dtype=np.float32))
        w.add_tensor(p + "attn_v.bias", np.zeros(kv * hd, dtype=np.float32))
        lin(p + "attn_output.weight", d, h * hd)
        lin(p + "ffn_gate.weight", f, d)
        lin(p + "ffn_up.weight", f, d)
        lin(p + "ffn_down.weight", d, f)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_quantize(src: str, out: str, qtype: str) -> None:
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if ftype is None:
        sys.exit(f"llama.cpp has no file type {qtype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(src.encode(), out.encode(), params) != 0:
        sys.exit(f"llama.cpp could not quantize {src} to {qtype}")


def main(config: str, out: str, qtype: str = "Q4_0") -> None:
    cfg = json.loads((config_dir(config) / "config.json").read_text())
    if qtype in DIRECT:
        write(cfg, out, qtype)
        return
    f16 = str(Path(out).with_suffix(".f16.tmp.gguf"))
    try:
        write(cfg, f16, "F16")
        llama_quantize(f16, out, qtype)
    finally:
        Path(f16).unlink(missing_ok=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
