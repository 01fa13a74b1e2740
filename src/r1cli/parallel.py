"""Tensor and expert parallelism over torch.distributed (torchrun): NCCL on GPUs, gloo on CPUs.

`Shard` is the one value a sharded model is built with (rank, world size, process groups); there is no global
state. `placement()` is THE table of where each checkpoint tensor is split: the model constructors build the local
shapes it implies and the loader reads exactly that slice from the safetensors files (a mismatch is an error).

    column parallel  q/k/v, q_b, kv_b (heads), gate/up (hidden units): rows split, no communication
    row parallel     o, down: columns split; the partial outputs are summed by one all-reduce, the bias added once
    vocab parallel   embedding (rows; masked lookup + all-reduce), head (rows; logits all-gathered on every rank)
    expert parallel  routed experts: each rank holds a contiguous range; partial sums reduced with the attention's
    replicated       norms, the router, MLA's latent path (q_a, kv_a), everything else

Rank 0 owns the terminal and draws every token; the others follow its commands (`Shard.command` /
`Shard.next_command`) and receive each token by broadcast, so all ranks prefill and decode in lockstep.
Whether a model fits on N GPUs is planner.py's.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch

from .config import ModelArgs
from .errors import R1Error

TIMEOUT_ENV = "R1_DIST_TIMEOUT"  # seconds a collective may wait for a peer before every rank gives up
DEFAULT_TIMEOUT_S = 300
DIST_EXIT = 5  # docs/exit-codes.md
JOIN_TIMEOUT = timedelta(minutes=10)  # for every rank to start (two nodes started by hand, a slow import)
# Rank 0 may wait on a person for hours: its commands travel on a gloo group that never times out in practice
# (a dead rank 0 still shows at once: the connection closes).
COMMAND_TIMEOUT = timedelta(days=30)


class ShardingError(R1Error):
    """A size that does not divide across the ranks (heads, vocabulary, FP8 blocks): raised before loading."""

    exit_code = 2


class DistributedError(R1Error):
    """A rank died or a collective timed out: every surviving rank exits with this."""

    exit_code = DIST_EXIT


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    group: Any = None  # the model's collectives (NCCL or gloo); None = the default group
    commands: Any = None  # gloo group for rank 0's commands (prompts wait on a person: no short timeout)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def part(self, n: int, what: str) -> int:
        if n % self.world:
            raise ShardingError(f"{what} ({n}) do not divide across {self.world} ranks: use a world size that divides {n}")
        return n // self.world

    def span(self, n: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's even share of n."""
        size = self.part(n, what)
        return self.rank * size, size

    def experts(self, n: int) -> range:
        """This rank's contiguous range of n routed experts; the first n % world ranks hold one more."""
        if n < self.world:
            raise ShardingError(f"{n} routed experts cannot spread over {self.world} ranks (each needs one)")
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    # --- collectives (the model's) ------------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along the last dim (vocab-parallel logits), identical on every rank."""
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x, in place, on every rank (the sampled token)."""
        import torch.distributed as dist

        dist.broadcast(x, src=0, group=self.group)
        return x

    # --- rank 0's commands -----------------------------------------------------------------------------------

    def command(self, obj) -> None:
        """Rank 0: send a (picklable, our own) command to every other rank."""
        import torch.distributed as dist

        dist.broadcast_object_list([obj], src=0, group=self.commands)

    def next_command(self):
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.commands)
        return box[0]


SINGLE = Shard()


# --- where each tensor lives -------------------------------------------------------------------------------------

REPLICATE, SKIP_HERE = "replicate", "skip"
# A routed expert's weight, one tensor per expert in the checkpoint: (the stack it joins, the expert, which one).
EXPERT_RE = re.compile(r"^((?:model\.layers\.\d+|mtp)\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
COLUMN_RE = re.compile(r"\.(q_proj|k_proj|v_proj|q_b_proj|kv_b_proj|gate_proj|up_proj)\.(weight|bias)$")
ROW_RE = re.compile(r"\.(o_proj|down_proj)\.(weight|bias)$")
VOCAB_RE = re.compile(r"^(model\.embed_tokens|lm_head)\.weight$")


def placement(name: str, shard: Shard) -> str | int:
    """Where checkpoint tensor `name` goes on this rank: REPLICATE (whole), SKIP_HERE (not on this rank), or the
    dim it is split along evenly (0: rows, 1: columns). Routed experts (`...experts.E...`) are whole on the rank
    whose `Shard.experts` range holds E and skipped on the others (the loader checks the range)."""
    if shard.world == 1 or EXPERT_RE.match(name):
        return REPLICATE
    if COLUMN_RE.search(name) or VOCAB_RE.match(name):
        return 0
    m = ROW_RE.search(name)
    if m:
        # a row-parallel bias is added once, after the all-reduce: rank 0 holds it
        return 1 if m.group(2) == "weight" else (REPLICATE if shard.leader else SKIP_HERE)
    return REPLICATE


KV_RE = re.compile(r"\.(k_proj|v_proj)\.(weight|bias)$")


def shares(name: str, shard: Shard, args: ModelArgs) -> tuple[int, int]:
    """A split tensor is cut into `parts` equal shares; this rank holds share `index`. Usually parts = world and
    index = rank; with more ranks than key/value heads, world / heads consecutive ranks hold the same head."""
    parts = min(shard.world, args.n_kv_heads) if KV_RE.search(name) else shard.world
    return parts, shard.rank // (shard.world // parts)


def check_sizes(args: ModelArgs, shard: Shard) -> None:
    """Every size that must divide across the ranks, checked from the config before anything loads."""
    if shard.world == 1:
        return
    shard.part(args.n_heads, "attention heads")
    shard.part(args.vocab_size, "vocabulary rows")
    if args.is_deepseek:
        dense = args.inter_dim if args.first_k_dense_replace or not args.n_routed_experts else None
        splits = {"q_b_proj rows": args.n_heads * args.qk_head_dim // shard.world,
                  "kv_b_proj rows": args.n_heads * (args.qk_nope_head_dim + args.v_head_dim) // shard.world,
                  "o_proj columns": args.n_heads * args.v_head_dim // shard.world}
        if args.n_routed_experts:
            shard.experts(args.n_routed_experts)
            if args.n_shared_experts:
                shared = args.moe_inter_dim * args.n_shared_experts
                splits["shared expert hidden units"] = shard.part(shared, "shared expert hidden units")
    else:
        if args.n_kv_heads % shard.world and shard.world % args.n_kv_heads:
            raise ShardingError(f"key/value heads ({args.n_kv_heads}) neither divide across {shard.world} ranks nor "
                                f"divide {shard.world}: use a world size that divides or is a multiple of {args.n_kv_heads}")
        dense = args.inter_dim
        splits = {}
    if dense:
        splits["MLP hidden units"] = shard.part(dense, "MLP hidden units")
    if args.fp8_block:
        block = args.fp8_block[0]
        for what, size in splits.items():
            if size % block:
                raise ShardingError(f"FP8 {what} per rank ({size}) are not whole {block}-blocks on {shard.world} ranks: "
                                    f"use a world size that keeps them whole")


# --- processes ---------------------------------------------------------------------------------------------------


def launched() -> bool:
    """Started by torchrun (or anything that sets its environment) with more than one rank."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        raise R1Error(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise R1Error(f"{TIMEOUT_ENV} must be positive")
    return value


def init(device: str = "auto") -> tuple[Shard, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):
    NCCL on CUDA (device cuda:LOCAL_RANK), gloo on CPU."""
    import torch.distributed as dist

    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if device not in ("auto", "cpu") and not want_cuda:
        raise R1Error(f"--device {device} cannot run distributed: use cuda or cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        if local >= torch.cuda.device_count():
            raise R1Error(f"rank {env_rank()}: LOCAL_RANK {local}, but this node shows {torch.cuda.device_count()} GPUs "
                          f"(check --nproc-per-node and CUDA_VISIBLE_DEVICES)")
        torch_device = torch.device("cuda", local)
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    timeout = timedelta(seconds=timeout_s())
    backend = "nccl" if want_cuda else "gloo"
    try:
        # The default group only gathers the ranks (patiently); the model's collectives get their own group with
        # the short timeout, rank 0's commands a gloo group with a very long one.
        dist.init_process_group(backend, timeout=max(timeout, JOIN_TIMEOUT),
                                **({"device_id": torch_device} if want_cuda else {}))
        model = dist.new_group(backend=backend, timeout=timeout)
        commands = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - rendezvous failures come as many types
        raise DistributedError(f"rank {env_rank()}: could not join the other ranks ({_short(e)})") from None
    return Shard(dist.get_rank(), dist.get_world_size(), model, commands), torch_device


def is_collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("Connection closed", "Connection reset", "Timed out", "timed out", "Timeout", "NCCL",
                            "gloo", "Broken pipe", "Socket"))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's "[file.cc:123]" prefix
    return text.split(". ")[0][:200]  # the error itself, not the advice after it


def run_ranks(body: Callable[[Shard, torch.device], int], device: str = "auto") -> int:
    """Run `body(shard, device)` on every rank and return its exit code. Rank 0 tells the others to stop when it
    ends (also on an error, whose code they share); a dead peer or a timed-out collective becomes one
    DistributedError line on every surviving rank. Errors on other ranks print with their rank."""
    import torch.distributed as dist

    shard, torch_device = init(device)
    code = None  # stays None when a collective failed: then nobody waits for a goodbye
    try:
        code = body(shard, torch_device)
        return code
    except R1Error as e:
        code = e.exit_code
        if shard.leader:
            raise
        print(f"r1: rank {shard.rank}: {e}", file=sys.stderr)
        return code
    except Exception as e:
        if is_collective_failure(e):
            waited = f", after {timeout_s():g} s ({TIMEOUT_ENV})" if "imed out" in str(e) else ""
            raise DistributedError(
                f"rank {shard.rank}: lost contact with the other ranks ({_short(e)}{waited}); every rank stops"
            ) from None
        code = 1
        raise
    finally:
        if code is not None:
            if shard.leader:  # the others wait for rank 0's next command: tell them to stop, with this code
                try:
                    shard.command(("exit", code))
                except Exception:  # noqa: BLE001 - the others may be gone already
                    pass
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def relaunch(gpus: int, argv: list[str]) -> int:
    """`r1 chat MODEL --gpus N`: run this command again as N rank processes on this machine, in torchrun's
    environment (RANK, WORLD_SIZE, LOCAL_RANK, a rendezvous on a free loopback port), and return rank 0's exit code.

    Not through torchrun itself: torchrun turns any rank's exit code into its own 1 and prints a ChildFailedError
    traceback, and on Ctrl-C a SignalException traceback. Here the ranks print their own one-line errors and the
    documented code comes back as is. The ranks stay in this terminal's process group, so Ctrl-C reaches each of
    them as it would under torchrun; this process only waits. SIGTERM is passed on to every rank."""
    import signal
    import subprocess

    argv = strip_gpus(argv)
    env = {**os.environ, "WORLD_SIZE": str(gpus), "LOCAL_WORLD_SIZE": str(gpus), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "GROUP_RANK": "0"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // gpus)))
    sys.stdout.flush()
    sys.stderr.flush()
    procs: list[subprocess.Popen] = []

    def forward(signum, frame) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        for rank in range(gpus):  # only rank 0 reads stdin (the prompt, the REPL)
            procs.append(subprocess.Popen([sys.executable, "-m", "r1cli", *argv],
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                          stdin=None if rank == 0 else subprocess.DEVNULL))
        code = _wait(procs[0])
        for p in procs[1:]:  # told to stop by rank 0, or noticing it is gone
            try:
                _wait(p, RELAUNCH_GRACE_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        signal.signal(signal.SIGTERM, previous)
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


RELAUNCH_GRACE_S = 30  # after rank 0 ended, how long the others may take to see it before they are killed


def _wait(proc, timeout: float | None = None) -> int:
    """proc's exit code; Ctrl-C (which reached every rank from the terminal) does not stop the waiting."""
    import time

    end = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return proc.wait(None if end is None else max(end - time.monotonic(), 0))
        except KeyboardInterrupt:
            continue


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_gpus(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            out.append(a)
    return out
