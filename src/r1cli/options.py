"""`ModelOptions`: how to open a model (which one, on what device, in what dtype and context, quantized how,
decoded how, drafted by what). The command line builds it once and every front end (`r1 run`, `chat`, `serve`,
`eval`) and every worker rank of a tensor-parallel run passes it whole to `engine.open_model`, so no call site can
drop an option. Checked when built, before anything is downloaded or loaded. Imports no torch (the remote chat
client builds none, but the command line builds one before it knows)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError

QUANT_SCHEMES = ("none", "int8", "int4")
# auto (the command line's default): a quantized GGUF file on a CPU, with the dtype left to r1, keeps a quantized
# format (the fastest measured here that holds the file's bits: cpu.auto_scheme); anything else: none.
QUANT_CHOICES = ("auto", *QUANT_SCHEMES)
GROUP_SIZES = (32, 64, 128)
# auto: a CUDA graph per cache bucket on a GPU; on a CPU the step compiled ahead of time and cached per machine,
# eager until it is built (aot_step.py; R1_COMPILE=0: eager). compile: on a CPU the same step, waited for; on a GPU
# torch.compile.
DECODE_MODES = ("auto", "eager", "static", "compile", "graph")


def check_scheme(quant: str, group_size: int, flag: str = "--quant", auto: bool = False) -> None:
    if quant not in (QUANT_CHOICES if auto else QUANT_SCHEMES):
        raise UsageError(f"unknown {flag} '{quant}': use {'auto, ' if auto else ''}none, int8 or int4")
    if group_size not in GROUP_SIZES:
        raise UsageError(f"unknown --group-size {group_size}: use 32, 64 or 128")


def head_int8(quant: str, quant_head: bool | None, sharded: bool = False) -> bool:
    """Is the output head int8? As asked, else with int4 weights: the head is read every token, a large share of an
    int4 model's bytes, and llama.cpp's 4-bit mixes keep it at 6-8 bits too (its KL bar: tests/test_quant.py). Not
    by default in a sharded run, which splits the head by vocabulary (quant.quantize_head works on a whole one)."""
    return quant_head if quant_head is not None else quant == "int4" and not sharded


@dataclass(frozen=True)
class ModelOptions:
    name: str | None = None  # alias, org/name[@rev], folder or .gguf; None: registry.DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    max_context: int | None = None  # None: engine.default_context
    quant: str = "auto"  # weight-only quantization of the linear layers (quant.py); auto: QUANT_CHOICES
    group_size: int = 32  # int4 groups
    quant_head: bool | None = None  # the output head as int8 too; None: with int4 weights (head_int8)
    decode_mode: str = "auto"  # the Decoder's decode step (generate.py)
    draft: str | None = None  # speculative decoding with this model as the draft (speculative.py)
    draft_quant: str = "auto"
    mtp: bool = False  # speculative decoding with the checkpoint's multi-token-prediction layer

    def __post_init__(self) -> None:
        check_scheme(self.quant, self.group_size, auto=True)
        check_scheme(self.draft_quant, self.group_size, "--draft-quant", auto=True)
        if self.decode_mode not in DECODE_MODES:
            raise UsageError(f"unknown --decode-mode '{self.decode_mode}': use {', '.join(DECODE_MODES)}")
        if self.draft and self.mtp:
            raise UsageError("--draft and --mtp exclude each other: pick one draft")

    @property
    def head_int8(self) -> bool:
        return head_int8(self.quant, self.quant_head)

    @property
    def speculative(self) -> bool:
        return bool(self.draft or self.mtp)
