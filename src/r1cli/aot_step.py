"""The CPU decode step compiled ahead of time: the model's static decode step (one token, the KV cache as buffers
written in place, the attended length a dynamic size) exported with torch.export and compiled by AOTInductor into
a package, cached on disk per machine (compile_cache.py), so only a machine's first run pays the compile; a later
process loads the package in seconds, with no tracing.

The package holds code only: the weights and the KV cache stay the model's own tensors, handed to it by reference
(`load_constants(user_managed=True)`), so the eager prefill and the compiled decode share one cache.

The first run on a machine exports the step (seconds, in the decoding thread: export swaps the module's tensors
while it traces), then compiles it in a background thread while the eager step decodes, and switches to the
compiled step at the first token after the package is ready. A process that is done before the build is (a short
`r1 run`) finishes it at exit, said on stderr and skipped by Ctrl-C, so the first run on a machine is the only one
that pays. A step that does not export or compile here (an op export cannot take, no C++ compiler) is remembered
as such for this machine, and decoding stays eager.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import compile_cache
from .models import Cache, CausalLM

# The compiled step's logits against the eager step's (relative L2) at its first tokens: a package that computes
# something else (a constant fed wrongly: of order 1) is dropped. bf16 rounding differs between fused and unfused
# kernels, mostly by a few hundredths but at some positions by over a tenth (benchmarks/compiled_vs_eager.py,
# docs/performance.md), so one token over CHECK_TOLERANCE is not proof: then the mean over the first CHECK_TOKENS
# must stay within CHECK_MEAN_TOLERANCE (rounding averages out; a wrong constant does not).
CHECK_TOLERANCE = 0.05
CHECK_TOKENS = 4
CHECK_MEAN_TOLERANCE = 0.1

# Bumped whenever what goes into a package changes (the step's code, the compile options): older packages are
# then never loaded.
PACKAGE_VERSION = 2

_announced: set[str] = set()
_builds: list[threading.Thread] = []  # background compiles of this process, finished at exit (finish_builds)
FINISHING = "r1: finishing the decode step's compile for this machine, so that later runs start compiled (Ctrl-C skips)"


def finish_builds() -> None:
    """At exit: wait for a compile still running (its package is what spares the next run the compile). Ctrl-C
    leaves it unfinished; the next run builds it again."""
    pending = [t for t in _builds if t.is_alive()]
    if not pending:
        return
    print(FINISHING, file=sys.stderr, flush=True)
    try:
        for thread in pending:
            thread.join()
    except KeyboardInterrupt:
        pass


atexit.register(finish_builds)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of the sources the step is traced and compiled from (the models, the quantized weights, the one-row
    matmul pass, this file): a package built from other code is never loaded, so an edit to the model code cannot
    run stale compiled math."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted([*here.glob("models/*.py"), here / "quant.py", here / "quant_formats.py", here / "config.py",
                        here / "gemv_pass.py", Path(__file__)]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]  # each notice once per process


def announce_once(message: str, notice: Callable[[str], None] | None = None) -> None:
    if message in _announced:
        return
    _announced.add(message)
    if notice is not None:
        notice(message)
    else:
        print(message, file=sys.stderr, flush=True)


def not_exportable(model: CausalLM) -> str | None:
    """Why this model's decode step cannot be exported (None: it can), known before trying, so that the default
    decodes eagerly without a failed compile: MoE routing gives tensors data-dependent sizes; fbgemm's packed int8
    weights (the dynamic and mixed int8 kernels) are opaque objects torch.export cannot trace."""
    if getattr(model.args, "n_routed_experts", 0):
        return "routed experts"
    from .quant_formats import Int8Weight

    for module in model.modules():
        if isinstance(module, Int8Weight) and module.kernel not in ("pack", "intmm"):
            return f"int8 weights on the {module.kernel} kernel"
    return None


class StepModule(nn.Module):
    """The static decode step as a module whose inputs are tensors only: token [1, 1], slot [1] and `span`, a
    tensor whose length is the number of cache slots to attend over (the bucket: a dynamic size at export). The
    cache's tensors are buffers of this module, so export sees their in-place writes. The cache has one slot more
    than `cache.max_len` (Decoder allocates it): a bucket never spans a whole buffer, which would be a special
    case of the slice (a second graph)."""

    def __init__(self, model: CausalLM, cache: Cache):
        super().__init__()
        self.model = model
        self.n_layers, self.width = len(cache.layers), len(cache.layers[0])
        self.max_len, self.slot_dim = cache.max_len, cache.slot_dim
        for i, layer in enumerate(cache.layers):
            for j, buf in enumerate(layer):
                self.register_buffer(f"kv_{i}_{j}", buf, persistent=False)

    def forward(self, token: torch.Tensor, slot: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        layers = [tuple(getattr(self, f"kv_{i}_{j}") for j in range(self.width)) for i in range(self.n_layers)]
        cache = Cache(layers, self.max_len, self.slot_dim, view_len=span.shape[0])
        return self.model(token, start_pos=slot, cache=cache)[:, -1]

    def constants(self) -> dict[str, torch.Tensor]:
        """Every tensor the package reads, by the name export gives it (tied weights under each of their names)."""
        out = dict(self.named_parameters(remove_duplicate=False))
        out.update(self.named_buffers(remove_duplicate=False))
        return out

    def facts(self) -> list:
        """What a package compiled for this step depends on beyond compile_cache.step_key: each tensor's name,
        shape and dtype (weight formats, cache size and dtype, rotary table)."""
        return sorted([name, list(t.shape), str(t.dtype)] for name, t in self.constants().items())


def export_step(step: StepModule, buckets_up_to: int):
    from torch.export import Dim

    token = torch.zeros(1, 1, dtype=torch.long)
    slot = torch.zeros(1, dtype=torch.long)
    span = torch.zeros(min(256, buckets_up_to))
    dims = ({}, {}, {0: Dim("span", min=2, max=buckets_up_to)})
    with torch.inference_mode(False), torch.no_grad():
        return torch.export.export(step, (token, slot, span), dynamic_shapes=dims)


def _generated_constants(names: list[str], model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors the compiler made up, which a package without weights does not hold either: Inductor's CPU lowering
    of the packed int4 matmul passes the group size as a 0-d int64 tensor constant. Any other unknown name means a
    step this code does not know how to feed (a KeyError: eager)."""
    groups = {m.group_size for m in model.modules() if getattr(m, "scheme", None) == "int4"}
    if names and len(groups) != 1:
        raise KeyError(f"the compiled step needs constants this model cannot give: {names[:3]}")
    return {name: torch.tensor(next(iter(groups)), dtype=torch.int64) for name in names}


class PackageRunner:
    """A loaded package, called with the step's three tensors (torch's own loader, without the Python wrapper of
    `torch._inductor.aoti_load_package`, whose import of Inductor and check of this CPU's vector ISAs, compiling a
    test program for each, cost seconds at every start: the cache key has already matched the CPU)."""

    def __init__(self, path):
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)

    def constant_names(self) -> list[str]:
        return self.loader.get_constant_fqns()

    def bind(self, constants: dict[str, torch.Tensor]) -> None:
        self.loader.load_constants(constants, False, True, True)  # active buffer, every one given, by reference

    def __call__(self, token: torch.Tensor, slot: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        return self.loader.boxed_run([token, slot, span])[0]


def load(path, step: StepModule):
    """The compiled step from a package file, bound to this process's weights and cache (shared, not copied):
    (the runner, the tensors it reads, which must stay alive as long as it does)."""
    runner = PackageRunner(path)
    constants = step.constants()
    names = runner.constant_names()
    bound = {name: constants[name] for name in names if name in constants}
    bound.update(_generated_constants([name for name in names if name not in constants], step.model))
    runner.bind(bound)
    return runner, bound


class AotDecoder:
    """Decoder's CPU decode step: the compiled package when this machine has one (or once the background build
    finishes), the eager step until then, or for good when the step cannot be compiled here."""

    BUILDING = "r1: compiling the decode step for this machine (first run only); decoding eagerly meanwhile"
    WAITING = "r1: compiling the decode step for this machine (first run only: a minute or more)"

    def __init__(self, model: CausalLM, cache: Cache, notice: Callable[[str], None] | None = None,
                 wait: bool = False):
        """wait: build in this thread (the first decode step waits for the compile) instead of in the background."""
        self.model, self.cache, self.notice, self.wait = model, cache, notice, wait
        self.runner = None
        self.bound: dict[str, torch.Tensor] = {}  # what the runner reads by reference
        self.load_s: float | None = None  # seconds to load the package (benchmarks)
        self.checked = False  # the compiled step was compared with the eager one (at its first tokens)
        self.check_errors: list[float] = []
        self.spans: dict[int, torch.Tensor] = {}
        self.slot = torch.zeros(1, dtype=torch.long)
        self.build: threading.Thread | None = None
        self.built: tuple | None = None  # (path or None, error or None) from the build thread
        self.freqs = model.freqs
        self.step = StepModule(model, cache)
        self.key = compile_cache.step_key(model, "aot", extra=[PACKAGE_VERSION, code_version(), self.step.facts()])
        if compile_cache.failed(self.key):
            return  # this step did not compile on this machine before: eager, as announced then
        path = compile_cache.package(self.key)
        if path is not None:
            try:
                start = time.perf_counter()
                self.runner, self.bound = load(path, self.step)
                self.load_s = time.perf_counter() - start
                return
            except Exception:  # a stale or broken package: build it again
                pass
        self._start_build()

    def _start_build(self) -> None:
        announce_once(self.WAITING if self.wait else self.BUILDING, self.notice)
        try:
            exported = export_step(self.step, self.cache.max_len)
        except Exception as e:
            self._give_up(e)
            return

        def run() -> None:
            try:
                self.built = (compile_cache.store_package(self.key, exported), None)
            except Exception as e:  # noqa: BLE001 - any failure means eager decoding
                self.built = (None, e)

        self.build = threading.Thread(target=run, name="r1-compile-decode-step", daemon=True)
        _builds.append(self.build)
        self.build.start()
        if self.wait:
            self.build.join()
            self._poll()

    def _give_up(self, error: BaseException) -> None:
        compile_cache.mark_failed(self.key, f"{type(error).__name__}: {error}")
        announce_once(f"r1: the decode step did not compile on this machine ({type(error).__name__}); "
                      "decoding eagerly", self.notice)

    def _poll(self) -> None:
        if self.build is None or self.build.is_alive():
            return
        self.build = None
        path, error = self.built
        if error is None:
            try:
                self.runner, self.bound = load(path, self.step)
                return
            except Exception as e:  # noqa: BLE001
                error = e
        self._give_up(error)

    def bucket(self, pos: int) -> int:
        n = 256
        while n <= pos:
            n *= 2
        return min(n, self.cache.max_len)

    @property
    def compiled(self) -> bool:
        return self.runner is not None

    def __call__(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [1, vocab] for one token at slot `pos`."""
        if self.build is not None:
            self._poll()
        if self.runner is None or self.model.freqs is not self.freqs:  # (the rotary table is bound by reference)
            return self.model(token, start_pos=pos, cache=self.cache, last_only=True)[:, -1]
        n = self.bucket(pos)
        span = self.spans.get(n)
        if span is None:
            span = self.spans[n] = torch.empty(n)
        self.slot.fill_(pos)
        if self.checked:
            return self.runner(token, self.slot, span)
        # The first compiled tokens are checked against the eager step's (CHECK_TOLERANCE): a package that computes
        # something else is dropped, never used. Eager runs second, so the cache slot both write holds its keys and
        # values whatever the package wrote.
        got = self.runner(token, self.slot, span).clone()
        want = self.model(token, start_pos=pos, cache=self.cache, last_only=True)[:, -1]
        self.check_errors.append(float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-6)))
        total, budget = sum(self.check_errors), CHECK_MEAN_TOLERANCE * CHECK_TOKENS
        if self.check_errors[0] < CHECK_TOLERANCE or len(self.check_errors) == CHECK_TOKENS and total < budget:
            self.checked = True
        elif len(self.check_errors) == CHECK_TOKENS or not total < budget:  # (the mean can no longer pass)
            self.runner, self.bound = None, {}
            self._give_up(ValueError("the compiled step's logits differ from the eager step's (relative "
                                     + ", ".join(f"{e:.3g}" for e in self.check_errors) + ")"))
        return want
