"""Weight-only int8/int4 quantization: the packed kernels against the dequantized reference, every architecture
against transformers run on the dequantized weights, KL against bf16 on real SmolLM2 weights, the disk cache,
`r1 rm`, FP8 requantization and the CLI's errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from paths import HUB_CONFIGS
from memprobe import measure_load
from tiny import (
    hf_model,
    llama_config,
    qwen2_config,
    v2_config,
    v3_config,
    write_checkpoint,
)

from r1cli import quant as q
from r1cli import quant_formats as qf
from r1cli import sizes
from r1cli.loader import load_model

SRC = Path(__file__).resolve().parents[1] / "src"


def rel_err(y, ref):
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


# --- kernels ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(64, 128), (96, 256), (256, 384)])
@pytest.mark.parametrize("rows", [1, 5, 80])
def test_int8_kernel_matches_dequantized_reference(n, k, rows):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    qw = qf.Int8Weight.from_float(w)
    reference_w = qw.q.float() * qw.scale[:, None]
    assert rel_err(reference_w, w) < 0.01  # 1/254 of each row's max at most
    x = torch.randn(2, rows, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    y = qw.matmul(x, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (2, rows, n)
    assert rel_err(y, F.linear(x.float(), reference_w, bias.float())) < 0.02  # bf16 activations and output


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n,k", [(64, 128), (96, 256), (256, 384)])
def test_int4_kernel_matches_dequantized_reference(group, n, k):
    if k % group:
        pytest.skip("K not a multiple of the group")  # (256, 384) with 128 groups is covered; 384 % 64 == 0 too
    g = torch.Generator().manual_seed(n * k + group)
    w = torch.randn(n, k, generator=g) * 0.05
    codes, scales, zeros = qf.quantize_int4(w, group)
    assert codes.min() >= 0 and codes.max() <= 15 and scales.shape == (n, k // group)
    reference_w = qf.dequantize_int4(codes, scales.bfloat16(), zeros.bfloat16())  # kept as bf16 in memory
    assert (reference_w - w).abs().max() <= scales.max() * 0.51 + 1e-3  # half a step (+ bf16 on scale/zero)
    qw = qf.Int4Weight.from_codes(codes, scales, zeros, group, "cpu")
    assert qw.layout == "cpu"
    for rows in (1, 7, 70):
        x = torch.randn(rows, k, generator=g).bfloat16()
        assert rel_err(qw.matmul(x), F.linear(x.float(), reference_w)) < 0.02
    assert rel_err(qw.dequantize(torch.float32), reference_w) < 0.01  # the opaque layout read back
    # the device-independent form the cache stores round-trips exactly
    back = qf.Int4Weight.from_export(qf.int4_export(codes, scales, zeros), group, "cpu")
    assert torch.equal(back.packed, qw.packed) and torch.equal(back.scales_and_zeros, qw.scales_and_zeros)


def test_int4_contract_is_torchs_own_convention():
    """w = (q - 8) * scale + zero with scales_and_zeros [K/g, N, 2]: what the GGUF importer relies on."""
    n, k, group = 32, 64, 32
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    scales, zeros = torch.rand(n, k // group) * 0.1, torch.randn(n, k // group) * 0.1
    x = torch.randn(3, k)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()
    torch_y = torch._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    assert torch.allclose(torch_y, x @ qf.dequantize_int4(codes, scales, zeros).T, atol=1e-4)


def test_plain_layout_and_stacked_gather():
    """Other devices (and gathered experts on a GPU) dequantize the plain layout; indexing picks experts."""
    e, n, k, group = 4, 48, 64, 32
    w = torch.randn(e, n, k) * 0.05
    codes, scales, zeros = qf.quantize_int4(w, group)
    t = qf.int4_export(codes, scales, zeros)
    plain = qf.Int4Weight(t["packed"], t["scales_and_zeros"], group, "plain", codes.shape)
    ref = qf.dequantize_int4(codes, scales.bfloat16(), zeros.bfloat16())
    idx = torch.tensor([3, 1, 3])
    assert torch.equal(plain.dequantize(torch.float32, idx), ref[idx])
    stacked = qf.Int4Weight.from_codes(codes, scales, zeros, group, "cpu")
    x = torch.randn(5, k).bfloat16()
    for i in range(e):
        assert rel_err(stacked.matmul(x, None, i), x.float() @ ref[i].T) < 0.02
    i8 = qf.Int8Weight.from_float(w)
    assert torch.equal(i8.dequantize(torch.float32, idx), (i8.q.float() * i8.scale[..., None])[idx])


# --- int8: the dynamic kernel (8-bit activations, integer dot products) -------------------------------------------


def activation_rounding_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|y - x W^T| per output for one row x quantized to 8 bits as fbgemm does (range widened to hold 0, 255 steps,
    error at most half a step per element): half a step times each row's sum of |w| (+ float32 slack)."""
    step = (x.max().clamp(min=0) - x.min().clamp(max=0)) / 255
    return step / 2 * w.abs().sum(-1) + 1e-5 * (x.abs() @ w.abs().T).squeeze(0)


def test_the_int8_kernel_is_chosen_by_features_and_quality():
    assert qf.fastest_int8_kernel(True) == "dynamic" and qf.fastest_int8_kernel(False) == "pack"
    assert qf.choose_int8_kernel(False) == "pack"
    assert qf.choose_int8_kernel(True) == ("dynamic" if qf.DYNAMIC_INT8_KEEPS_QUALITY else "mixed")
    if "R1_INT8_KERNEL" not in os.environ:
        # a new weight is packed unless every layer is dynamic ("mixed" places the dynamic kernel by layer name)
        policy = qf.choose_int8_kernel(qf.cpu_has_vnni())
        assert qf.int8_kernel() == policy
        assert qf.Int8Weight.from_float(torch.randn(64, 128)).kernel == ("dynamic" if policy == "dynamic" else "pack")
    # "mixed": gate|up dynamic; down dynamic over column groups only where wide enough to pay; the rest packed
    assert qf.mixed_kernel_for("model.layers.3.mlp.gate_up_proj", 576) == ("dynamic", 1)
    assert qf.mixed_kernel_for("model.layers.3.mlp.up_proj", 576) == ("dynamic", 1)
    assert qf.mixed_kernel_for("model.layers.3.mlp.down_proj", 8960) == ("dynamic", qf.DOWN_GROUPS)
    assert qf.mixed_kernel_for("model.layers.3.mlp.down_proj", 1536) == ("pack", 1)
    for name in ("model.layers.3.self_attn.qkv_proj", "model.layers.3.self_attn.o_proj", "lm_head"):
        assert qf.mixed_kernel_for(name, 8960) == ("pack", 1)
    # `r1 show` says which policy this process uses, and why
    from r1cli.hub import cpu_advice

    shown = cpu_advice()
    assert shown["int8_kernel"] == qf.int8_kernel() and qf.int8_kernel_reason(qf.int8_kernel()) in shown["why"]


@pytest.mark.skipif(not qf.cpu_has_vnni(), reason="fbgemm without VNNI saturates 16-bit pair sums: not used there")
@pytest.mark.parametrize("n,k", [(64, 128), (96, 576), (2048, 1536)])
@pytest.mark.parametrize("kind", ["normal", "outlier", "positive"])
@pytest.mark.parametrize("kernel", ["dynamic", "intmm"])
def test_int8_activation_kernels_within_the_activation_rounding_bound(n, k, kind, kernel):
    """Against the float product of the very same codes: only the activation's 8-bit rounding may differ (fbgemm's
    dynamic kernel, and oneDNN's integer matmul that the int8 head takes)."""
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    codes, scale = qf.quantize_int8(w)
    dyn, pack = qf.Int8Weight(codes, scale, kernel), qf.Int8Weight(codes, scale, "pack")
    assert torch.equal(dyn.q, codes) and dyn.shape == codes.shape
    reference_w = codes.float() * scale[:, None]
    x = torch.randn(1, k, generator=g)
    if kind == "outlier":  # one large channel, as transformer activations have: the step is set by it
        x[0, 3] = 40.0
    elif kind == "positive":  # every pair sum at the top of the u8 x s8 range (a saturating kernel fails here)
        x = torch.full((1, k), 3.0)
    ref = x @ reference_w.T
    y = dyn.matmul(x)
    assert y.dtype == torch.float32 and y.shape == (1, n)
    bound = activation_rounding_bound(x, reference_w)
    assert ((y - ref).abs() <= bound).all(), ((y - ref).abs() / bound).max()
    # (the bound is the worst case, every rounding in one direction; typically the error is far smaller)
    assert (y - ref).abs().mean() < 0.03 * ref.abs().mean() or kind == "outlier"
    # bf16 in, bf16 out (what a layer passes): the same bound plus the output's bf16 rounding
    yb = dyn.matmul(x.bfloat16(), bias=torch.ones(n).bfloat16())
    assert yb.dtype == torch.bfloat16
    assert ((yb.float() - 1 - ref).abs() <= bound + ref.abs() / 128 + 1 / 128).all()
    # several rows share no activation scale: they take the float path, the pack kernel's results exactly
    x5 = torch.randn(5, k, generator=g).bfloat16()
    assert torch.equal(dyn.matmul(x5), pack.matmul(x5))
    assert torch.equal(dyn.dequantize(torch.float32), pack.dequantize(torch.float32))


@pytest.mark.skipif(not qf.cpu_has_vnni(), reason="fbgemm without VNNI saturates 16-bit pair sums: not used there")
@pytest.mark.parametrize("n,k", [(64, 256), (1536, 8960)])
def test_int8_dynamic_kernel_over_column_groups(n, k):
    """Each column group of the row is quantized with its own 8-bit scale: the error stays within the sum of the
    groups' own bounds, and an outlier in one group no longer coarsens the others."""
    g = torch.Generator().manual_seed(k)
    w = torch.randn(n, k, generator=g) * 0.05
    codes, scale = qf.quantize_int8(w)
    grouped, whole = qf.Int8Weight(codes, scale, "dynamic", groups=4), qf.Int8Weight(codes, scale, "dynamic")
    assert grouped.groups == 4 and torch.equal(grouped.q, codes) and grouped.shape == codes.shape
    reference_w = codes.float() * scale[:, None]
    x = torch.randn(1, k, generator=g)
    x[0, 3] = 40.0  # an outlier in the first group
    ref = x @ reference_w.T
    step = k // 4
    bound = sum(activation_rounding_bound(x[:, i:i + step], reference_w[:, i:i + step]) for i in range(0, k, step))
    err = (grouped.matmul(x) - ref).abs()
    assert (err <= bound).all(), (err / bound).max()
    # (the outlier group keeps the coarse step; the three others get fine ones: about half the error, in sqrt)
    assert err.mean() < 0.7 * (whole.matmul(x) - ref).abs().mean()
    x5 = torch.randn(5, k, generator=g).bfloat16()  # several rows: the packed kernel's path, exactly
    assert torch.equal(grouped.matmul(x5), qf.Int8Weight(codes, scale, "pack").matmul(x5))
    joined = grouped.join([grouped, grouped])
    assert joined.groups == 4 and torch.equal(joined.q, torch.cat([codes, codes]))
    assert grouped.join([grouped, whole]) is None


@pytest.mark.skipif(not qf.cpu_has_vnni(), reason="fbgemm without VNNI saturates 16-bit pair sums: not used there")
def test_mixed_placement_leaves_small_models_packed_for_the_compiled_step(monkeypatch):
    from r1cli.config import args_from_dict
    from r1cli.models import build_model

    cfg = {**llama_config(num_hidden_layers=1, hidden_size=128, intermediate_size=256).to_dict(),
           "architectures": ["LlamaForCausalLM"]}

    def placed(compile_env: str, min_weights: int) -> set:
        monkeypatch.setenv("R1_COMPILE", compile_env)
        monkeypatch.setattr(qf, "MIXED_MIN_WEIGHTS_WHEN_COMPILED", min_weights)
        model = build_model(args_from_dict(cfg)).float()
        q.quantize_model(model, "int8")
        qf.place_int8_kernels(model)
        return {m.qweight.kernel for m in model.modules() if isinstance(getattr(m, "qweight", None), qf.Int8Weight)}

    monkeypatch.setattr(qf, "_int8_kernel", "mixed")
    assert placed("1", 10**9) == {"pack"}  # compiled step, small model: packed, so the step compiles
    assert placed("1", 0) == {"pack", "dynamic"}  # compiled step, a model past the threshold
    assert placed("0", 10**9) == {"pack", "dynamic"}  # eager decode: mixed whatever the size
    monkeypatch.setattr(qf, "_int8_kernel", "pack")
    assert placed("0", 0) == {"pack"}


@pytest.mark.skipif(not qf.cpu_has_vnni(), reason="fbgemm without VNNI saturates 16-bit pair sums: not used there")
def test_int8_dynamic_weights_join_and_keep_their_codes():
    g = torch.Generator().manual_seed(5)
    parts = [qf.Int8Weight.from_float(torch.randn(n, 64, generator=g)) for n in (32, 16, 16)]
    parts = [qf.Int8Weight(p.q, p.scale, "dynamic") for p in parts]
    joined = parts[0].join(parts)
    assert joined.kernel == "dynamic" and joined.shape == (64, 64)
    assert torch.equal(joined.q, torch.cat([p.q for p in parts]))
    x = torch.randn(1, 64, generator=g)
    assert torch.equal(joined.matmul(x), torch.cat([p.matmul(x) for p in parts], -1))
    assert set(joined.state_dict()) == {"q", "scale"} and torch.equal(joined.state_dict()["q"], joined.q)
    assert parts[0].join([parts[0], qf.Int8Weight(parts[1].q, parts[1].scale, "pack")]) is None


# --- every architecture -------------------------------------------------------------------------------------------

ARCHS = {"llama": llama_config, "qwen2": qwen2_config, "v3": v3_config, "v2": v2_config}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    out = {}
    for name, cfg in ARCHS.items():
        folder = tmp_path_factory.mktemp(name)
        # hidden 128 and head_dim 32 so the int4 kernel takes most layers (N % 16, K % group)
        kw = {"hidden_size": 128, "intermediate_size": 256}
        if name in ("v3", "v2"):
            kw.update(moe_intermediate_size=64)
        write_checkpoint(cfg(**kw), folder)
        out[name] = folder
    return out


def dequantized_twin(model, src: Path, dst: Path) -> Path:
    """The checkpoint with every quantized weight replaced by its dequantized value, for transformers to run."""
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    (file,) = src.glob("*.safetensors")
    tensors = load_file(file)
    n_quantized = 0
    for name, module in model.named_modules():
        if getattr(module, "qweight", None) is not None:
            tensors[f"{name}.weight"] = module.qweight.dequantize(torch.float32)
            n_quantized += 1
        for attr, qw in getattr(module, "quant", {}).items():
            for e in range(qw.shape[0]):
                tensors[f"{name}.{e}.{attr}.weight"] = qw.dequantize(torch.float32, e)
            n_quantized += 1
    assert n_quantized > 5
    save_file(tensors, dst / file.name, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_matches_transformers_on_dequantized_weights(tiny_dirs, tmp_path, arch, scheme):
    model = load_model(tiny_dirs[arch], dtype="float32", quant=scheme, group_size=32, cache=False, fuse=False)
    hf = hf_model(dequantized_twin(model, tiny_dirs[arch], tmp_path / "twin"))
    model.fuse_projections()  # what the loader does: the joined quantized q|k|v and gate|up against the oracle
    tokens = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    # the kernels take bf16 activations: a bf16-sized difference, far below what quantization itself moves;
    # in an MoE that rounding can flip a near-tied routing choice at a token, so MoE allows a few such positions
    per_position = (ours - theirs).abs().amax(-1) / theirs.abs().amax()
    allowed = 0 if arch in ("llama", "qwen2") else 3
    assert (per_position > 0.03).sum() <= allowed, per_position
    assert per_position.median() < 0.01
    with torch.no_grad():  # and decode (one row per step, the packed kernels) agrees with the prompt's logits
        cache = model.new_cache(2, 32)
        model(tokens[:, :-1], cache=cache)
        step = model(tokens[:, -1:], start_pos=23, cache=cache)
    assert rel_err(step[:, -1], ours[:, -1]) < 0.03


# --- real weights: SmolLM2-135M -----------------------------------------------------------------------------------

# A fixed text (plain English prose) of well over 512 tokens.
TEXT = " ".join([
    "The river rose slowly through the night, and by morning the lower fields were under water.",
    "Farmers who had lived in the valley all their lives said they had never seen it climb so fast.",
    "The old stone bridge held, though the water reached the top of its arches and carried whole trees against it.",
    "In the village the school was closed, and the children watched from the hill as boats moved along the main street.",
    "The baker kept his oven going and handed out bread to anyone who came to the door, asking nothing in return.",
    "By the afternoon the rain had stopped, and a pale sun broke through the clouds over the eastern ridge.",
    "Engineers arrived from the city with maps and measuring rods, and they walked the length of the embankment,",
    "writing down every crack and every place where the earth had slipped.",
    "They explained that the dam upstream had released water to protect itself, and that the valley had paid the price.",
    "Some people were angry, and others only tired; most simply wanted to know when they could go home.",
    "It took three weeks for the water to fall back between its banks.",
    "When it did, it left a layer of fine grey mud over everything it had touched: floors, furniture, letters, photographs.",
    "The families returned one by one and began the slow work of cleaning, scraping the mud from the walls with shovels",
    "and washing what could be washed in the clear water of the well.",
    "A teacher organised the older students into teams, and they went from house to house carrying out ruined carpets",
    "and broken chairs, stacking them in great piles at the edge of the square.",
    "In the evenings people gathered around small fires and talked about what they would do differently next time.",
    "Some wanted higher walls along the river; others said the river should be given room, and the lowest fields",
    "left to flood each spring as they had done long before anyone built there.",
    "The debate went on for months, in the village hall and in the newspaper, and it was not settled quickly.",
    "In the end the council decided on a mixture of both: a new wall to protect the houses,",
    "and a wide meadow downstream where the water could spread out and rest.",
    "Years later, when the river rose again, the meadow filled like a shallow lake and the houses stayed dry.",
    "The children who had watched the boats from the hill were grown by then, and some of them had helped to build the wall.",
    "They told their own children the story of the flood, of the baker and his bread, and of the grey mud",
    "that had covered everything, and they pointed to the line on the church tower where the water had once reached.",
    "Mathematics offers a different kind of story. Consider the sequence of prime numbers: two, three, five, seven,",
    "eleven, thirteen, seventeen, nineteen, twenty-three. No simple rule produces them all, yet their distribution",
    "follows a pattern that becomes clearer the further one looks. Euclid proved more than two thousand years ago",
    "that there is no largest prime: multiply all the primes you know, add one, and the result has a prime factor",
    "that was not on your list. The argument is short enough to write on a napkin and has never been improved upon.",
    "A computer program is also a kind of story, told to a machine that follows every word exactly.",
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n",
    "The function above adds up a list of numbers and divides by how many there are. It fails on an empty list,",
    "which is the sort of detail that careful programmers learn to notice before their users do.",
])


@pytest.fixture(scope="module")
def smol_logits(smollm2_dir):
    from r1cli.tokenizer import Tokenizer

    ids = Tokenizer.from_folder(smollm2_dir).encode(TEXT)
    assert len(ids) >= 512, len(ids)
    tokens = torch.tensor([ids[:520]])
    out = {}
    for scheme in ("none", "int8", "int4", "int4+head"):
        model = load_model(smollm2_dir, dtype="bfloat16", quant=scheme.removesuffix("+head"), group_size=32,
                           cache=False, quant_head=scheme.endswith("+head"))
        with torch.no_grad():
            out[scheme] = model(tokens).float().log_softmax(-1)[0]
        del model
    return out


def mean_kl(ref_logp, logp) -> float:
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()


@pytest.mark.slow
def test_kl_against_bf16_on_smollm2(smol_logits):
    kl8, kl4 = mean_kl(smol_logits["none"], smol_logits["int8"]), mean_kl(smol_logits["none"], smol_logits["int4"])
    print(f"\nSmolLM2-135M, {smol_logits['none'].shape[0]} tokens: mean KL vs bf16: int8 {kl8:.5f}, int4 g32 {kl4:.5f}")
    assert 0 < kl8 < 0.01
    # (these weights come from a Q4_1 GGUF, groups of 32: int4 g32 re-finds them almost exactly)
    assert 0 < kl4 < 0.05
    # --quant-head: the (tied) head in int8 on top of int4 layers stays within int4's own bar
    kl_head = mean_kl(smol_logits["none"], smol_logits["int4+head"])
    print(f"int4 g32 + int8 head {kl_head:.5f}")
    assert kl4 < kl_head < 0.05


@pytest.mark.slow
@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="no fbgemm in this torch")
def test_kl_against_bf16_on_smollm2_with_the_dynamic_int8_kernel(smollm2_dir, smol_logits):
    """The int8 bar with the kernel decode would use: one token at a time (the dynamic kernel quantizes one row's
    activations; a prompt takes the float path), KL against the bf16 model's logits. The dynamic kernel may be the
    default (quant_formats.DYNAMIC_INT8_KEEPS_QUALITY) only if it holds the bar (measured: it does not, 0.0143)."""
    model = load_model(smollm2_dir, dtype="bfloat16", quant="int8", cache=False)
    assert qf.use_int8_kernel(model, "dynamic") > 0 or qf.int8_kernel() == "dynamic"
    kl = decoded_kl(smollm2_dir, model, smol_logits)
    print(f"\nSmolLM2-135M int8, decoded token by token with the dynamic kernel: mean KL vs bf16 {kl:.5f}")
    assert kl > 0 and (kl < 0.01) == qf.DYNAMIC_INT8_KEEPS_QUALITY, kl


def decoded_kl(smollm2_dir, model, smol_logits) -> float:
    """Mean KL against the bf16 model's logits of `model` decoding TEXT one token at a time."""
    from r1cli.tokenizer import Tokenizer

    tokens = torch.tensor([Tokenizer.from_folder(smollm2_dir).encode(TEXT)[:520]])
    cache, rows = model.new_cache(1, tokens.shape[1]), []
    with torch.no_grad():
        for i in range(tokens.shape[1]):
            rows.append(model(tokens[:, i : i + 1], start_pos=i, cache=cache)[0, -1].float().log_softmax(-1))
    return mean_kl(smol_logits["none"], torch.stack(rows))


@pytest.mark.slow
@pytest.mark.skipif(not qf.cpu_has_vnni(), reason="the mixed int8 policy is used on VNNI CPUs only")
def test_kl_against_bf16_on_smollm2_with_the_mixed_int8_kernels(smollm2_dir, smol_logits):
    """The default int8 policy on a VNNI CPU ("mixed") holds the int8 bar, decoded token by token. SmolLM2's down
    projection is narrower than DOWN_GROUPED_MIN_K: forced onto the grouped dynamic kernel here, so that the bar
    covers what the R1 distills' down projections run."""
    model = load_model(smollm2_dir, dtype="bfloat16", quant="int8", cache=False)
    gate_up = model.model.layers[0].mlp.gate_up_proj.qweight
    if qf.int8_kernel() == "mixed":  # the loader placed it
        assert gate_up.kernel == "dynamic"
    qf.use_int8_kernel(model, "mixed", grouped_min_k=0)
    layer = model.model.layers[0]
    assert layer.mlp.gate_up_proj.qweight.kernel == "dynamic"
    assert (layer.mlp.down_proj.qweight.kernel, layer.mlp.down_proj.qweight.groups) == ("dynamic", qf.DOWN_GROUPS)
    assert layer.self_attn.qkv_proj.qweight.kernel == layer.self_attn.o_proj.qweight.kernel == "pack"
    kl = decoded_kl(smollm2_dir, model, smol_logits)
    print(f"\nSmolLM2-135M int8, decoded token by token, mixed kernels (grouped down): mean KL vs bf16 {kl:.5f}")
    assert 0 < kl < 0.01, kl


@pytest.mark.slow
@pytest.mark.skipif(qf.head_int8_kernel() != "intmm", reason="the int8 head multiplies 8-bit rows on VNNI CPUs only")
def test_kl_against_bf16_on_smollm2_with_the_head_on_8_bit_rows(smollm2_dir, smol_logits):
    """--quant int4's default int8 head on a VNNI CPU rounds each decoded row to 8 bits (torch._int_mm): decoded
    token by token it stays within int4's bar, and the rounding adds less than the int8 bar (what int8 weights may
    cost) to the same model with the packed head (bf16 rows)."""
    model = load_model(smollm2_dir, dtype="bfloat16", quant="int4", cache=False, quant_head=True)
    assert model.lm_head.qweight.kernel == "intmm" and qf.uses_onednn(model)
    kl = decoded_kl(smollm2_dir, model, smol_logits)
    assert qf.use_int8_kernel(model, "pack") == 1 and not qf.uses_onednn(model)
    kl_pack = decoded_kl(smollm2_dir, model, smol_logits)
    print(f"\nSmolLM2-135M int4 g32, decoded token by token: mean KL vs bf16 with the head on 8-bit rows {kl:.5f}, "
          f"on bf16 rows {kl_pack:.5f}")
    assert 0 < kl < 0.05 and 0 < kl - kl_pack < 0.01, (kl, kl_pack)


@pytest.mark.slow
def test_quant_head_is_an_int8_copy_and_the_embedding_keeps_its_dtype(smollm2_dir):
    from r1cli.quant_formats import Int8Weight

    model = load_model(smollm2_dir, dtype="bfloat16", quant="int4", cache=False, quant_head=True)
    assert isinstance(model.lm_head.qweight, Int8Weight) and model.model.embed_tokens.weight.dtype == torch.bfloat16
    ref = model.model.embed_tokens.weight.float()
    assert (model.lm_head.dense_weight(torch.float32) - ref).abs().max() <= ref.abs().amax(1).max() / 127


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "int4", "int4+head"])
def test_greedy_chat_answers_stay_sensible(smollm2_dir, scheme):
    from r1cli.chat_format import build_prompt
    from r1cli.generate import SamplingParams
    from r1cli.options import ModelOptions
    from r1cli.engine import open_model

    m = open_model(ModelOptions(str(smollm2_dir), "cpu", "bfloat16", quant=scheme.removesuffix("+head"), group_size=32,
                   quant_head=scheme.endswith("+head")))
    # (bare "What is the capital of France?" opens with a near tie, "The" vs "L'", 0.1 logit apart even in float32:
    # any rounding change flips it. These three lead with a clear margin.)
    for question, needle in [("What is the capital of France? Answer in one sentence.", "Paris"),
                             ("Name the capital city of France.", "Paris"), ("What is 2 + 2?", "4")]:
        prompt = build_prompt(m.tokenizer, [{"role": "user", "content": question}], family=m.family)
        ids = list(m.decoder.generate(prompt.ids, SamplingParams(temperature=0, max_tokens=32), m.tokenizer.eos_ids))
        assert needle in m.tokenizer.decode(ids), (scheme, question, m.tokenizer.decode(ids))


# --- the disk cache -----------------------------------------------------------------------------------------------


def test_cache_round_trip_skips_the_work_and_survives_corruption(tiny_dirs, tmp_path, monkeypatch):
    folder = tmp_path / "v3"
    shutil.copytree(tiny_dirs["v3"], folder)
    tokens = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(2))
    first = load_model(folder, dtype="bfloat16", quant="int4", group_size=64)
    path = q.cache_path(folder, "int4", 64)
    assert path.is_file() and path.with_suffix(".json").is_file() and path.parent.parent.name == ".r1-quant"
    with torch.no_grad():
        expected = first(tokens)

    from r1cli import weights

    read = []
    real_read = weights.SafetensorsFile.read
    monkeypatch.setattr(weights.SafetensorsFile, "read", lambda self, name, dtype=None, **kw: read.append(name) or real_read(self, name, dtype, **kw))
    monkeypatch.setattr(q, "quantize_int4", lambda *a, **k: pytest.fail("the cache should have been used"))
    second = load_model(folder, dtype="bfloat16", quant="int4", group_size=64)
    ckpt = [n for n in read if not n.endswith((".packed", ".scales_and_zeros"))]
    assert not any(n.endswith(("q_a_proj.weight", "o_proj.weight", "experts.3.up_proj.weight")) for n in ckpt), ckpt
    assert any(n.endswith("embed_tokens.weight") for n in ckpt)  # the rest still comes from the checkpoint
    with torch.no_grad():
        assert torch.equal(second(tokens), expected)
    monkeypatch.undo()
    # kv_a_proj_with_mqa (40 rows) misses the CPU int4 kernel (rows % 16): said once, from the cache too
    assert "kv_a_proj_with_mqa" in first.quant_notice and second.quant_notice == first.quant_notice

    size = path.stat().st_size
    for damage in ("truncate", "garbage-json", "other-settings"):
        if damage == "truncate":
            with open(path, "r+b") as f:
                f.truncate(size // 2)
        elif damage == "garbage-json":
            path.with_suffix(".json").write_text("{not json")
        else:
            meta = json.loads(path.with_suffix(".json").read_text())
            path.with_suffix(".json").write_text(json.dumps({**meta, "group_size": 32}))
        again = load_model(folder, dtype="bfloat16", quant="int4", group_size=64)  # ignored and rebuilt
        with torch.no_grad():
            assert torch.equal(again(tokens), expected)
        assert path.stat().st_size == size and json.loads(path.with_suffix(".json").read_text())["group_size"] == 64

    # a changed checkpoint is a different key: never served stale weights
    (folder / "config.json").touch()
    os.utime(folder / "config.json", ns=(1, 1))
    assert q.cache_path(folder, "int4", 64) != path


def test_a_fifo_in_place_of_the_cache_is_not_opened(tiny_dirs, tmp_path):
    """The cache is read by the safetensors package from a regular file only: a FIFO planted where the cache goes
    (it would block the open) is passed over with a notice, and the model quantizes again."""
    folder = tmp_path / "fifo"
    shutil.copytree(tiny_dirs["qwen2"], folder)
    load_model(folder, dtype="float32", quant="int8")
    path = q.cache_path(folder, "int8", 32)
    path.unlink()
    os.mkfifo(path)
    notices = []
    assert q.read_cache(path, {"scheme": "int8"}, notices) is None
    assert len(notices) == 1 and "not a regular file" in notices[0]


def test_read_only_folder_just_has_no_cache(tiny_dirs, tmp_path):
    folder = tmp_path / "ro"
    shutil.copytree(tiny_dirs["qwen2"], folder)
    folder.chmod(0o555)
    try:
        model = load_model(folder, dtype="bfloat16", quant="int8")
        assert model.model.layers[0].mlp.gate_up_proj.qweight is not None
    finally:
        folder.chmod(0o755)


@pytest.mark.slow
def test_rm_removes_the_quantized_cache(tiny_dirs, tmp_path):
    """Two revisions of a repo in an HF cache, both with quantized caches: `r1 rm repo@rev` removes that one's."""
    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--test--tiny"
    revs = ["a" * 40, "b" * 40]
    for rev in revs:
        snap = repo / "snapshots" / rev
        snap.mkdir(parents=True)
        for f in tiny_dirs["qwen2"].iterdir():
            if f.is_file():
                blob = repo / "blobs" / f"{rev[:4]}{f.name}"
                blob.parent.mkdir(exist_ok=True)
                shutil.copy(f, blob)
                (snap / f.name).symlink_to(os.path.relpath(blob, snap))
        load_model(snap, dtype="bfloat16", quant="int8")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revs[1])
    caches = [repo / "r1-quant" / rev / "int8.safetensors" for rev in revs]
    assert all(c.is_file() for c in caches)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env = {**clean, "PYTHONPATH": str(SRC), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "r1cli", "rm", f"test/tiny@{revs[0][:7]}", "--yes"], env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    assert not caches[0].parent.exists() and caches[1].is_file()
    p = subprocess.run([sys.executable, "-m", "r1cli", "rm", "test/tiny", "--yes"], env=env, capture_output=True,
                       text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    assert not repo.exists()


# --- FP8, memory, sizes, CLI ----------------------------------------------------------------------------------------


def test_fp8_checkpoint_requantizes_like_its_dequantized_twin(tmp_path):
    from test_fp8 import FP8_NAMES, dequant_reference, quantize_block_fp8

    cfg = v3_config(hidden_size=256, intermediate_size=256, moe_intermediate_size=128)
    twin, fp8 = tmp_path / "twin", tmp_path / "fp8"
    write_checkpoint(cfg, twin)
    shutil.copytree(twin, fp8)
    (file,) = twin.glob("*.safetensors")
    tensors = load_file(file)
    quantized, dequantized = {}, {}
    for name, t in tensors.items():
        if t.dim() == 2 and name.split(".")[-2] in FP8_NAMES and "mlp.gate." not in name:
            qt, s = quantize_block_fp8(t)
            quantized[name], quantized[name + "_scale_inv"] = qt, s
            dequantized[name] = dequant_reference(qt, s)
        else:
            quantized[name] = dequantized[name] = t
    save_file(dequantized, file, metadata={"format": "pt"})
    save_file(quantized, fp8 / file.name, metadata={"format": "pt"})
    cfg_json = json.loads((fp8 / "config.json").read_text())
    cfg_json["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (fp8 / "config.json").write_text(json.dumps(cfg_json))
    tokens = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(3))
    for scheme in ("int8", "int4"):
        a = load_model(fp8, dtype="float32", quant=scheme, cache=False, fp8="keep")
        b = load_model(twin, dtype="float32", quant=scheme, cache=False)
        assert a.model.layers[1].mlp.experts.quant["gate_proj"].scheme == scheme
        with torch.no_grad():
            assert torch.allclose(a(tokens), b(tokens), atol=1e-5)


# imports and the code pages of the ops quantizing uses, touched before the baseline
QUANT_WARMUP = """
from r1cli.loader import load_model
from r1cli import quant
for scheme in ("int8", "int4"):
    quant.quantize_tensor(torch.randn(64, 64).bfloat16(), scheme, 32, "cpu")
"""


@pytest.mark.slow
def test_quantized_load_peak_memory(tmp_path):
    folder = tmp_path / "mid"
    write_checkpoint(qwen2_config(vocab_size=8000, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                                  num_attention_heads=8, num_key_value_heads=4), folder)
    m = {}
    for scheme in ("none", "int8", "int4"):
        m[scheme] = measure_load("load_model(sys.argv[1], dtype='bfloat16', quant=sys.argv[2], cache=False)", folder,
                                 scheme, setup=QUANT_WARMUP)
        grew = m[scheme]["grew"]
        print(f"\n{scheme}: peak growth {grew / 1e6:.0f} MB, weights {m[scheme]['weights'] / 1e6:.0f} MB")
        # one tensor at a time: the peak stays below the bf16 model plus allocator slack (measured: int8 ~1.4x
        # its weights, int4 ~1.7-2.4x its own weights, i.e. at most the bf16 model's size)
        assert grew <= 1.15 * m["none"]["weights"] + 24e6, (scheme, m[scheme])
    # (the bf16 embedding and head are 20% of this small model)
    assert m["int8"]["weights"] < 0.68 * m["none"]["weights"] and m["int4"]["weights"] < 0.5 * m["none"]["weights"]
    from r1cli.config import load_config

    args = load_config(folder)
    for scheme in ("int8", "int4"):  # the planner's count is what loading gives
        assert abs(sizes.weight_bytes(args, scheme, 32) - m[scheme]["weights"]) < 0.01 * m[scheme]["weights"]


def test_weight_bytes_for_r1_distill_qwen_7b():
    from r1cli.config import args_from_dict, read_config_json

    args = args_from_dict(read_config_json(HUB_CONFIGS / "DeepSeek-R1-Distill-Qwen-7B"))
    assert 15.0e9 < sizes.weight_bytes(args, "none") < 15.5e9
    assert sizes.weight_bytes(args, "int4", 32) <= 6.5e9  # the memory bar for the weights at int4


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [(["--quant", "int3"], "--quant"), (["--quant", "int4", "--group-size", "48"], "--group-size")])
def test_bad_quant_flags_are_one_line_usage_errors(tiny_dirs, args, needle):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    p = subprocess.run([sys.executable, "-m", "r1cli", "run", str(tiny_dirs["qwen2"]), *args, "hello"], env=env,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr


@pytest.mark.parametrize("name", ["DeepSeek-R1-Distill-Qwen-7B", "DeepSeek-V2-Lite"])
def test_multi_gpu_planner_counts_quantized_weights_as_r1_show_does(name):
    from r1cli.config import load_config
    from r1cli.planner import plan_memory

    args = load_config(HUB_CONFIGS / name)
    for scheme in ("none", "int8", "int4"):
        one = plan_memory(args, 1, 4096, None, 2, sizes.bytes_per_param(scheme, 32))
        assert one.weights == sizes.weight_bytes(args, scheme, 32)
    bf16 = plan_memory(args, 2, 4096, None, 2, sizes.bytes_per_param("none"))
    int4 = plan_memory(args, 2, 4096, None, 2, sizes.bytes_per_param("int4", 32))
    assert int4.weights < 0.75 * bf16.weights  # per GPU, the replicated embedding and head stay bf16


def test_int4_join_refuses_rows_that_split_a_kernel_block():
    """Joining packed int4 weights (q|k|v, gate|up) is exact where the CPU layout's row blocks line up, and refused
    where they would not (the layers then stay apart), checked against the parts' own products."""
    from r1cli.quant_formats import Int4Weight

    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for rows in [(64, 16, 16), (128, 64), (576, 192, 192), (48, 16), (32, 32)]:
        parts = [Int4Weight.from_float(torch.randn(n, 64), 32) for n in rows]
        joined = parts[0].join(parts)
        if parts[0].layout == "cpu" and any(n % 64 for n in rows[:-1]):
            assert joined is None
            continue
        torch.testing.assert_close(joined.matmul(x), torch.cat([p.matmul(x) for p in parts], -1), rtol=0, atol=0)


def test_int4_weights_take_an_int8_head_by_default(steered_dir):
    """With --quant int4 the output head is int8 unless --no-quant-head says otherwise (as llama.cpp's 4-bit mixes
    keep their output matrix at 6-8 bits); other schemes keep a full-precision head unless --quant-head asks."""
    from r1cli.engine import open_model
    from r1cli.options import ModelOptions
    from r1cli.quant_formats import Int8Weight

    assert ModelOptions(quant="int4").head_int8 and not ModelOptions(quant="int4", quant_head=False).head_int8
    assert not ModelOptions(quant="int8").head_int8 and ModelOptions(quant="int8", quant_head=True).head_int8
    assert not ModelOptions().head_int8

    def head(**kw):
        m = open_model(ModelOptions(str(steered_dir), device="cpu", dtype="float32", **kw))
        return getattr(m.decoder.model.lm_head, "qweight", None)

    assert isinstance(head(quant="int4"), Int8Weight)
    assert head(quant="int4", quant_head=False) is None and head() is None


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_count_the_default_int8_head(tmp_path, tied):
    """`r1 show`'s int4 figure is what `--quant int4` loads, int8 head included (sizes.weight_bytes, head_int8)."""
    from r1cli.config import load_config
    from r1cli.loader import load_model

    folder = tmp_path / "m"
    write_checkpoint(qwen2_config(vocab_size=4000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied), folder)
    model = load_model(folder, dtype="bfloat16", quant="int4", cache=False, quant_head=True)
    unique = {t.data_ptr(): t for t in model.state_dict().values()}
    loaded = sum(t.numel() * t.element_size() for t in unique.values())
    args = load_config(folder)
    assert abs(sizes.weight_bytes(args, "int4", 32, head_int8=True) - loaded) < 0.01 * loaded
    assert sizes.quantized_weight_bytes(args, 2)["int4 g32"] == sizes.weight_bytes(args, "int4", 32, head_int8=True)
    assert sizes.weight_bytes(args, "int4", 32) != sizes.weight_bytes(args, "int4", 32, head_int8=True)
