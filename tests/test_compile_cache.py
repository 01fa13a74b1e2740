"""The compiled CPU decode step (aot_step.py) and its on-disk cache (compile_cache.py): the compiled step gives the
eager step's tokens (greedy, float32); a second process loads the first one's package and exports nothing; a step
that fails to export, to compile or to match the eager step leaves decoding eager, said once, and is not tried
again; only a private regular file in a private folder is ever loaded; `auto` compiles on a CPU unless R1_COMPILE=0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import steered
from helpers import r1_env, run_r1
from tiny import llama_config, qwen2_config, v3_config, write_checkpoint

from r1cli import aot_step, compile_cache
from r1cli.generate import Decoder, SamplingParams

PROMPT, PARAMS = [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=12, repeat_guard=False)

CHILD = """
import json, sys
from r1cli import aot_step
from r1cli.generate import Decoder, SamplingParams
from r1cli.loader import load_model

model = load_model(sys.argv[1], dtype="float32")
params = SamplingParams(temperature=0, max_tokens=12, repeat_guard=False)
eager = list(Decoder(model, max_len=64, decode_mode="eager").generate([1, 2, 3, 4], params))
if sys.argv[2] == "later":  # the package from the first process: nothing to export
    aot_step.export_step = lambda *a: (_ for _ in ()).throw(AssertionError("exported again"))
gen = Decoder(model, max_len=64, decode_mode="auto")
first = list(gen.generate([1, 2, 3, 4], params))
compiled_at_once = gen._step.compiled
if gen._step.build is not None:
    gen._step.build.join()  # the background compile
second = list(gen.generate([1, 2, 3, 4], params))
print(json.dumps({"eager": eager, "first": first, "second": second, "at_once": compiled_at_once,
                  "compiled": gen._step.compiled}))
"""


@pytest.mark.slow
def test_a_second_process_starts_the_compiled_step_from_the_package(tmp_path):
    folder = tmp_path / "tiny"
    write_checkpoint(llama_config(num_hidden_layers=1), folder)
    runs = []
    for i, which in enumerate(("first", "later")):  # a fresh Inductor folder each time: only r1's file carries over
        env = r1_env(tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"ind{i}"))
        env.pop("R1_COMPILE", None)  # the default: compile on a CPU
        p = subprocess.run([sys.executable, "-c", CHILD, str(folder), which], capture_output=True, text=True, env=env,
                           timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append((json.loads(p.stdout.strip().splitlines()[-1]), p.stderr))
    (first, first_err), (later, later_err) = runs
    # first process: eager while the background compile runs, then the compiled step, same tokens
    assert first["compiled"] and not first["at_once"]
    assert first["first"] == first["eager"] and first["second"] == first["eager"]
    assert first_err.count(aot_step.AotDecoder.BUILDING) == 1
    files = list((tmp_path / "xdg" / "r1cli" / "compile").iterdir())
    assert [f.suffix for f in files] == [".pt2"] and files[0].stat().st_mode & 0o777 == 0o600
    # later process: compiled from its first token, nothing exported or announced, the same tokens
    assert later["at_once"] and later["first"] == later["eager"] == first["eager"]
    assert aot_step.AotDecoder.BUILDING not in later_err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from r1cli.loader import load_model

    folder = tmp_path_factory.mktemp("tiny-aot")
    write_checkpoint(llama_config(num_hidden_layers=1), folder)
    return load_model(folder, dtype="float32")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("R1_COMPILE", raising=False)  # the default: compile on a CPU
    monkeypatch.setattr(aot_step, "_announced", set())
    return tmp_path / "r1cli" / "compile"


def test_a_step_that_does_not_export_decodes_eagerly_said_once_and_not_tried_again(tiny_model, fresh_cache,
                                                                                    monkeypatch, capsys):
    want = list(Decoder(tiny_model, max_len=64, decode_mode="eager").generate(PROMPT, PARAMS))
    tries = []

    def no_export(*args):
        tries.append(1)
        raise RuntimeError("an op export cannot take")

    monkeypatch.setattr(aot_step, "export_step", no_export)
    for _ in range(2):
        gen = Decoder(tiny_model, max_len=64, decode_mode="auto")
        assert list(gen.generate(PROMPT, PARAMS)) == want and not gen._step.compiled
        assert list(gen.generate(PROMPT, PARAMS)) == want
    assert tries == [1]  # the second Decoder read the failure from the cache folder
    marker = next(fresh_cache.glob("*.failed"))
    assert "RuntimeError: an op export cannot take" in marker.read_text() and marker.stat().st_mode & 0o777 == 0o600
    err = capsys.readouterr().err.splitlines()
    assert err == [aot_step.AotDecoder.BUILDING,
                   "r1: the decode step did not compile on this machine (RuntimeError); decoding eagerly"]


def test_a_failed_background_compile_leaves_the_eager_step(tiny_model, fresh_cache, monkeypatch, capsys):
    """(The export runs for real here: a second or two on a one-layer model.)"""
    want = list(Decoder(tiny_model, max_len=64, decode_mode="eager").generate(PROMPT, PARAMS))

    def no_compiler(key, exported):
        assert isinstance(exported, torch.export.ExportedProgram)
        raise OSError("no C++ compiler")

    monkeypatch.setattr(compile_cache, "store_package", no_compiler)
    gen = Decoder(tiny_model, max_len=64, decode_mode="auto")
    assert list(gen.generate(PROMPT, PARAMS)) == want
    if gen._step.build is not None:  # (else it failed before the first reply ended, and was noticed)
        gen._step.build.join()
    assert list(gen.generate(PROMPT, PARAMS)) == want and not gen._step.compiled
    assert gen._step.build is None and "OSError: no C++ compiler" in next(fresh_cache.glob("*.failed")).read_text()
    assert capsys.readouterr().err.count("did not compile on this machine (OSError)") == 1


def test_a_package_that_computes_something_else_is_dropped_at_its_first_token(tiny_model, fresh_cache, monkeypatch,
                                                                              capsys):
    want = list(Decoder(tiny_model, max_len=64, decode_mode="eager").generate(PROMPT, PARAMS))
    calls = []

    def wrong_load(path, step):
        def wrong_runner(token, slot, span):
            calls.append(int(slot))
            for name, buf in step.named_buffers():  # and garbage in the cache slot it writes
                if name.startswith("kv_"):
                    buf.narrow(2, int(slot), 1).fill_(1e3)
            return torch.randn(1, tiny_model.args.vocab_size)

        return wrong_runner, {}

    monkeypatch.setattr(compile_cache, "package", lambda key: fresh_cache / "some.pt2")
    monkeypatch.setattr(aot_step, "load", wrong_load)
    gen = Decoder(tiny_model, max_len=64, decode_mode="auto")
    assert gen.decode_mode == "aot"
    assert list(gen.generate(PROMPT, PARAMS)) == want
    assert calls == [len(PROMPT)] and not gen._step.compiled  # checked once, then never called again
    assert "did not compile on this machine (ValueError)" in capsys.readouterr().err
    assert "differ from the eager step's" in next(fresh_cache.glob("*.failed")).read_text()


def noisy_load(errors: list[float], calls: list[int]):
    """A stand-in package: the eager step's logits off by the next relative L2 error in `errors` (the last one
    repeated), as bf16 rounding in fused kernels makes them differ."""
    def load(path, step):
        cache = aot_step.Cache([tuple(getattr(step, f"kv_{i}_{j}") for j in range(step.width))
                                for i in range(step.n_layers)], step.max_len, step.slot_dim)

        def runner(token, slot, span):
            calls.append(int(slot))
            exact = step.model(token, start_pos=int(slot), cache=cache, last_only=True)[:, -1].float()
            noise = torch.randn(exact.shape, generator=torch.Generator().manual_seed(len(calls)))
            return exact + noise / noise.norm() * exact.norm() * errors[min(len(calls), len(errors)) - 1]

        return runner, {}

    return load


@pytest.mark.parametrize("errors, kept, checked", [
    ([0.01], True, 1),  # the usual first token: passes at once
    ([0.08, 0.02, 0.03, 0.02], True, 4),  # a first token in bf16's tail (measured up to 0.15): the mean of 4 passes
    ([0.12], False, 4),  # every token off a little (two layers' weights swapped gave 0.14-0.25): dropped
    ([0.2], False, 2),  # dropped as soon as the mean of four can no longer pass
])
def test_the_first_tokens_check_tells_rounding_from_a_wrong_package(tiny_model, fresh_cache, monkeypatch, capsys,
                                                                   errors, kept, checked):
    want = list(Decoder(tiny_model, max_len=64, decode_mode="eager").generate(PROMPT, PARAMS))
    calls = []
    monkeypatch.setattr(compile_cache, "package", lambda key: fresh_cache / "some.pt2")
    monkeypatch.setattr(aot_step, "load", noisy_load(errors, calls))
    gen = Decoder(tiny_model, max_len=64, decode_mode="auto")
    out = list(gen.generate(PROMPT, PARAMS))
    assert gen._step.compiled == kept and gen._step.check_errors == pytest.approx(
        (errors + errors[-1:] * checked)[:checked], rel=1e-3)
    if kept:  # every token after the check from the package
        assert len(calls) == PARAMS.max_tokens - 1
    else:
        assert out == want and len(calls) == checked and "did not compile" in capsys.readouterr().err


def test_auto_compiles_on_a_cpu_unless_told_not_to(tiny_model, monkeypatch):
    monkeypatch.delenv("R1_COMPILE", raising=False)
    assert Decoder(tiny_model, max_len=64).decode_mode == "aot"
    assert Decoder(tiny_model, max_len=64, decode_mode="compile").decode_mode == "aot-wait"
    assert Decoder(tiny_model, max_len=64, decode_mode="eager").decode_mode == "eager"
    monkeypatch.setenv("R1_COMPILE", "0")
    assert Decoder(tiny_model, max_len=64).decode_mode == "eager"


def test_auto_decodes_eagerly_and_quietly_what_cannot_export(tiny_model, tmp_path, monkeypatch, capsys):
    """MoE routing and fbgemm's packed int8 weights do not export: the default knows before trying, so nothing is
    compiled, announced or marked failed; an exportable model still gets the compiled step."""
    from r1cli.loader import load_model
    from r1cli.quant import quantize_model
    from r1cli.quant_formats import use_int8_kernel

    monkeypatch.delenv("R1_COMPILE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    write_checkpoint(v3_config(num_hidden_layers=2), tmp_path / "v3")
    moe = load_model(tmp_path / "v3", dtype="float32")
    assert aot_step.not_exportable(moe) == "routed experts"
    assert Decoder(moe, max_len=64).decode_mode == "eager"
    write_checkpoint(llama_config(num_hidden_layers=1), tmp_path / "llama")
    int8 = load_model(tmp_path / "llama", dtype="float32")
    quantize_model(int8, "int8")
    assert aot_step.not_exportable(int8) is None  # the packed kernel exports
    use_int8_kernel(int8, "dynamic")
    assert aot_step.not_exportable(int8) == "int8 weights on the dynamic kernel"
    capsys.readouterr()  # (the checkpoint writer's progress)
    gen = Decoder(int8, max_len=64)
    assert gen.decode_mode == "eager"
    list(gen.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=3)))
    assert capsys.readouterr().err == "" and not list(tmp_path.rglob("*.failed"))
    assert Decoder(tiny_model, max_len=64).decode_mode == "aot"


def test_only_a_private_regular_file_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = compile_cache.cache_dir()
    folder.mkdir(parents=True, mode=0o700)
    calls = []
    monkeypatch.setattr("torch.compiler.load_cache_artifacts", lambda blob: calls.append(blob) or object())
    for name in ("k.bin", "k.pt2", "k.failed"):
        (folder / name).write_bytes(b"artifacts")
        os.chmod(folder / name, 0o600)

    def found():
        return compile_cache.load("k"), compile_cache.package("k") == folder / "k.pt2", compile_cache.failed("k")

    assert found() == (True, True, True) and calls == [b"artifacts"]
    for name in ("k.bin", "k.pt2", "k.failed"):
        os.chmod(folder / name, 0o620)  # writable by the group: anyone in it could plant code
    assert found() == (False, False, False)
    (tmp_path / "elsewhere").write_bytes(b"other")
    os.chmod(tmp_path / "elsewhere", 0o600)
    for name in ("link.bin", "link.pt2", "link.failed"):
        (folder / name).symlink_to(tmp_path / "elsewhere")
    assert (compile_cache.load("link"), compile_cache.package("link"), compile_cache.failed("link")) == (False, None, False)
    for name in ("k.bin", "k.pt2", "k.failed"):
        os.chmod(folder / name, 0o600)
    os.chmod(folder, 0o777)  # a folder anyone may write into
    assert found() == (False, False, False)
    assert calls == [b"artifacts"] and not compile_cache.load("absent") and compile_cache.package("absent") is None


def test_the_key_follows_the_weight_format():
    from r1cli.config import args_from_dict
    from r1cli.models import build_model
    from r1cli.quant import quantize_model
    from r1cli.quant_formats import use_int8_kernel

    torch.manual_seed(0)
    cfg = {**llama_config(num_hidden_layers=1, hidden_size=128, intermediate_size=256).to_dict(),
           "architectures": ["LlamaForCausalLM"]}
    model = build_model(args_from_dict(cfg)).float()
    plain = compile_cache.step_key(model, "compile")
    quantize_model(model, "int8")
    use_int8_kernel(model, "pack")
    packed = compile_cache.step_key(model, "compile")
    use_int8_kernel(model, "dynamic")
    assert len({plain, packed, compile_cache.step_key(model, "compile")}) == 3
    assert compile_cache.step_key(model, "aot", extra=[["kv_0_0", [1, 2, 65, 16]]]) != \
        compile_cache.step_key(model, "aot", extra=[["kv_0_0", [1, 2, 129, 16]]])


def test_an_unfinished_build_is_cleaned_up_once_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = compile_cache.cache_dir()
    folder.mkdir(parents=True, mode=0o700)
    old, young = folder / ".k.old.pt2", folder / ".k.young.pt2"
    for f in (old, young):
        f.write_bytes(b"partial")
    os.utime(old, (0, 0))
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda ep, package_path, inductor_configs: open(package_path, "wb").write(b"pkg"))
    path = compile_cache.store_package("k", object())
    assert path == folder / "k.pt2" and path.read_bytes() == b"pkg" and path.stat().st_mode & 0o777 == 0o600
    assert not old.exists() and young.exists()  # (another process may still be building that one)


@pytest.mark.slow
def test_a_run_that_ends_before_the_compile_finishes_it_at_exit(steered_dir, tmp_path):
    """A one-shot `r1 run` is done long before the first compile is: it finishes the compile at exit (said once on
    stderr), so the next run starts from the package instead of compiling again."""
    runs = []
    for i in range(2):  # a fresh Inductor folder each time: only r1's package carries over
        env = r1_env(tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"ind{i}"))
        env.pop("R1_COMPILE", None)  # the default: compile on a CPU
        runs.append(run_r1("run", steered_dir, "--verbose", "How many pears?", env=env, timeout=900))
    first, later = runs
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count(aot_step.AotDecoder.BUILDING) == 1 and first.stderr.count(aot_step.FINISHING) == 1
    files = list((tmp_path / "xdg" / "r1cli" / "compile").iterdir())
    assert [f.suffix for f in files] == [".pt2"]
    assert later.returncode == 0, later.stderr[-3000:]
    assert aot_step.AotDecoder.BUILDING not in later.stderr and aot_step.FINISHING not in later.stderr
    assert later.stdout == first.stdout == steered.ANSWER + "\n"


@pytest.mark.parametrize("make_config", [llama_config, qwen2_config], ids=["llama", "qwen2-biases"])
def test_one_row_bf16_matmuls_compile_to_reductions_that_give_the_eager_logits(make_config, tmp_path, monkeypatch):
    """The compiled bf16 step with its one-row matmuls as reductions (gemv_pass.py; forced on, whatever this CPU's
    class): the package calls no ATen matmul, and at each of several steps its logits are as close to the float32
    model's (the oracle: the same weights, no rounding to bf16) as the eager bf16 step's are. qwen2's q/k/v biases
    make addmm; a tied head included."""
    import zipfile

    from r1cli import cpu
    from r1cli.loader import load_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # the pass runs, not a cache hit
    monkeypatch.setattr(cpu, "one_row_matmul_as_reduction", lambda f=None: True)
    write_checkpoint(make_config(num_hidden_layers=2, tie_word_embeddings=make_config is qwen2_config),
                     tmp_path / "tiny")
    model, oracle = (load_model(tmp_path / "tiny", dtype=dt) for dt in ("bfloat16", "float32"))
    tokens = torch.randint(0, model.args.vocab_size, (1, 14), generator=torch.Generator().manual_seed(5))
    prompt = 8
    with torch.no_grad():
        want = oracle(tokens)[0].float()  # float32 logits at every position, no cache
        with torch.inference_mode(False):
            cache = model.new_cache(1, 33)
        cache.max_len = 32
        model.ensure_rope(32)
        model(tokens[:, :prompt], cache=cache)
        step = aot_step.AotDecoder(model, cache, wait=True)
        assert step.compiled
        errors = []
        for pos in range(prompt, tokens.shape[1]):
            token = tokens[:, pos : pos + 1]
            step.slot.fill_(pos)
            got = step.runner(token, step.slot, torch.empty(step.bucket(pos))).float()
            eager = model(token, start_pos=pos, cache=cache, last_only=True)[0, -1].float()  # (rewrites the slot)
            errors.append([float((x - want[pos]).norm() / want[pos].norm()) for x in (got[0], eager)])
    with zipfile.ZipFile(compile_cache.package(step.key)) as z:
        wrapper = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))
    from r1cli.gemv_pass import OneRowMatmulPass

    # every projection and the head (2 layers: q|k|v, o, gate|up, down) rewritten; none left to ATen's kernels
    assert OneRowMatmulPass.replaced == 9 and "aoti_torch_cpu_mm_out" not in wrapper
    assert "aoti_torch_cpu_addmm_out" not in wrapper and "cpp_fused" in wrapper
    for compiled, eager in errors:
        assert compiled <= 2 * eager + 1e-3, errors  # bf16 rounding, like eager's: a wrong sum is of order 1


def test_the_package_options_and_key_follow_the_cpu_class(monkeypatch):
    """An AVX512-BF16 CPU compiles the one-row matmuls as reductions with torch's thread count; another class keeps
    ATen's matmuls and one thread; the two never share a package."""
    from r1cli import cpu
    from r1cli.config import args_from_dict
    from r1cli.models import build_model

    base = dict(machine="x86_64", capability="AVX2", avx2=True, avx512=False, avx512_bf16=False, amx=False,
                vnni=False, neon=False, bf16_math=False)
    avx2 = cpu.CpuFeatures(**base)
    bf16 = cpu.CpuFeatures(**{**base, "avx512": True, "avx512_bf16": True, "bf16_math": True})
    assert cpu.one_row_matmul_as_reduction(bf16) and not cpu.one_row_matmul_as_reduction(avx2)
    cfg = {**llama_config(num_hidden_layers=1, hidden_size=128, intermediate_size=256).to_dict(),
           "architectures": ["LlamaForCausalLM"]}
    model = build_model(args_from_dict(cfg))
    keys = []
    for features in (bf16, avx2):
        monkeypatch.setattr(cpu, "features", lambda: features)
        options, facts = compile_cache.aot_options(), compile_cache.aot_facts()
        keys.append(compile_cache.step_key(model, "aot"))
        if features is bf16:
            assert options["cpp.threads"] == torch.get_num_threads() == facts["threads"]
            assert type(options["post_grad_custom_post_pass"]).__name__ == "OneRowMatmulPass"
        else:
            assert options["cpp.threads"] == 1 and "post_grad_custom_post_pass" not in options
        assert options["aot_inductor.package_constants_in_so"] is False
    assert keys[0] != keys[1]


@pytest.mark.slow
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the intmm kernel is oneDNN's")
def test_the_int8_head_on_8_bit_rows_compiles_into_the_step(tmp_path, fresh_cache):
    """The int8 head's "intmm" kernel (torch._int_mm) exports, unlike fbgemm's: an int4 model with that head gets
    the compiled step, whose tokens are the eager step's, and each step keeps oneDNN on (the kernel needs it)."""
    from r1cli.loader import load_model
    from r1cli.quant_formats import Int8Weight, uses_onednn

    write_checkpoint(llama_config(num_hidden_layers=1), tmp_path / "llama")
    model = load_model(tmp_path / "llama", dtype="float32", quant="int4", cache=False, quant_head=True)
    qw = model.lm_head.qweight
    model.lm_head.qweight = Int8Weight(qw.q, qw.scale, "intmm")  # (whatever this CPU's head_int8_kernel is)
    assert uses_onednn(model) and aot_step.not_exportable(model) is None
    want = list(Decoder(model, max_len=64, decode_mode="eager").generate(PROMPT, PARAMS))
    gen = Decoder(model, max_len=64, decode_mode="compile")
    assert list(gen.generate(PROMPT, PARAMS)) == want and gen._step.compiled
