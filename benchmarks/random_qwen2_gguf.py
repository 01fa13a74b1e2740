"""Write a random-weight Qwen2 GGUF in a config's shape (Q4_0 or Q8_0 linear weights), so llama.cpp can be timed
on a shape we have no GGUF for. A placeholder vocabulary of the config's size.

    python benchmarks/random_qwen2_gguf.py Qwen2.5-0.5B out.gguf [Q4_0|Q8_0]     # a config name, folder or file
"""

from __future__ import annotations

import json
import sys

import gguf
import numpy as np
from common import config_dir


def main(config: str, out: str, qtype: str = "Q4_0") -> None:
    cfg = json.loads((config_dir(config) / "config.json").read_text())
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    h, kv, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    hd = d // h
    q = getattr(gguf.GGMLQuantizationType, qtype)
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
    # a placeholder vocabulary (llama.cpp takes n_vocab from it); the benchmark feeds token ids, never text
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    w.add_token_types([gguf.TokenType.NORMAL] * vocab)
    w.add_token_merges(["a b"])  # llama.cpp insists on a merges list
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if qtype == "Q4_0" else gguf.LlamaFileType.MOSTLY_Q8_0)

    def rand(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    def lin(name, n, k):
        w.add_tensor(name, gguf.quants.quantize(rand(n, k), q), raw_dtype=q)

    w.add_tensor("token_embd.weight", rand(vocab, d).astype(np.float16))  # tied: also the head, as in the real files
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


if __name__ == "__main__":
    main(*sys.argv[1:])
