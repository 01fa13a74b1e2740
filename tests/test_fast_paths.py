"""Each fast path computes what the plain path computes: static/compiled decode vs eager, absorbed vs naive MLA,
gathered and grouped vs sorted MoE experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from r1cli.generate import Decoder, SamplingParams
from r1cli.loader import load_model
from tiny import qwen2_config, v2_config, v3_config, write_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, cfg in {"qwen2": qwen2_config(), "v3": v3_config(), "v2": v2_config()}.items():
        folder = tmp_path_factory.mktemp(name)
        write_checkpoint(cfg, folder)
        out[name] = load_model(folder, dtype="float32")
    return out


@pytest.mark.parametrize("cpu_class", ["avx512-bf16", "avx2"])
def test_one_token_steps_skip_onednn_only_where_that_was_measured_faster(models, monkeypatch, cpu_class):
    """cpu.one_token_step: on the avx512-bf16 class each decode step (one token) runs with oneDNN off, so ATen's
    own kernel multiplies its one-row bf16 activations; the prompt (many rows) keeps oneDNN, and the switch is back
    on after every step. Other classes never touch it."""
    from dataclasses import replace

    from r1cli import cpu

    wants_avx512 = cpu_class == "avx512-bf16"
    fake = replace(cpu.features(), avx2=True, avx512=wants_avx512, avx512_bf16=wants_avx512, amx=False)
    assert fake.cpu_class == cpu_class
    monkeypatch.setattr(cpu, "features", lambda: fake)
    model, seen = models["qwen2"], []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0].shape[1], torch._C._get_mkldnn_enabled())), with_kwargs=True)
    try:
        tokens = list(Decoder(model, max_len=64, decode_mode="eager").generate(
            [3, 14, 15, 92, 65, 35], SamplingParams(temperature=0, max_tokens=5, repeat_guard=False)))
    finally:
        hook.remove()
    assert len(tokens) == 5 and torch._C._get_mkldnn_enabled()
    assert seen[0] == (6, True)  # the prompt
    assert seen[1:] == [(1, not wants_avx512)] * 4  # each fed token
    # a model whose own kernels are oneDNN's (an int8 head on 8-bit rows) keeps it on at every step
    from r1cli.quant_formats import uses_onednn

    monkeypatch.setattr("r1cli.generate.uses_onednn", lambda m: True)
    seen.clear()
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(torch._C._get_mkldnn_enabled()), with_kwargs=True)
    try:
        list(Decoder(model, max_len=64, decode_mode="eager").generate([3, 14, 15], SamplingParams(
            temperature=0, max_tokens=3, repeat_guard=False)))
    finally:
        hook.remove()
    assert seen == [True] * 3 and not uses_onednn(model)


@pytest.mark.parametrize("name,mode", [("qwen2", "static"), ("v3", "static"), ("v2", "static")])
def test_decode_modes_match_eager(models, name, mode):
    model = models[name]
    prompt = [3, 14, 15, 92, 65, 35]
    params = SamplingParams(temperature=0, max_tokens=12)
    want = list(Decoder(model, max_len=64, decode_mode="eager").generate(prompt, params))
    got = list(Decoder(model, max_len=64, decode_mode=mode).generate(prompt, params))
    assert got == want


@pytest.mark.slow
def test_compiled_decode_matches_eager_across_buckets_with_one_compile(tmp_path):
    """torch.compile'd decode gives the eager tokens, and crosses cache buckets (256 -> 512 -> 1024 slots)
    without compiling again: the attended length is a dynamic size, so a long reply does not stall for a
    compile at each doubling of its context. (Only the bucket that spans the whole cache compiles once more.)"""
    write_checkpoint(qwen2_config(max_position_embeddings=2048), tmp_path)
    model = load_model(tmp_path, dtype="float32")
    prompt = torch.randint(0, 320, (250,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(temperature=0, max_tokens=270)
    want = list(Decoder(model, max_len=1100, decode_mode="eager").generate(prompt, params))
    torch._dynamo.reset()
    compiled = Decoder(model, max_len=1100, decode_mode="compile")
    got = list(compiled.generate(prompt[:8], SamplingParams(temperature=0, max_tokens=2)))  # compiles at 256 slots
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = list(compiled.generate(prompt, params))
    assert len(got) == 270 and got == want


@pytest.mark.parametrize("name", ["v3", "v2"])
def test_absorbed_mla_equals_naive(models, name):
    model = models[name]
    tokens = torch.randint(0, 320, (2, 15), generator=torch.Generator().manual_seed(0))
    results = {}
    with torch.no_grad():
        for mode in ("naive", "absorbed"):
            for layer in model.model.layers:
                layer.self_attn.mode = mode
            cache = model.new_cache(2, 32)
            first = model(tokens[:, :9], cache=cache)
            rest = model(tokens[:, 9:], start_pos=9, cache=cache)
            results[mode] = torch.cat([first, rest], dim=1)
        for layer in model.model.layers:
            layer.self_attn.mode = "auto"
    assert (results["naive"] - results["absorbed"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["v3", "v2"])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_gathered_and_grouped_experts_equal_sorted(models, name, tokens):
    """The GPU's paths (gathered for decode, grouped GEMMs for prefill) against the per-expert loop; F.grouped_mm
    runs on a CPU in float32, so the same code is checked here."""
    moe = next(layer.mlp for layer in models[name].model.layers if hasattr(layer.mlp, "experts"))
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        weights, indices = moe.gate(x)
        sorted_ = moe.experts._sorted(x, weights, indices)
        for path in ("_gathered", "_grouped"):
            got = getattr(moe.experts, path)(x, weights, indices)
            assert (got - sorted_).abs().max().item() <= 1e-5, path
    assert moe.experts.path(x, indices) == "_sorted"  # a CPU loops (no stall to avoid; float32 per expert)


@pytest.mark.parametrize("name", ["qwen2", "v3"])
def test_static_decode_across_cache_buckets(models, name):
    """Static decode attends over a bucket of the cache (256, 512, ...): crossing a bucket changes nothing."""
    model = models[name]
    prompt = torch.randint(0, 320, (250,), generator=torch.Generator().manual_seed(4)).tolist()
    params = SamplingParams(temperature=0, max_tokens=12)
    want = list(Decoder(model, max_len=600, decode_mode="eager").generate(prompt, params))
    got = list(Decoder(model, max_len=600, decode_mode="static").generate(prompt, params))
    assert got == want


def test_top_p_shortcut_equals_full_sort():
    from r1cli.generate import _top_p_filter

    g = torch.Generator().manual_seed(5)
    for temperature in (0.3, 1.0, 5.0):  # 5.0: a flat distribution whose nucleus exceeds 1024 tokens
        probs = (torch.randn(3, 5000, generator=g) * 4 / temperature).softmax(-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) > 0.95
        want = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        assert torch.equal(_top_p_filter(probs, 0.95), want)


@pytest.mark.parametrize("name", ["qwen2", "v2"])
def test_chunked_prefill_equals_one_pass(models, name):
    prompt = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(6)).tolist()
    params = SamplingParams(temperature=0, max_tokens=8)
    want = list(Decoder(models[name], max_len=64).generate(prompt, params))
    got = list(Decoder(models[name], max_len=64, prefill_chunk=7).generate(prompt, params))
    assert got == want


def test_cpu_bf16_prompt_matmul_through_float32_matches(monkeypatch):
    """On CPUs without bf16 math, prompt-sized bf16 matmuls run through float32: same result, closer to exact."""
    from r1cli.models import layers

    lin = layers.Linear(96, 80, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(80, 96) * 0.1)
        lin.bias.copy_(torch.randn(80))
    lin = lin.to(torch.bfloat16)
    x = torch.randn(2, 40, 96).to(torch.bfloat16)
    exact = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    monkeypatch.setattr(layers, "CPU_BF16_UPCAST_ROWS", 32)
    upcast = lin(x)
    monkeypatch.setattr(layers, "CPU_BF16_UPCAST_ROWS", None)
    plain = lin(x)
    assert upcast.dtype == plain.dtype == torch.bfloat16
    assert (upcast.float() - exact).abs().max() <= (plain.float() - exact).abs().max() + 1e-6
    assert (upcast.float() - plain.float()).abs().max() <= 0.1


@pytest.mark.parametrize("name", ["qwen2", "v2"])
def test_cpu_float32_kv_cache_for_bf16_models(monkeypatch, tmp_path, name):
    """A bf16 model on a CPU without bf16 math keeps its KV cache (dense k/v, MLA's latent) in float32 (attention
    there is 4-6x faster): the decoded logits (absorbed MLA for v2) stay those of the bf16 model, no further from
    the float32 model than with a bf16 cache. With bf16 math the cache keeps the model's dtype."""
    from r1cli.models import layers

    write_checkpoint(qwen2_config() if name == "qwen2" else v2_config(), tmp_path)
    exact_model = load_model(tmp_path, dtype="float32")
    model = load_model(tmp_path, dtype="bfloat16")
    prompt = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79] * 3])  # over 16 tokens: MLA's prefill takes the naive form

    def decode(m):
        cache = m.new_cache(1, 32)
        with torch.no_grad():
            m(prompt, start_pos=0, cache=cache)
            return cache.layers[0][0].dtype, m(torch.tensor([[7]]), start_pos=prompt.shape[1], cache=cache)[0, -1]

    _, exact = decode(exact_model)
    from r1cli import cpu

    monkeypatch.setattr(layers, "CPU_BF16_UPCAST_ROWS", 32)
    monkeypatch.setattr(cpu, "BF16_UPCAST_ROWS", 32)  # the CPU module decides the cache dtype
    dtype32, logits32 = decode(model)
    monkeypatch.setattr(layers, "CPU_BF16_UPCAST_ROWS", None)
    monkeypatch.setattr(cpu, "BF16_UPCAST_ROWS", None)
    dtype16, logits16 = decode(model)
    assert (dtype32, dtype16) == (torch.float32, torch.bfloat16)
    err32, err16 = (logits32 - exact).abs().max(), (logits16 - exact).abs().max()
    assert err32 <= err16 * 1.5 + 1e-3, (err32, err16)
    assert err32 < 0.1 * exact.abs().max()


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_joined_projections_compute_what_the_separate_ones_do(tmp_path, quant):
    """q|k|v and gate|up joined into one matmul each (the loaders' default) against the checkpoint's separate
    modules: the same logits, prompt and cached decode, for a biased Qwen2 and for V3 (dense and shared-expert MLPs)."""
    # (q 128 rows, k and v 64: whole blocks of the CPU int4 layout, so int4 joins too)
    for name, cfg in {"qwen2": qwen2_config(hidden_size=128, num_attention_heads=4, intermediate_size=128),
                      "v3": v3_config()}.items():
        folder = tmp_path / name
        write_checkpoint(cfg, folder)
        dtype = "float32" if quant == "none" else "bfloat16"
        joined = load_model(folder, dtype=dtype, quant=quant, cache=False)
        apart = load_model(folder, dtype=dtype, quant=quant, cache=False, fuse=False)
        if name == "qwen2":
            assert joined.model.layers[0].self_attn.qkv_proj is not None and not hasattr(joined.model.layers[0].self_attn, "q_proj")
            assert apart.model.layers[0].self_attn.qkv_proj is None
            assert joined.model.layers[0].mlp.gate_up_proj is not None
        tokens = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            outs = []
            for m in (joined, apart):
                cache = m.new_cache(1, 32)
                outs.append((m(tokens[:, :-1], cache=cache), m(tokens[:, -1:], start_pos=11, cache=cache)))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5 if quant == "none" else 0.0)


@pytest.mark.parametrize("queries", [1, 5])
def test_masked_gqa_without_enable_gqa_equals_sdpa(queries):
    """The GPU's masked grouped-query attention (query heads as rows of their key/value head for one query, key/value
    heads repeated for more) against SDPA's own enable_gqa, with a mask like the static decode's and the chunked
    prefill's (padding and causal)."""
    from r1cli.models.attention import attention_mask, masked_gqa, sdpa

    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 6, queries, 16, generator=g)
    k, v = torch.randn(2, 2, 20, 16, generator=g), torch.randn(2, 2, 20, 16, generator=g)
    key_valid = torch.rand(2, 20, generator=g) > 0.3
    mask = attention_mask(20 - queries, queries, key_valid, q.device)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    assert (masked_gqa(q, k, v, mask, 0.25) - want).abs().max().item() <= 1e-6
    assert (sdpa(q, k, v, mask, 0.25) - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_one_query_gqa_on_cpu_equals_enable_gqa(dtype, masked):
    """A CPU decode step's attention (one query: sdpa takes the query heads as rows of their key/value head) against
    SDPA's own enable_gqa, bf16 as a bf16 model's cache is on a CPU with bf16 math, with and without the static
    step's mask; the shapes of SmolLM2 (9 query heads over 3) and R1-Distill-Qwen-1.5B (12 over 2, 128 wide)."""
    from r1cli.models.attention import attention_mask, sdpa

    g = torch.Generator().manual_seed(7)
    for heads, kv_heads, dim in ((9, 3, 64), (12, 2, 128)):
        q = torch.randn(1, heads, 1, dim, generator=g).to(dtype)
        k, v = (torch.randn(1, kv_heads, 40, dim, generator=g).to(dtype) for _ in range(2))
        mask = attention_mask(39, 1, None, q.device, sliding_window=20) if masked else None
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=dim ** -0.5,
                                              enable_gqa=True)
        got = sdpa(q, k, v, mask, dim ** -0.5)
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 1e-6)
