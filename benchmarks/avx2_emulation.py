"""The AVX2 emulation: r1 and llama.cpp both restricted to AVX2 code on an x86 CPU that has AVX512, to measure
issue #20's AVX2-only target where no AVX2-only machine is at hand. Emulated, not the real thing: the cores, caches
and memory bandwidth are the AVX512 machine's; only the instruction set the two engines use is restricted.

What it restricts (ENV, set before the process starts, so gguf_vs_llamacpp.py --emulate-avx2 re-executes itself):
ATen's kernels (ATEN_CPU_CAPABILITY=avx2, the packed int4 matmul included), Inductor's generated code (it picks its
vector ISA from ATEN_CPU_CAPABILITY: at::vec::Vectorized of 256 bits, -mavx2, and TORCHINDUCTOR_CPP_MARCH=x86-64-v3
in place of -march=native), oneDNN (ONEDNN_MAX_CPU_ISA=AVX2: no bf16 math), MKL's float32 BLAS
(MKL_ENABLE_INSTRUCTIONS=AVX2), fbgemm's GEMM kernels
(FBGEMM_ENABLE_INSTRUCTIONS=AVX2), glibc's string and memory functions (GLIBC_TUNABLES), r1's own CPU choices
(cpu.features() follows ATEN_CPU_CAPABILITY), and llama.cpp (LLAMA_CPP_LIB_PATH: the installed llama-cpp-python's
own version of llama.cpp built with GGML_NATIVE=OFF, AVX/AVX2/FMA/F16C/BMI2 on, every AVX512 option and AVX_VNNI off).

    python benchmarks/avx2_emulation.py build     # once: llama.cpp's libraries for AVX2 only, into --lib
    python benchmarks/avx2_emulation.py check     # what each engine runs with under the emulation, and the evidence
    python benchmarks/gguf_vs_llamacpp.py smollm2@Q4_K_M --emulate-avx2
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

DEFAULT_LIB = Path(tempfile.gettempdir()) / "avx2emu-lib"
MARKER = "R1_AVX2_EMULATION"  # set in the re-executed process: the emulation is on (and not to be entered again)

ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # float32 matmuls (torch's BLAS)
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
    "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3",  # the AVX2 level (AVX2, FMA, F16C, BMI2, MOVBE), not -march=native
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_VNNI",
}

# llama.cpp's CMake options for the AVX2-only build (the shared libraries llama-cpp-python loads, nothing else).
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF",
    *(f"-DGGML_{o}=ON" for o in ("SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2")),
    *(f"-DGGML_{o}=OFF" for o in ("AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_TILE",
                                   "AMX_INT8", "AMX_BF16", "BACKEND_DL", "CPU_ALL_VARIANTS")),
    *(f"-DLLAMA_{o}=OFF" for o in ("CURL", "OPENSSL", "BUILD_COMMON", "BUILD_TESTS", "BUILD_TOOLS", "BUILD_EXAMPLES",
                                   "BUILD_SERVER", "BUILD_APP")),
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN",  # the copied libraries find each other
]
LIBS = ("libggml-base.so", "libggml-cpu.so", "libggml.so", "libllama.so")


def active() -> bool:
    return os.environ.get(MARKER) == "1"


def enter(lib: Path | None = DEFAULT_LIB) -> None:
    """Re-execute this process (same argv) with the emulation's environment (building llama.cpp for AVX2 first when
    `lib` has no build; lib None: torch alone, no llama.cpp); returns only when already in it."""
    if active():
        return
    if lib is not None and not all((lib / name).exists() for name in LIBS):
        print(f"building llama.cpp for AVX2 only into {lib} (once)", file=sys.stderr, flush=True)
        build(lib, Path(tempfile.gettempdir()) / "avx2emu-src")
    env = {**os.environ, **ENV, MARKER: "1", **({} if lib is None else {"LLAMA_CPP_LIB_PATH": str(lib)})}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def llama_cpu_info() -> str:
    """llama.cpp's `CPU : ...` system-info line, the features its CPU backend was built with."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    return next((part.strip() for part in info.split("CPU :")[1:2]), info.strip()).rstrip(" |")


def _loaded(name: str) -> str:
    """The file this process mapped for shared library `name` ('' if none)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return ""
    for line in maps.splitlines():
        path = line.split()[-1]
        if Path(path).name.startswith(name + "."):
            return path
    return ""


def isa_line() -> str:
    """Which ISA each engine runs with (the header of a benchmark's output). Under the emulation, exits if either
    engine is not restricted: an unrestricted run must not be labelled emulated."""
    import llama_cpp  # noqa: F401  (loads libllama, so that libggml-cpu is mapped)
    import torch
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    from r1cli.cpu import features

    f = features()
    cap, isa = torch.backends.cpu.get_cpu_capability(), str(pick_vec_isa())
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    llama = llama_cpu_info()
    ggml_cpu = _loaded("libggml-cpu.so")
    line = (f"torch: ATen {cap}, Inductor {isa or 'none'}, oneDNN bf16 math {bf16}, r1 cpu class {f.cpu_class}; "
            f"llama.cpp ({ggml_cpu}): {llama}")
    if active():
        on = {k for k, v in re.findall(r"(\w+) = (\d)", llama) if v == "1"}
        wrong = [k for k in on if k.startswith("AVX512") or k in ("AVX_VNNI", "AMX_INT8")]
        if cap != "AVX2" or isa != "avx2" or bf16 or f.cpu_class != "avx2" or wrong or "AVX2" not in on \
                or not ggml_cpu.startswith(os.environ["LLAMA_CPP_LIB_PATH"]):
            raise SystemExit(f"the AVX2 emulation is not in effect, refusing to label this run emulated: {line}")
        line = "EMULATED AVX2 (AVX512 CPU restricted to AVX2 code; same cores, caches and memory): " + line
    return line


def _avx512_instructions(path: Path) -> int:
    """How many instructions of a shared library name a register only AVX512 has (zmm, xmm/ymm16-31, mask k1-k7),
    from objdump's disassembly."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True,
                         check=True).stdout
    only512 = re.compile(r"%zmm|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|%k[1-7]\b")
    return sum(bool(only512.search(line)) for line in out.splitlines())


def build(lib: Path, workdir: Path) -> None:
    """llama.cpp for AVX2 only, from the sdist of the installed llama-cpp-python (so the same llama.cpp), into lib.
    Built with one job at the lowest priority: the machine may be shared."""
    from importlib.metadata import version

    ver = version("llama-cpp-python")
    workdir.mkdir(parents=True, exist_ok=True)
    sdist = workdir / f"llama_cpp_python-{ver}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}", "--no-binary", ":all:",
                        "--no-deps", "-d", str(workdir)], check=True)
    src = workdir / f"llama_cpp_python-{ver}"
    if not src.exists():
        shutil.unpack_archive(sdist, workdir)
    build_dir = workdir / "build"
    nice = ["nice", "-n", "19"]
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run([*nice, "cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build_dir), *generator,
                    *CMAKE_OPTIONS], check=True)
    subprocess.run([*nice, "cmake", "--build", str(build_dir), "--target", "llama", "-j", "1"], check=True)
    lib.mkdir(parents=True, exist_ok=True)
    for name in LIBS:
        for f in build_dir.rglob(name + "*"):
            if f.is_file() or f.is_symlink():
                dest = lib / f.name
                dest.unlink(missing_ok=True)
                shutil.copy2(f, dest, follow_symlinks=False)
    print(f"llama.cpp {ver} for AVX2 only in {lib}; AVX512 register instructions in libggml-cpu: "
          f"{_avx512_instructions(lib / 'libggml-cpu.so')}", file=sys.stderr)


def check(lib: Path) -> None:
    """The evidence that both engines are restricted (run in the emulation's environment)."""
    enter(lib)
    import torch
    from torch._inductor import cpp_builder
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    print(isa_line())
    isa = pick_vec_isa()
    flags = " ".join([isa.build_arch_flags(), *("-" + f for f in cpp_builder._get_cpu_arch_cflags("g++"))])
    print(f"Inductor: {isa} ({isa.bit_width()}-bit Vectorized), compile flags {flags}")
    x = torch.randn(1, 8, 16, 16).to_mkldnn()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):  # oneDNN's info lines name its ISA
        torch.nn.functional.conv2d(x, torch.randn(8, 8, 3, 3).to_mkldnn())
    with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):  # MKL's first line (on AMD: no ISA named)
        torch.randn(64, 64) @ torch.randn(64, 64)
    sys.stdout.flush()
    # fbgemm's AVX2 GEMM sums u8*i8 products in saturating 16-bit pairs (VNNI's does not): all-255 activations
    # against all-127 weights give about 32.4 there instead of the exact 64
    with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's packed weights still take them
        warnings.simplefilter("ignore")
        w = torch.quantize_per_tensor(torch.ones(8, 64), 1 / 127, 0, torch.qint8)
    y = torch.ops.quantized.linear_dynamic(torch.ones(1, 64), torch.ops.quantized.linear_prepack(w, None), False)
    print(f"fbgemm: ones(64) . ones(64) = {y[0, 0].item():.1f} ({'saturating AVX2 kernel' if y[0, 0] < 60 else 'exact'})")
    sys.stdout.flush()
    print(f"llama.cpp libggml-cpu: {_avx512_instructions(lib / 'libggml-cpu.so')} instructions naming an AVX512 register")
    _check_packages()


def _check_packages() -> None:
    """r1's compiled decode steps built under the emulation (the compile cache's packages whose metadata says
    AVX2): the AVX512 register instructions in their code (none expected)."""
    import json
    import zipfile

    from r1cli.compile_cache import cache_dir

    for pt2 in sorted(cache_dir().glob("*.pt2")):
        if not zipfile.is_zipfile(pt2):  # one being written
            continue
        with zipfile.ZipFile(pt2) as z, tempfile.TemporaryDirectory() as tmp:
            meta = [n for n in z.namelist() if n.endswith("kernel_metadata.json")]
            if not meta or json.loads(z.read(meta[0])).get("AOTI_CPU_ISA") != "AVX2":
                continue
            n = 0
            for name in (n for n in z.namelist() if n.endswith(".so")):
                so = Path(tmp) / "step.so"
                so.write_bytes(z.read(name))
                n += _avx512_instructions(so)
            print(f"r1 compiled step {pt2.name} (AVX2): {n} instructions naming an AVX512 register")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("build", "check"))
    ap.add_argument("--lib", type=Path, default=DEFAULT_LIB, help="the AVX2 build of llama.cpp's libraries")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "avx2emu-src",
                    help="build: where the sdist is downloaded and built")
    a = ap.parse_args()
    build(a.lib, a.workdir) if a.what == "build" else check(a.lib)


if __name__ == "__main__":
    main()
