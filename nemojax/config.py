"""Nemotron-H configuration: a frozen, hashable dataclass built from a checkpoint's config.json.

Accepts the original NVIDIA form (``hybrid_override_pattern``, legacy ``mamba_*`` aliases) and the form
transformers 5 writes (``layers_block_type``). The config is static under ``jax.jit`` (hashable), so it
can be passed as a static argument.

Layer codes: ``M`` Mamba2, ``E`` MoE, ``*`` attention (GQA, no positional encoding), ``-`` dense MLP.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

__all__ = ["Config", "ConfigError", "BLOCK_TYPES"]

# pattern character <-> transformers-5 block type name
BLOCK_TYPES = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
_TYPE_TO_CHAR = {v: k for k, v in BLOCK_TYPES.items()}
_TYPE_TO_CHAR.update({"mamba": "M", "attention": "*"})  # legacy names transformers also remaps

# transformers 5 encodes non-finite floats in config.json as {"__float__": "Infinity"}
_FLOAT_TAGS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}

# legacy key -> canonical key (NVIDIA remote-code configs and transformers' backward-compat aliases)
_ALIASES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "mamba_d_state": "ssm_state_size",
    "attention_head_dim": "head_dim",
    "rms_norm_eps": "layer_norm_epsilon",
    "norm_eps": "layer_norm_epsilon",
    "num_local_experts": "n_routed_experts",
}


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# config.json field types: kind -> (accepts the JSON value, what the error says was expected)
_FIELD_TYPES = {
    "int": (_integer, "an integer"), "id": (_integer, "an integer token id"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
}


class ConfigError(ValueError):
    """An inconsistent or unsupported config.json value; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Static model configuration. Shapes: H=hidden_size, V=vocab_size, L=len(pattern)."""

    vocab_size: int
    hidden_size: int
    pattern: str  # one char per layer: M, E, *, -
    # attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    # mamba2
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    time_step_limit: tuple[float, float] | None = None  # None: no dt clamp (canonical)
    # moe
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_shared_expert_intermediate_size: int = 0
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # dense mlp
    intermediate_size: int = 0
    # misc
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    residual_in_fp32: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = 0
    torch_dtype: str = "bfloat16"

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_hidden_layers(self) -> int:
        return len(self.pattern)

    @property
    def layers_block_type(self) -> tuple[str, ...]:
        return tuple(BLOCK_TYPES[c] for c in self.pattern)

    @property
    def mamba_d_inner(self) -> int:
        """d_in = mamba_num_heads * mamba_head_dim (not expand * hidden_size)."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        """Channels of the depthwise conv: x | B | C."""
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_dim(self) -> int:
        """Rows of in_proj: z | x | B | C | dt."""
        return 2 * self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size + self.mamba_num_heads

    def layer_indices(self, char: str) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.pattern) if c == char)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond, field, msg):
            if not cond:
                raise ConfigError(f"config field {field!r}: {msg}")

        need(isinstance(self.pattern, str) and len(self.pattern) > 0, "hybrid_override_pattern", "empty layer pattern")
        bad = sorted(set(self.pattern) - set(BLOCK_TYPES))
        need(not bad, "hybrid_override_pattern",
             f"unknown block character(s) {bad} in {self.pattern!r}; expected one of M (Mamba2), E (MoE), "
             f"* (attention), - (MLP)")
        for f in ("vocab_size", "hidden_size"):
            need(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}")
        need(self.layer_norm_epsilon > 0, "layer_norm_epsilon", "must be positive")
        for f in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, f)
            for i in (v if isinstance(v, tuple) else () if v is None else (v,)):
                need(0 <= i < self.vocab_size, f, f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        if "*" in self.pattern:
            for f in ("num_attention_heads", "num_key_value_heads", "head_dim"):
                need(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}")
            need(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
                 f"{self.num_attention_heads} query heads are not divisible by num_key_value_heads="
                 f"{self.num_key_value_heads}")
        if "M" in self.pattern:
            for f in ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel",
                      "chunk_size"):
                need(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}")
            need(self.mamba_num_heads % self.n_groups == 0, "n_groups",
                 f"mamba_num_heads={self.mamba_num_heads} is not divisible by n_groups={self.n_groups}")
            if self.time_step_limit is not None:
                lo, hi = self.time_step_limit
                need(0 <= lo <= hi, "time_step_limit", f"expected 0 <= lo <= hi, got {self.time_step_limit}")
        if "E" in self.pattern:
            for f in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group",
                      "topk_group"):
                need(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}")
            need(self.n_shared_experts in (0, 1), "n_shared_experts",
                 f"only 0 or 1 shared expert is supported, got {self.n_shared_experts}")
            if self.n_shared_experts:
                need(self.moe_shared_expert_intermediate_size > 0, "moe_shared_expert_intermediate_size",
                     "must be positive when n_shared_experts=1")
            need(self.n_routed_experts % self.n_group == 0, "n_group",
                 f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
            need(self.topk_group <= self.n_group, "topk_group",
                 f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1:
                need(per_group >= 2, "n_group", "group-limited routing needs at least 2 experts per group")
            need(self.num_experts_per_tok <= self.topk_group * per_group, "num_experts_per_tok",
                 f"{self.num_experts_per_tok} experts per token but only {self.topk_group * per_group} "
                 f"are selectable (topk_group * n_routed_experts / n_group)")
        if "-" in self.pattern:
            need(self.intermediate_size > 0, "intermediate_size", "must be positive for '-' (MLP) layers")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        """Build from a config.json dict (original NVIDIA or transformers-5 form)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"config: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        for old, new in _ALIASES.items():
            if old in d:
                if new in d and d[new] != d[old] and not (old == "norm_eps"):
                    raise ConfigError(f"config fields {old!r} and {new!r} disagree: {d[old]!r} vs {d[new]!r}")
                d.setdefault(new, d.pop(old))

        mt = d.get("model_type", "nemotron_h")
        if mt != "nemotron_h":
            raise ConfigError(f"config field 'model_type': expected 'nemotron_h', got {mt!r}")

        pattern = _read_pattern(d)
        nl = d.get("num_hidden_layers")
        if nl is not None and nl != len(pattern):
            raise ConfigError(f"config field 'num_hidden_layers': {nl} does not match the layer pattern's length "
                              f"{len(pattern)} ({pattern!r})")

        # unsupported features: refuse rather than compute something else
        unsupported = {
            "mlp_hidden_act": ("relu2", None), "mamba_hidden_act": ("silu", None),
            "moe_latent_size": (None,), "sliding_window": (None,),
            "attention_bias": (False, None), "mlp_bias": (False, None), "mamba_proj_bias": (False, None),
            "use_bias": (False, None),
        }
        for f, ok in unsupported.items():
            if f in d and d[f] not in ok:
                raise ConfigError(f"config field {f!r}={d[f]!r} is not supported (supported: {ok[0]!r})")

        def get(name, default=None, required=False, kind="int"):
            """Field ``name`` of type ``kind`` (a key of ``_FIELD_TYPES``); a value of another JSON type (a string
            "128", 128.0, "false", true for a count) is a ConfigError naming it."""
            if name not in d or d[name] is None:
                if required:
                    raise ConfigError(f"config field {name!r} is missing")
                return default
            ok, what = _FIELD_TYPES[kind]
            if not ok(d[name]):
                raise ConfigError(f"config field {name!r}: expected {what}, got {d[name]!r}")
            return d[name]

        H = get("hidden_size", required=True)
        nq = get("num_attention_heads", 0)
        eos = d.get("eos_token_id", 2)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        if not all(_integer(e) for e in eos):
            raise ConfigError(f"config field 'eos_token_id': expected an integer token id or a list of them, "
                              f"got {d.get('eos_token_id')!r}")
        tsl = d.get("time_step_limit")  # honoured only when the file gives one
        if tsl is not None:
            if not isinstance(tsl, (list, tuple)) or len(tsl) != 2:
                raise ConfigError(f"config field 'time_step_limit': expected [lo, hi], got {tsl!r}")
            try:  # transformers 5 writes inf as {"__float__": "Infinity"}
                tsl = tuple(float(_FLOAT_TAGS.get(v.get("__float__"), v) if isinstance(v, dict) else v)
                            for v in tsl)
            except (TypeError, ValueError):
                raise ConfigError(f"config field 'time_step_limit': expected [lo, hi], got {tsl!r}") from None
            if tsl == (0.0, math.inf):
                tsl = None  # the canonical "no clamp"
        dtype = get("torch_dtype", None, kind="str") or get("dtype", "bfloat16", kind="str")
        kwargs = dict(
            vocab_size=get("vocab_size", required=True),
            hidden_size=H,
            pattern=pattern,
            num_attention_heads=nq,
            num_key_value_heads=get("num_key_value_heads", nq),
            head_dim=get("head_dim", (H // nq) if nq else 0),
            mamba_num_heads=get("mamba_num_heads", 0),
            mamba_head_dim=get("mamba_head_dim", 0),
            ssm_state_size=get("ssm_state_size", 128),
            n_groups=get("n_groups", 8),
            conv_kernel=get("conv_kernel", 4),
            chunk_size=get("chunk_size", 128),
            use_conv_bias=get("use_conv_bias", True, kind="bool"),
            time_step_limit=tsl,
            n_routed_experts=get("n_routed_experts", 0),
            num_experts_per_tok=get("num_experts_per_tok", 0),
            moe_intermediate_size=get("moe_intermediate_size", 0),
            moe_shared_expert_intermediate_size=get("moe_shared_expert_intermediate_size", 0),
            n_shared_experts=get("n_shared_experts", 1),
            n_group=get("n_group", 1),
            topk_group=get("topk_group", 1),
            norm_topk_prob=get("norm_topk_prob", True, kind="bool"),
            routed_scaling_factor=float(get("routed_scaling_factor", 1.0, kind="float")),
            intermediate_size=get("intermediate_size", 0),
            layer_norm_epsilon=float(get("layer_norm_epsilon", 1e-5, kind="float")),
            tie_word_embeddings=get("tie_word_embeddings", False, kind="bool"),
            residual_in_fp32=get("residual_in_fp32", False, kind="bool"),
            max_position_embeddings=get("max_position_embeddings", 4096),
            bos_token_id=get("bos_token_id", None, kind="id"),
            eos_token_id=eos,
            pad_token_id=get("pad_token_id", None, kind="id"),
            torch_dtype=str(dtype),
        )
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Config":
        """Read ``config.json`` (or a folder containing it)."""
        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, "config.json")
        try:
            with open(p, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{p}: no config.json found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        except RecursionError:
            raise ConfigError(f"{p}: not valid JSON (nested too deeply)") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None

    def to_dict(self) -> dict:
        """config.json in the original NVIDIA form (what the checkpoints ship)."""
        d = {
            "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "hybrid_override_pattern": self.pattern, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "mamba_num_heads": self.mamba_num_heads,
            "mamba_head_dim": self.mamba_head_dim, "ssm_state_size": self.ssm_state_size,
            "n_groups": self.n_groups, "conv_kernel": self.conv_kernel, "chunk_size": self.chunk_size,
            "use_conv_bias": self.use_conv_bias, "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok, "moe_intermediate_size": self.moe_intermediate_size,
            "moe_shared_expert_intermediate_size": self.moe_shared_expert_intermediate_size,
            "n_shared_experts": self.n_shared_experts, "n_group": self.n_group, "topk_group": self.topk_group,
            "norm_topk_prob": self.norm_topk_prob, "routed_scaling_factor": self.routed_scaling_factor,
            "intermediate_size": self.intermediate_size, "layer_norm_epsilon": self.layer_norm_epsilon,
            "tie_word_embeddings": self.tie_word_embeddings, "residual_in_fp32": self.residual_in_fp32,
            "max_position_embeddings": self.max_position_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "pad_token_id": self.pad_token_id, "torch_dtype": self.torch_dtype,
            "mlp_hidden_act": "relu2", "mamba_hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "mamba_proj_bias": False, "use_bias": False, "mamba_ssm_cache_dtype": "float32",
        }
        if self.time_step_limit is not None:
            d["time_step_limit"] = list(self.time_step_limit)
        return d


def _read_pattern(d: Mapping[str, Any]) -> str:
    if d.get("hybrid_override_pattern") is not None:
        p = d["hybrid_override_pattern"]
        if not isinstance(p, str):
            raise ConfigError(f"config field 'hybrid_override_pattern': expected a string, got {p!r}")
        return p
    for key in ("layers_block_type", "layer_types"):
        if d.get(key) is not None:
            types = d[key]
            if not isinstance(types, (list, tuple)):
                raise ConfigError(f"config field {key!r}: expected a list of block types, got {types!r}")
            unknown = [t for t in types if not isinstance(t, str) or t not in _TYPE_TO_CHAR]
            if unknown:
                raise ConfigError(f"config field {key!r}: unknown block type(s) {sorted(set(map(str, unknown)))}; "
                                  f"expected one of {sorted(BLOCK_TYPES.values())}")
            return "".join(_TYPE_TO_CHAR[t] for t in types)
    raise ConfigError("config field 'hybrid_override_pattern' (or 'layers_block_type') is missing")
