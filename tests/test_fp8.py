"""FP8 checkpoints in the exact Hub format (float8_e4m3fn weights, float32 weight_scale_inv per 128x128 block,
ragged edge blocks): both load modes match the dequantized twin run by transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from r1cli.config import load_config
from r1cli.loader import load_model
from tiny import hf_model, v3_config, write_checkpoint

BLOCK = 128
FP8_NAMES = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_block_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    sr, sc = -(-rows // BLOCK), -(-cols // BLOCK)
    scale = torch.empty(sr, sc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(sr):
        for j in range(sc):
            blk = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def dequant_reference(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = q.float().clone()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] *= scale[i, j]
    return out


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    """(fp8 folder in Hub format, dequantized float32 twin folder)."""
    # hidden 160 and kv_a rows 72+8=80, q_b rows 4*40=160: several blocks with ragged edges.
    cfg = v3_config(hidden_size=160, intermediate_size=288, moe_intermediate_size=144, kv_lora_rank=72,
                    q_lora_rank=136, qk_nope_head_dim=32, qk_rope_head_dim=8, v_head_dim=24)
    return write_fp8_pair(cfg, tmp_path_factory.mktemp("twin"), tmp_path_factory.mktemp("fp8"))


def write_fp8_pair(cfg, twin, fp8):
    """Write `cfg` as an FP8 checkpoint in Hub format into `fp8` and its dequantized float32 twin into `twin`."""
    write_checkpoint(cfg, twin)
    (file,) = twin.glob("*.safetensors")
    tensors = load_file(file)
    quantized, dequantized = {}, {}
    for name, t in tensors.items():
        leaf = name.split(".")[-2]
        if t.dim() == 2 and leaf in FP8_NAMES and "mlp.gate." not in name:
            q, s = quantize_block_fp8(t)
            quantized[name], quantized[name + "_scale_inv"] = q, s
            dequantized[name] = dequant_reference(q, s)
        else:
            quantized[name] = t.to(torch.bfloat16) if "e_score_correction_bias" not in name else t
            dequantized[name] = quantized[name].float()
    # Two shards and an index, as on the Hub.
    names = sorted(quantized)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: quantized[k].contiguous() for k in keys}, str(fp8 / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (fp8 / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((twin / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (fp8 / "config.json").write_text(json.dumps(config))
    save_file(dequantized, str(file), metadata={"format": "pt"})
    assert any(v.dtype == torch.float8_e4m3fn for v in quantized.values())
    return fp8, twin


@pytest.mark.parametrize("mode", ["dequant", "keep"])
def test_fp8_modes_match_dequantized_twin(fp8_pair, mode):
    fp8, twin = fp8_pair
    assert load_config(fp8).fp8_block == (128, 128)
    ref = hf_model(twin)
    ours = load_model(fp8, dtype="float32", fp8=mode)
    if mode == "keep":
        kept = [m for m in ours.modules() if getattr(m, "weight_scale_inv", None) is not None]
        assert kept and all(m.weight.dtype == torch.float8_e4m3fn for m in kept)
        assert ours.model.layers[1].mlp.experts.gate_proj.dtype == torch.float8_e4m3fn
        assert ours.model.layers[0].self_attn.kv_a_proj_with_mqa.weight_scale_inv.shape == (1, 2)
    tokens = torch.randint(0, 320, (1, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(tokens).logits
        got = ours(tokens)
        # decode through the cache too (absorbed MLA dequantizes kv_b per step in keep mode)
        cache = ours.new_cache(1, 32)
        ours(tokens[:, :-1], cache=cache)
        step = ours(tokens[:, -1:], start_pos=18, cache=cache)
    assert (got - want).abs().max().item() <= 1e-4
    assert (step[:, -1] - want[:, -1]).abs().max().item() <= 1e-4


def test_fp8_keep_mode_uses_about_one_byte_per_weight(fp8_pair):
    fp8, _ = fp8_pair
    keep = load_model(fp8, dtype="bfloat16", fp8="keep")
    deq = load_model(fp8, dtype="bfloat16", fp8="dequant")

    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))

    assert nbytes(keep) < 0.75 * nbytes(deq)
