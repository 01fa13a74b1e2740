"""config.json -> ModelArgs: one typed dataclass for every architecture r1 runs (SUPPORTED_ARCHITECTURES, the one list
of them, which `r1 show` and `r1 list` use too).

Both config layouts are accepted: the Hub's (top-level `rope_theta`, `rope_scaling` with `type` or `rope_type`)
and transformers 5's (`rope_parameters`), which `save_pretrained` writes.

A config.json is untrusted input: every size is checked to be an integer within `INT_BOUNDS` and every float to be
finite and in range before anything is computed from it (docs/security.md, "Model files"); `check_args` applies the
same rules to a ModelArgs from any source (a GGUF's metadata too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, UnsupportedArchitectureError
from .files import read_json

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "DeepseekV3ForCausalLM",
    "DeepseekV2ForCausalLM",
)


@dataclass(frozen=True)
class RopeArgs:
    theta: float = 10000.0
    kind: str = "default"  # default | llama3 | yarn | linear
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # GGUF: llama.cpp's rope_freqs tensor, per-frequency divisors (how it stores Llama 3.1's llama3 scaling)
    freq_factors: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    inter_dim: int
    norm_eps: float
    max_seq_len: int
    rope: RopeArgs = field(default_factory=RopeArgs)
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q/k/v, none on o
    attention_bias: bool = False  # Llama/DeepSeek `attention_bias`: biases on every attention projection
    mlp_bias: bool = False
    sliding_window: int | None = None  # Qwen2 with use_sliding_window
    max_window_layers: int = 0
    torch_dtype: str = "bfloat16"
    # DeepSeek MLA
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # DeepSeek MoE
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    n_activated_experts: int = 0
    moe_inter_dim: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"  # greedy | group_limited_greedy | noaux_tc
    scoring_func: str = "softmax"  # softmax | sigmoid
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # FP8 block quantization of the checkpoint (DeepSeek-V3/R1): [128, 128]
    fp8_block: tuple[int, int] | None = None
    # DeepSeek-V3/R1 `num_nextn_predict_layers`: multi-token-prediction layers stored after the last layer
    n_mtp_layers: int = 0

    @property
    def is_deepseek(self) -> bool:
        return self.architecture in ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_deepseek else self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.n_routed_experts > 0 and i >= self.first_k_dense_replace and i % max(self.moe_layer_freq, 1) == 0
        )

    def uses_sliding_window(self, i: int) -> bool:
        # transformers' Qwen2: layers from max_window_layers on slide, only when use_sliding_window is set.
        return self.sliding_window is not None and i >= self.max_window_layers

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN (from the config, not from a runtime length)."""
        head = self.qk_head_dim if self.is_deepseek else self.head_dim
        scale = head**-0.5
        r = self.rope
        if self.is_deepseek and r.kind == "yarn" and r.mscale_all_dim:
            m = yarn_mscale(r.factor, r.mscale_all_dim)
            scale *= m * m
        return scale


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_args(cfg: dict) -> RopeArgs:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        if "rope_theta" not in params and "full_attention" in params:
            params = params["full_attention"]
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise CheckpointError(f"config.json: rope scaling is {scaling!r}; r1 expects a JSON object")
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ("default", "llama3", "yarn", "linear"):
        raise UnsupportedArchitectureError(f"unsupported rope scaling '{kind}' (supported: default, linear, llama3, yarn)")
    _check_numbers({"rope_theta": theta, **scaling}, "config.json", ("rope_theta", "factor", "low_freq_factor",
                   "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"))
    factor = scaling.get("factor")
    orig = scaling.get("original_max_position_embeddings")
    _check_ints({"original_max_position_embeddings": orig}, "config.json")
    if kind in ("yarn", "llama3") and orig is None:
        raise CheckpointError(f"config.json: {kind} rope scaling without original_max_position_embeddings")
    if kind == "yarn" and factor is None:
        factor = cfg["max_position_embeddings"] / orig
    return RopeArgs(
        theta=float(theta),
        kind=kind,
        factor=float(factor or 1.0),
        original_max_position_embeddings=orig,
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        beta_fast=float(scaling.get("beta_fast") or 32),
        beta_slow=float(scaling.get("beta_slow") or 1),
        mscale=scaling.get("mscale"),
        mscale_all_dim=scaling.get("mscale_all_dim"),
        attention_factor=scaling.get("attention_factor"),
        truncate=bool(scaling.get("truncate", True)),
    )


# Sane bounds on config.json's integer sizes (the largest real models are far inside them: Llama 3.1 405B has 126
# layers, hidden 16384; DeepSeek-V3 256 experts; the largest vocabularies about 256k). A model is built on the meta
# device from these before any weight is read, so an absurd size must be refused here, not discovered by the OOM
# killer.
INT_BOUNDS = {
    "vocab_size": (1, 2**22), "hidden_size": (1, 2**16), "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024), "head_dim": (1, 1024),
    "intermediate_size": (1, 2**20), "max_position_embeddings": (1, 2**24), "sliding_window": (1, 2**24),
    "max_window_layers": (0, 1024), "q_lora_rank": (1, 2**16), "kv_lora_rank": (1, 2**16),
    "qk_nope_head_dim": (0, 1024), "qk_rope_head_dim": (0, 1024), "v_head_dim": (1, 1024),
    "n_routed_experts": (0, 4096), "n_shared_experts": (0, 64), "num_experts_per_tok": (0, 4096),
    "moe_intermediate_size": (0, 2**20), "first_k_dense_replace": (0, 1024), "moe_layer_freq": (1, 1024),
    "n_group": (1, 4096), "topk_group": (1, 4096), "original_max_position_embeddings": (1, 2**24),
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_ints(cfg: dict, where: str) -> None:
    for key, (lo, hi) in INT_BOUNDS.items():
        value = cfg.get(key)
        if value is not None and not (_is_int(value) and lo <= value <= hi):
            raise CheckpointError(f"{where}: {key} is {value!r}; r1 accepts an integer from {lo} to {hi}")


def _check_numbers(cfg: dict, where: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = cfg.get(key)
        if value is not None and not (_is_number(value) and math.isfinite(value)):
            raise CheckpointError(f"{where}: {key} is {value!r}; r1 expects a finite number")


def check_args(args: ModelArgs, where: str = "config.json") -> ModelArgs:
    """Refuse a ModelArgs whose sizes or floats r1 cannot build a sane model from (one line naming the field)."""
    ints = {
        "vocab_size": args.vocab_size, "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "intermediate_size": args.inter_dim, "max_position_embeddings": args.max_seq_len,
        "sliding_window": args.sliding_window, "kv_lora_rank": args.kv_lora_rank or None,
        "q_lora_rank": args.q_lora_rank, "qk_rope_head_dim": args.qk_rope_head_dim, "n_routed_experts": args.n_routed_experts,
        "num_experts_per_tok": args.n_activated_experts, "moe_intermediate_size": args.moe_inter_dim,
        "first_k_dense_replace": args.first_k_dense_replace, "original_max_position_embeddings":
        args.rope.original_max_position_embeddings,
    }
    _check_ints(ints, where)
    if args.n_heads % args.n_kv_heads:
        raise CheckpointError(f"{where}: {args.n_heads} attention heads do not share {args.n_kv_heads} key/value heads evenly")
    if args.rope_dim % 2:
        raise CheckpointError(f"{where}: the rotary dimension {args.rope_dim} is odd; RoPE rotates pairs")
    if args.n_activated_experts > args.n_routed_experts:
        raise CheckpointError(f"{where}: {args.n_activated_experts} experts per token of {args.n_routed_experts}")
    if not (_is_number(args.norm_eps) and math.isfinite(args.norm_eps) and 0 < args.norm_eps < 1):
        raise CheckpointError(f"{where}: the RMSNorm epsilon is {args.norm_eps!r}; r1 expects a number in (0, 1)")
    r = args.rope
    for name, value in (("rope theta (the RoPE base)", r.theta), ("rope scaling factor", r.factor)):
        if not (math.isfinite(value) and value > 0):
            raise CheckpointError(f"{where}: the {name} is {value}; r1 expects a finite positive number")
    if r.kind in ("yarn", "llama3") and r.original_max_position_embeddings is None:
        raise CheckpointError(f"{where}: {r.kind} rope scaling without original_max_position_embeddings")
    if r.kind == "llama3" and r.high_freq_factor == r.low_freq_factor:
        raise CheckpointError(f"{where}: llama3 rope scaling with equal high_freq_factor and low_freq_factor")
    for name in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                 "attention_factor"):
        value = getattr(r, name)
        if value is not None and not (_is_number(value) and math.isfinite(value)):
            raise CheckpointError(f"{where}: rope scaling {name} is {value!r}; r1 expects a finite number")
    if r.freq_factors is not None and not all(math.isfinite(v) and v > 0 for v in r.freq_factors):
        raise CheckpointError(f"{where}: the RoPE frequency factors are not all finite and positive")
    return args


def args_from_dict(cfg: dict) -> ModelArgs:
    if not isinstance(cfg, dict):
        raise CheckpointError("config.json is not a JSON object")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"config.json: architectures is {archs!r}; r1 expects a list of names")
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {arch or '(none in config.json)'}; r1 runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    _check_ints(cfg, "config.json")
    _check_numbers(cfg, "config.json", ("rms_norm_eps", "rope_theta", "routed_scaling_factor"))
    try:
        n_heads = cfg["num_attention_heads"]
        common = dict(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            inter_dim=cfg["intermediate_size"],
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            rope=_rope_args(cfg),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitectureError(f"unsupported activation {cfg['hidden_act']} (r1 supports silu)")
        if arch == "Qwen2ForCausalLM":
            common["qkv_bias"] = True
            if cfg.get("use_sliding_window"):
                common["sliding_window"] = cfg.get("sliding_window")
                common["max_window_layers"] = cfg.get("max_window_layers", 0)
        if arch in ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"):
            v3 = arch == "DeepseekV3ForCausalLM"
            q = cfg.get("quantization_config") or {}
            fp8 = None
            if q.get("quant_method") == "fp8":
                fp8 = tuple(q.get("weight_block_size") or (128, 128))
            common.update(
                q_lora_rank=cfg.get("q_lora_rank"),
                kv_lora_rank=cfg["kv_lora_rank"],
                qk_nope_head_dim=cfg["qk_nope_head_dim"],
                qk_rope_head_dim=cfg["qk_rope_head_dim"],
                v_head_dim=cfg["v_head_dim"],
                n_routed_experts=cfg.get("n_routed_experts") or 0,
                n_shared_experts=cfg.get("n_shared_experts") or 0,
                n_activated_experts=cfg.get("num_experts_per_tok") or 0,
                moe_inter_dim=cfg.get("moe_intermediate_size") or 0,
                first_k_dense_replace=cfg.get("first_k_dense_replace") or 0,
                moe_layer_freq=cfg.get("moe_layer_freq") or 1,
                n_group=cfg.get("n_group") or 1,
                topk_group=cfg.get("topk_group") or 1,
                topk_method=cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy"),
                scoring_func=cfg.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
                # transformers' V2 never renormalises the top-k weights; V3 does when norm_topk_prob.
                norm_topk_prob=bool(cfg.get("norm_topk_prob", v3)) and v3,
                routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
                fp8_block=fp8,
                n_mtp_layers=int(cfg.get("num_nextn_predict_layers") or 0),
            )
            # transformers' V2 and V3 make every layer from first_k_dense_replace on MoE; so do the Hub configs
            # (moe_layer_freq 1). We honour a larger freq the way DeepSeek's own code does.
        return check_args(ModelArgs(**common))
    except KeyError as e:
        raise CheckpointError(f"config.json lacks the field {e.args[0]!r} that {arch} needs") from None
    except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong type anywhere else
        raise CheckpointError(f"config.json has a value r1 cannot use ({e})") from None


def load_config(folder: str | Path) -> ModelArgs:
    return args_from_dict(read_config_json(folder))


def read_config_json(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    cfg = read_json(path)
    if cfg is None:
        raise CheckpointError(f"{path} is missing: not a model folder")
    return cfg
