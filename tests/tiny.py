"""Tiny random checkpoints written by transformers' own `save_pretrained` (the test oracle), in the Hub layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=512, tie_word_embeddings=False)


def llama_config(**kw):
    from transformers import LlamaConfig

    cfg = dict(BASE, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
               rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64))
    cfg.update(kw)
    return LlamaConfig(**cfg)


def qwen2_config(**kw):
    from transformers import Qwen2Config

    cfg = dict(BASE, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0)
    cfg.update(kw)
    return Qwen2Config(**cfg)


MLA = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32)


def v3_config(**kw):
    from transformers import DeepseekV3Config

    cfg = dict(BASE, **MLA, num_key_value_heads=4, q_lora_rank=48, n_routed_experts=16, num_experts_per_tok=4,
               n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
               norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0,
               rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32,
                                 beta_slow=1, mscale=1.0, mscale_all_dim=1.0))
    cfg.update(kw)
    return DeepseekV3Config(**cfg)


def v2_config(**kw):
    from transformers import DeepseekV2Config

    cfg = dict(BASE, **MLA, num_key_value_heads=4, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=3,
               n_group=1, topk_group=1, topk_method="greedy", n_shared_experts=2, first_k_dense_replace=1,
               routed_scaling_factor=1.0, norm_topk_prob=False, rms_norm_eps=1e-6, rope_theta=10000.0,
               rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32,
                                 beta_slow=1, mscale=0.707, mscale_all_dim=0.707))
    cfg.update(kw)
    return DeepseekV2Config(**cfg)


def perturb(model, seed=0):
    """Random init leaves norms at 1 and biases at 0: perturb every parameter so a missing one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.rand(b.shape, generator=g))


def write_checkpoint(config, folder: Path, seed=0, hub_layout=False):
    """Build a random transformers model from `config`, perturb it, and save_pretrained it as safetensors.
    hub_layout: rewrite config.json with top-level rope_theta/rope_scaling as the Hub's files have."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    perturb(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    if hub_layout:
        path = Path(folder) / "config.json"
        cfg = json.loads(path.read_text())
        params = cfg.pop("rope_parameters", None) or {}
        cfg["rope_theta"] = params.pop("rope_theta", 10000.0)
        if params.get("rope_type", "default") != "default":
            params["type"] = params.pop("rope_type")
            cfg["rope_scaling"] = params
        path.write_text(json.dumps(cfg, indent=2))
    return model.eval()


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()


FUSED = (("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"), ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"))


def fused_state_dict(state: dict) -> dict:
    """A transformers state dict under r1's loaded names: q|k|v and gate|up joined along the output rows
    (CausalLM.fuse_projections), so a loaded model compares tensor by tensor."""
    out = dict(state)
    for name in state:
        for owner, parts, joined in FUSED:
            for leaf in ("weight", "bias"):
                first = f".{owner}.{parts[0]}.{leaf}"
                if name.endswith(first):
                    prefix = name[: -len(first)]
                    keys = [f"{prefix}.{owner}.{p}.{leaf}" for p in parts]
                    out[f"{prefix}.{owner}.{joined}.{leaf}"] = torch.cat([out.pop(k) for k in keys])
    return out
