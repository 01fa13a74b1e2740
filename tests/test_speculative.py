"""Speculative decoding (speculative.py): greedy output identical token for token to plain decoding with a draft
model and with DeepSeek's MTP layer (float32, int4, FP8), and the sampled accept/resample rule checked to follow
the target's distribution (a chi-square test that a deliberately wrong rule fails)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import qwen2_config, v3_config, write_checkpoint

from r1cli.generate import Decoder, SamplingParams
from r1cli.loader import Checkpoint, load_model
from r1cli.speculative import ModelDraft, MTPDraft, SpeculativeDecoder, accept

GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    """A tiny Qwen2 target and a smaller, unrelated Qwen2 draft with the same vocabulary (320 ids)."""
    target, draft = tmp_path_factory.mktemp("target"), tmp_path_factory.mktemp("draft")
    # hidden 128 so the int4 kernel takes the layers
    write_checkpoint(qwen2_config(hidden_size=128, intermediate_size=256), target, seed=1)
    write_checkpoint(qwen2_config(hidden_size=64, num_hidden_layers=1), draft, seed=2)
    return target, draft


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 320, (n,), generator=g).tolist() for n in (5, 17)]


def plain(model, prompt, params=GREEDY, stop=frozenset()):
    return list(Decoder(model, 256).generate(prompt, params, stop))


def noisy_copy(folder, scale):
    """The target with noise on every weight: a draft that agrees often but not always."""
    model = load_model(folder, dtype="float32")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return model


@pytest.mark.parametrize("draft_kind", ["self", "noisy", "other"])
@pytest.mark.parametrize("quant", ["none", "int4"])
def test_greedy_with_a_draft_model_is_plain_decoding(qwen_pair, draft_kind, quant):
    target_dir, draft_dir = qwen_pair
    target = load_model(target_dir, dtype="float32", quant=quant, cache=False)
    draft = {"self": lambda: load_model(target_dir, dtype="float32", quant=quant, cache=False),
             "noisy": lambda: noisy_copy(target_dir, 0.3),
             "other": lambda: load_model(draft_dir, dtype="float32")}[draft_kind]()
    # the adaptive k would draft one token for a draft as large as the target: a fixed k = 4 here
    spec = SpeculativeDecoder(Decoder(target, 256), ModelDraft(draft, 256), max_k=4, adaptive=False)
    for prompt in prompts():
        want = plain(target, prompt)
        got = list(spec.generate(prompt, GREEDY))
        assert got == want
        s = spec.stats
        assert s.generated_tokens == len(want) and s.draft_tokens > 0
        if draft_kind == "self":
            assert s.accepted_tokens == s.draft_tokens and s.tokens_per_step > 3
        if draft_kind == "other":
            assert s.tokens_per_step < 1.5


def test_second_turn_reuses_both_caches_and_stops_at_a_stop_id(qwen_pair):
    target_dir, _ = qwen_pair
    target = load_model(target_dir, dtype="float32")
    spec = SpeculativeDecoder(Decoder(target, 256), ModelDraft(noisy_copy(target_dir, 0.3), 256))
    p1, p2 = prompts()
    first = list(spec.generate(p1, GREEDY))
    stop = first[7]
    turn2 = p1 + first + p2
    want = plain(target, turn2, stop={stop})
    got = list(spec.generate(turn2, GREEDY, {stop}))
    assert got == want and spec.stats.cached_tokens > len(p1)
    budget = SamplingParams(temperature=0.0, max_tokens=9)
    assert list(spec.generate(p2, budget)) == plain(target, p2, budget)


# --- DeepSeek's MTP layer --------------------------------------------------------------------------------------


def add_mtp(folder: Path, n_layers: int, fp8: bool = False, seed: int = 5) -> None:
    """Give a tiny V3 checkpoint an MTP layer `model.layers.{n_layers}.*` in the Hub's layout: a copy of its last
    (MoE) layer, perturbed, plus enorm, hnorm, eh_proj, shared_head.norm and the embedding and head copies."""
    files = sorted(folder.glob("*.safetensors"))
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    g = torch.Generator().manual_seed(seed)
    last = f"model.layers.{n_layers - 1}."
    mtp = {}
    for name, t in tensors.items():
        if name.startswith(last) and not name.endswith("_scale_inv"):
            new = f"model.layers.{n_layers}." + name[len(last):]
            if t.dtype == torch.float8_e4m3fn:
                mtp[new], mtp[new + "_scale_inv"] = t.clone(), tensors[name + "_scale_inv"].clone()
            else:
                mtp[new] = (t.float() * (1 + 0.2 * torch.randn(t.shape, generator=g))).to(t.dtype)
    dim = tensors["model.norm.weight"].shape[0]
    dtype = tensors["model.norm.weight"].dtype
    p = f"model.layers.{n_layers}."
    mtp[p + "enorm.weight"] = (1 + 0.2 * torch.randn(dim, generator=g)).to(dtype)
    mtp[p + "hnorm.weight"] = (1 + 0.2 * torch.randn(dim, generator=g)).to(dtype)
    mtp[p + "shared_head.norm.weight"] = (1 + 0.2 * torch.randn(dim, generator=g)).to(dtype)
    eh = 0.08 * torch.randn(dim, 2 * dim, generator=g)
    if fp8:
        from test_fp8 import quantize_block_fp8

        mtp[p + "eh_proj.weight"], mtp[p + "eh_proj.weight_scale_inv"] = quantize_block_fp8(eh)
    else:
        mtp[p + "eh_proj.weight"] = eh.to(dtype)
    mtp[p + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    mtp[p + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(mtp, str(folder / "mtp.safetensors"), metadata={"format": "pt"})
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {
        "metadata": {}, "weight_map": {k: files[0].name for k in tensors}}
    index["weight_map"].update({k: "mtp.safetensors" for k in mtp})
    index_path.write_text(json.dumps(index))
    config = json.loads((folder / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def v3_mtp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v3mtp")
    cfg = v3_config(hidden_size=128, intermediate_size=256, moe_intermediate_size=64)
    write_checkpoint(cfg, folder, seed=4)
    add_mtp(folder, cfg.num_hidden_layers)
    return folder


@pytest.fixture(scope="module")
def v3_mtp_fp8(tmp_path_factory):
    from test_fp8 import write_fp8_pair

    cfg = v3_config(hidden_size=160, intermediate_size=288, moe_intermediate_size=144, kv_lora_rank=72,
                    q_lora_rank=136, qk_nope_head_dim=32, qk_rope_head_dim=8, v_head_dim=24)
    fp8, _ = write_fp8_pair(cfg, tmp_path_factory.mktemp("twin"), tmp_path_factory.mktemp("fp8"))
    add_mtp(fp8, cfg.num_hidden_layers, fp8=True)
    return fp8


def test_mtp_layer_loads_and_is_skipped_without_mtp(v3_mtp):
    plain_model = load_model(v3_mtp, dtype="float32")
    assert plain_model.mtp is None
    model = load_model(v3_mtp, dtype="float32", mtp=True)
    n = model.args.n_layers
    tensors = load_file(v3_mtp / "mtp.safetensors")
    assert torch.equal(model.mtp.eh_proj.weight, tensors[f"model.layers.{n}.eh_proj.weight"])
    assert torch.equal(model.mtp.enorm.weight, tensors[f"model.layers.{n}.enorm.weight"])
    assert torch.equal(model.mtp.mlp.experts.gate_proj[3], tensors[f"model.layers.{n}.mlp.experts.3.gate_proj.weight"])
    # the main model is the same with or without it
    tokens = torch.randint(0, 320, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), plain_model(tokens))


def test_mtp_forward_matches_its_definition_with_transformers_decoder_layer(v3_mtp):
    """The MTP layer against transformers' own DeepseekV3DecoderLayer carrying the same weights, with enorm, hnorm,
    eh_proj and the shared head written out from the definition (DeepSeek-V3 report, section 2.2)."""
    from transformers import AutoConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RotaryEmbedding

    model = load_model(v3_mtp, dtype="float32", mtp=True, fuse=False)
    config = AutoConfig.from_pretrained(v3_mtp)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    n = config.num_hidden_layers
    layer = DeepseekV3DecoderLayer(config, n).eval()
    tensors = load_file(v3_mtp / "mtp.safetensors")
    prefix = f"model.layers.{n}."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    E = config.n_routed_experts  # transformers 5 stacks the experts: gate|up joined, then down
    state["mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([state[f"mlp.experts.{e}.gate_proj.weight"], state[f"mlp.experts.{e}.up_proj.weight"]]) for e in range(E)])
    state["mlp.experts.down_proj"] = torch.stack([state[f"mlp.experts.{e}.down_proj.weight"] for e in range(E)])
    missing, _ = layer.load_state_dict(state, strict=False)
    assert not missing
    T = 9
    tokens = torch.randint(0, 320, (1, T + 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.keep_hidden = True
        model(tokens[:, :T])
        hidden = model.hidden  # final normed hidden states h_0..h_{T-1}
        ours, _ = model.mtp_forward(tokens[:, 1:], hidden, 0, model.new_mtp_cache(32))

        def rms(x, w, eps=config.rms_norm_eps):
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

        emb = tensors[prefix + "embed_tokens.weight"][tokens[:, 1:]]
        emb[:, 0] = 0
        x = torch.cat([rms(emb, state["enorm.weight"]), rms(hidden, state["hnorm.weight"])], -1) @ state["eh_proj.weight"].T
        positions = torch.arange(T)[None]
        rope = DeepseekV3RotaryEmbedding(config)(x, positions)
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        out = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        out = out[0] if isinstance(out, tuple) else out
        want = rms(out, state["shared_head.norm.weight"]) @ tensors[prefix + "shared_head.head.weight"].T
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["float32", "int4", "fp8-keep"])
def test_greedy_with_mtp_is_plain_decoding(v3_mtp, v3_mtp_fp8, variant):
    if variant == "fp8-keep":
        model = load_model(v3_mtp_fp8, dtype="float32", fp8="keep", mtp=True)
    else:
        model = load_model(v3_mtp, dtype="float32", quant="none" if variant == "float32" else variant, mtp=True)
    spec = SpeculativeDecoder(Decoder(model, 256), MTPDraft(model, 256))
    for prompt in prompts():
        want = plain(model, prompt)
        got = list(spec.generate(prompt, GREEDY))
        assert got == want
        assert spec.stats.draft_tokens > 0
    # a second turn on the warm caches
    p1, p2 = prompts()
    turn2 = p1 + got + p2
    assert list(spec.generate(turn2, GREEDY)) == plain(model, turn2)


def test_mtp_refused_without_the_layer(qwen_pair):
    from r1cli.errors import UsageError

    with pytest.raises(UsageError, match="no multi-token-prediction layer"):
        Checkpoint(qwen_pair[0]).load_model(dtype="float32", mtp=True)


# --- the sampled rule ------------------------------------------------------------------------------------------

V = 6


def wrong_accept(target_logits, drafts, q, params, generator):
    """A plausible mistake: on rejection draw from p itself instead of the residual max(0, p - q)."""
    from r1cli.generate import draw, sampling_probs

    p = sampling_probs(target_logits, params)
    for j, d in enumerate(drafts):
        if torch.rand(1, generator=generator).item() < (p[j, d] / q[j, d]).item():
            continue
        return j, int(draw(p[j : j + 1], generator))
    return len(drafts), int(draw(p[len(drafts) :], generator))


def first_two_tokens(rule, n_draws: int, seed: int = 0):
    """Counts of the first two emitted tokens (a V x V table) of one speculative step with k = 2, for a fixed
    target (whose second distribution depends on the first token) and a draft far from it."""
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=1.0, top_p=1.0)
    p1 = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05])
    p2 = torch.stack([torch.roll(p1, i) for i in range(V)])  # the target's next-token law after token i
    q1 = torch.tensor([0.05, 0.10, 0.10, 0.15, 0.25, 0.35])
    q2 = torch.tensor([0.40, 0.05, 0.05, 0.10, 0.10, 0.30])
    counts = torch.zeros(V, V)
    for _ in range(n_draws):
        d1 = int(torch.multinomial(q1, 1, generator=g))
        d2 = int(torch.multinomial(q2, 1, generator=g))
        # the target's rows: at the last committed token (p1), after d1 (p2[d1]), after d2 (unused: only two kept)
        logits = torch.stack([p1.log(), p2[d1].log(), p2[d2].log()])
        n, nxt = rule(logits, [d1, d2], torch.stack([q1, q2]), params, g)
        emitted = [d1, d2][:n] + [nxt]
        if len(emitted) == 1:  # the first rejected: the second token comes from the target after it
            emitted.append(int(torch.multinomial(p2[emitted[0]], 1, generator=g)))
        counts[emitted[0], emitted[1]] += 1
    expected = (p1[:, None] * p2) * n_draws
    return counts, expected


def chi_square_p_value(counts, expected) -> float:
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = counts.numel() - 1
    # Wilson-Hilferty: the chi-square tail through a normal one
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_sampled_rule_follows_the_target_distribution_and_a_wrong_rule_fails():
    counts, expected = first_two_tokens(accept, 6000)
    assert chi_square_p_value(counts, expected) > 1e-3
    tv = 0.5 * float((counts / counts.sum() - expected / expected.sum()).abs().sum())
    assert tv < 0.04
    wrong, expected = first_two_tokens(wrong_accept, 6000)
    assert chi_square_p_value(wrong, expected) < 1e-6


def test_sampled_generation_runs_and_is_seeded(qwen_pair):
    target_dir, _ = qwen_pair
    target = load_model(target_dir, dtype="float32")
    spec = SpeculativeDecoder(Decoder(target, 256), ModelDraft(noisy_copy(target_dir, 0.1), 256))
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=30, seed=7)
    a = list(spec.generate(prompts()[0], params))
    b = list(spec.generate(prompts()[0], params))
    assert a == b and len(a) == 30 and 0 < spec.stats.accepted_tokens <= spec.stats.draft_tokens


# --- the command line ------------------------------------------------------------------------------------------


def test_run_with_a_draft_gives_the_same_answer_and_reports_acceptance(steered_dir):
    import steered
    from typer.testing import CliRunner

    from r1cli.cli import app

    plain_run = CliRunner().invoke(app, ["run", str(steered_dir), "--json", "--temperature", "0", "How many pears?"])
    result = CliRunner().invoke(app, ["run", str(steered_dir), "--json", "--temperature", "0",
                                      "--draft", str(steered_dir), "How many pears?"])
    assert result.exit_code == 0, result.output
    data, want = json.loads(result.stdout), json.loads(plain_run.stdout)
    assert (data["reasoning"], data["content"]) == (steered.REASONING, steered.ANSWER)
    assert data["usage"] == want["usage"]
    t = data["timings"]
    assert t["acceptance_rate"] == 1.0 and t["tokens_per_step"] > 1
    assert "acceptance_rate" not in want["timings"]


@pytest.mark.slow
def test_a_draft_with_another_tokenizer_is_refused(steered_dir, tmp_path):
    import shutil

    from helpers import one_line_error, r1_env, run_r1

    other = tmp_path / "other"
    shutil.copytree(steered_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same size, another vocabulary
    (other / "tokenizer.json").write_text(json.dumps(tok))
    p = run_r1("run", steered_dir, "--draft", other, "hi", env=r1_env(tmp_path))
    line = one_line_error(p, 2)
    assert "another tokenizer" in line and "--draft" in line
    p = run_r1("run", steered_dir, "--mtp", "hi", env=r1_env(tmp_path))
    assert "no multi-token-prediction layer" in one_line_error(p, 2)


def test_bench_with_a_draft_reports_acceptance(steered_dir):
    from r1cli.bench import format_report, run_bench

    report = run_bench(str(steered_dir), device="cpu", dtype="float32", prompt_lengths=(8,), new_tokens=12,
                       draft=str(steered_dir))
    _, spec_result = report["results"]
    assert spec_result["engine"] == "r1 + draft" and spec_result["acceptance_rate"] == 1.0
    assert spec_result["tokens_per_step"] > 1 and "decode_with_draft" in report["ratios"]
    assert "accepted" in format_report(report)


def test_show_says_whether_a_checkpoint_has_an_mtp_layer(v3_mtp, qwen_pair):
    from r1cli import hub
    from r1cli.registry import resolve_name

    assert hub.show(resolve_name(str(v3_mtp)))["mtp_layers"] == 1
    assert hub.show(resolve_name(str(qwen_pair[0])))["mtp_layers"] == 0


def test_chat_footer_shows_acceptance_only_with_a_draft():
    from r1cli.events import TurnStats
    from r1cli.repl.render import footer

    assert "draft 78% accepted, 2.41 tokens/step" in footer(TurnStats(acceptance_rate=0.78, tokens_per_step=2.41))
    assert "draft" not in footer(TurnStats())


def test_repetition_penalty_applies_per_verified_position(qwen_pair):
    """Merged with generate.py's repetition penalty: each verify row is penalised by the tokens before it (the
    committed ones and the drafts ahead of it), so greedy output stays plain decoding's."""
    import dataclasses

    if "repetition_penalty" not in {f.name for f in dataclasses.fields(SamplingParams)}:
        pytest.skip("this branch predates generate.py's repetition_penalty (runs once merged with main)")
    target_dir, _ = qwen_pair
    target = load_model(target_dir, dtype="float32")
    spec = SpeculativeDecoder(Decoder(target, 256), ModelDraft(noisy_copy(target_dir, 0.3), 256), max_k=4,
                                adaptive=False)
    params = SamplingParams(temperature=0.0, max_tokens=40, repetition_penalty=1.5)
    for prompt in prompts():
        want = plain(target, prompt, params)
        assert want != plain(target, prompt)  # the penalty changes the text
        assert list(spec.generate(prompt, params)) == want
