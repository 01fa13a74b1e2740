"""Where a benchmark run's outputs go: a dated folder under benchmarks/results/ with a manifest.json that says what
was measured where: the commit (and whether the tree had uncommitted changes), torch and transformers versions, the
CPU (model, the SIMD flags that pick kernels, cores) or the GPU (name, memory, driver), the load average before
and after (so a figure can be labelled quiet or loaded), the command line, and each step's status.

    from record import default_label, new_run, write_manifest
    folder = new_run(default_label("cpu"))   # benchmarks/results/2026-11-30-cpu-avx512bf16[-loaded]/ (-2... if taken)
    write_manifest(folder, command=sys.argv, steps=[...])

No torch import at module level: the manifest of a run that failed to import torch still gets written.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The /proc/cpuinfo flags that decide which CPU kernels run (bf16 math, integer dot products, matrix units)
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "bf16", "i8mm", "sve")


def new_run(label: str, root: Path = RESULTS, when: datetime | None = None) -> Path:
    """A new folder `root/YYYY-MM-DD-label` (UTC date), suffixed -2, -3... when the day already has one."""
    day = (when or datetime.now(timezone.utc)).strftime("%Y-%m-%d")
    base = root / f"{day}-{label}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    folder.mkdir(parents=True)
    return folder


def _run(*cmd: str) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_facts() -> dict:
    status = _run("git", "status", "--porcelain", "--untracked-files=no")
    return {"commit": _run("git", "rev-parse", "HEAD"), "branch": _run("git", "rev-parse", "--abbrev-ref", "HEAD"),
            "uncommitted_changes": bool(status)}


def cpu_facts() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = value.strip()
            elif key in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    facts = {"model": model, "cores": os.cpu_count(), "flags": [f for f in CPU_FLAGS if f in flags]}
    try:
        import torch

        facts["torch_capability"] = torch.backends.cpu.get_cpu_capability()
        facts["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001 - a manifest without these is still a manifest
        pass
    return facts


def gpu_facts() -> list[dict] | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        gpus = [{"name": torch.cuda.get_device_name(i),
                 "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
                 "capability": ".".join(map(str, torch.cuda.get_device_capability(i))), "cuda": torch.version.cuda}
                for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        return None
    driver = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    for g in gpus:
        g["driver"] = driver.splitlines()[0] if driver else None
    return gpus


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "llama_cpp"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - not installed (or broken): recorded as absent
            out[name] = None
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def load_label(load: list[float] | None, cores: int | None) -> str:
    """'quiet' when the 1-minute load average before the run was under a quarter of the cores (at least 0.5):
    nothing else of note was running; 'loaded' otherwise."""
    if not load or not cores:
        return "unknown"
    return "quiet" if load[0] < max(0.5, cores / 4) else "loaded"


def machine_tag(machine: dict) -> str:
    """A short name for the machine class in a folder name: the GPU's model (h200), else the CPU's class."""
    if machine.get("gpu"):
        return machine["gpu"][0]["name"].split()[-1].lower()
    flags = set(machine["cpu"]["flags"])
    for tag, needs in (("amx", "amx_bf16"), ("avx512bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2"),
                       ("neon", "asimd")):
        if needs in flags:
            return tag
    return platform.machine().lower()


def default_label(suite: str) -> str:
    """suite-machine, and -loaded when the machine was busy as the run began: 'cpu-avx512bf16-loaded', 'gpu-h200'."""
    machine = machine_facts()
    loaded = load_label(load_average(), machine["cpu"]["cores"]) == "loaded"
    return f"{suite}-{machine_tag(machine)}" + ("-loaded" if loaded else "")


def machine_facts() -> dict:
    return {"host": platform.node(), "os": platform.platform(), "cpu": cpu_facts(), "gpu": gpu_facts(),
            "versions": versions()}


def write_manifest(folder: Path, command: list[str] | str, **extra) -> Path:
    """Write (or rewrite) folder/manifest.json: when, the commit, the machine, the command line, and `extra`
    (steps and their status, notes). Called at a run's start and again at its end."""
    path = Path(folder) / "manifest.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if "started" not in old:
        load = load_average()
        machine = machine_facts()
        old = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), **git_facts(),
               "command": command if isinstance(command, str) else shlex.join(command), "cwd": str(ROOT),
               "python": sys.executable, "machine": machine, "load_before": load,
               "load": load_label(load, machine["cpu"]["cores"]), "env": {
                   k: os.environ[k] for k in ("OMP_NUM_THREADS", "R1_INT8_KERNEL", "CUDA_VISIBLE_DEVICES")
                   if k in os.environ}}
    old.update(extra)
    old["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    old["load_after"] = load_average()
    path.write_text(json.dumps(old, indent=1) + "\n")
    return path


if __name__ == "__main__":  # print what a manifest would record on this machine
    print(json.dumps({**git_facts(), "machine": machine_facts(), "load": load_average(),
                      "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
