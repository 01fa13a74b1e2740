"""Sampling settings: `SamplingParams` (what one reply draws with), the names of its fields, and the rules every
front end checks a given value by (the command line's --top-p, the chat's /set top_p). The one place sampling
field names are written: the chat's /set, the remote client's request and the command line derive theirs from
here; and the defaults each model gets (generation_defaults: R1's, or its generation_config.json's). Imports no
torch (the remote chat client uses it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .chat_format import R1_MAX_TOKENS, R1_SAMPLING_DEFAULTS, family_for
from .errors import UsageError


def _rule(default, kind: type, lowest, highest=None):
    """A numeric field and the values it takes (lowest and highest; None: no bound)."""
    return field(default=default, metadata={"rule": (kind, lowest, highest)})


@dataclass
class SamplingParams:
    """What `r1 run/chat/serve` use for a model comes from sampling.generation_defaults; these bare defaults are R1's.
    Each numeric field carries its rule (type, lowest, highest): the command line's --top-p and the chat's /set
    top_p are checked by it (check_sampling)."""

    temperature: float = _rule(R1_SAMPLING_DEFAULTS["temperature"], float, 0.0)  # 0 = greedy
    top_p: float = _rule(R1_SAMPLING_DEFAULTS["top_p"], float, 0.0, 1.0)
    top_k: int = _rule(0, int, 0)  # 0 = off
    min_p: float = _rule(0.0, float, 0.0, 1.0)
    max_tokens: int = _rule(R1_MAX_TOKENS, int, 1)
    seed: int | None = _rule(None, int, -(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes
    # CTRL's penalty on every token already in the prompt or the reply; 1 = off; above 0, not at it (checked below)
    repetition_penalty: float = _rule(1.0, float, 0.0)
    repeat_guard: bool = True  # stop a reply stuck in a loop (RepetitionGuard): finish_reason "repetition"


SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))
# The numeric fields with their rules: the ones a value is given for (--top-p, /set top_p, a request's top_p);
# repeat_guard is a switch (--no-repeat-guard).
SAMPLING_RULES = {f.name: f.metadata["rule"] for f in fields(SamplingParams) if "rule" in f.metadata}
# The fields that shape the distribution, the ones a generation_config.json sets (the others are per request).
DISTRIBUTION_FIELDS = tuple(name for name in SAMPLING_RULES if name not in ("max_tokens", "seed"))


def check_sampling(name: str, value, spelled: str | None = None):
    """`value` (a number, or text to parse) for sampling option `name`, checked against SAMPLING_RULES; returns
    the number. A UsageError names the option as `spelled` (default: --name-with-dashes)."""
    kind, lowest, highest = SAMPLING_RULES[name]
    spelled = spelled or "--" + name.replace("_", "-")
    kind_name = "an integer" if kind is int else "a number"
    if isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            raise UsageError(f"{spelled}: '{value}' is not {kind_name}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise UsageError(f"{spelled}: {value!r} is not {kind_name}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{spelled}: {value} is not a finite number")
    if (lowest is not None and value < lowest) or (highest is not None and value > highest):
        span = (f"from {lowest:g} to {highest:g}" if highest is not None and kind is float else
                f"from {lowest} to {highest}" if highest is not None else f"of at least {lowest:g}")
        raise UsageError(f"{spelled}: {value} is out of range: use a value {span}")
    if name == "repetition_penalty" and value == 0:
        raise UsageError(f"{spelled} must be above 0 (1 = off), not 0")
    return value


# A model that is not R1 gets at most PLAIN_MAX_TOKENS tokens: a reply of a model that does not reason fits in
# about 3,000 words, and 4096 tokens of a small model on a CPU take minutes, not the hours a whole context can.
PLAIN_MAX_TOKENS = 4096
# transformers' own values for the keys a generation_config.json leaves out (GenerationConfig defaults).
TRANSFORMERS_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "min_p": 0.0, "repetition_penalty": 1.0}


def generation_defaults(tokenizer, alias=None) -> dict:
    """The defaults `r1 run`, `chat`, `serve` and `show` use for a model (SamplingParams fields), and where they
    come from ("source"). R1 models (chat_format.family_for: `tokenizer` may be None, `alias` a registry.Alias)
    get DeepSeek's temperature 0.6, top-p 0.95 and 32,768 tokens, with generation_config.json over them (the R1
    repos' say the same). Other models: their generation_config.json as transformers reads it (keys it leaves out
    take transformers' values; do_sample false, or no sampling settings at all, is greedy decoding), at most
    PLAIN_MAX_TOKENS tokens. Unlike transformers, a file that sets a temperature or top-p without do_sample is
    taken to mean sampling. The repetition guard is on for all: it is what makes greedy decoding safe. The
    Decoder caps max_tokens by the context left."""
    config = getattr(tokenizer, "generation_config", None) or {}
    given = {k: config[k] for k in DISTRIBUTION_FIELDS
             if isinstance(config.get(k), (int, float)) and not isinstance(config.get(k), bool)}
    if family_for(tokenizer, alias) == "r1":
        defaults = {**R1_SAMPLING_DEFAULTS, "max_tokens": R1_MAX_TOKENS, **given}
        source = "DeepSeek's R1 recommendations" + (" and generation_config.json" if given else "")
    else:
        defaults = {**TRANSFORMERS_SAMPLING, "max_tokens": PLAIN_MAX_TOKENS, **given}
        source = "generation_config.json"
        if not given and config.get("do_sample") is not True:
            defaults["temperature"] = 0.0
            source = "greedy: generation_config.json sets no sampling"
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0  # transformers' greedy decoding
    return {**defaults, "repeat_guard": True, "source": source}


def default_sampling(tokenizer, alias=None, **overrides) -> SamplingParams:
    """generation_defaults as SamplingParams, `overrides` (SamplingParams fields) on top: for the Python API."""
    values = {k: v for k, v in generation_defaults(tokenizer, alias).items() if k != "source"}
    return SamplingParams(**{**values, **{k: v for k, v in overrides.items() if v is not None}})
