"""Config parsing/validation and the parameter layout of the real Nemotron-3-Nano-30B-A3B config.

Everything here is shape arithmetic on the real config.json: no weights are allocated or downloaded.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import tracemalloc

import jax
import jax.numpy as jnp
import pytest

from nemojax import Config, ConfigError
from nemojax.params import abstract_params, count_params, is_spec, param_specs, tree_paths
from tests.conftest import TINY, requires_torch

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
REAL_JSON = os.path.join(FIXTURES, "nemotron3_nano_30b_a3b_config.json")
HF5_JSON = os.path.join(FIXTURES, "nemotron3_nano_30b_a3b_config_hf5.json")

PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
M_IDX = (0, 2, 4, 7, 9, 11, 14, 16, 18, 21, 23, 25, 28, 30, 32, 35, 37, 39, 41, 44, 46, 48, 50)
E_IDX = (1, 3, 6, 8, 10, 13, 15, 17, 20, 22, 24, 27, 29, 31, 34, 36, 38, 40, 43, 45, 47, 49, 51)
A_IDX = (5, 12, 19, 26, 33, 42)

TOTAL_PARAMS = 31_577_940_288
ACTIVE_PARAMS = 3_227_757_504


def real_dict() -> dict:
    with open(REAL_JSON) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def real_cfg() -> Config:
    return Config.from_json(REAL_JSON)


def _raises(d: dict, field: str):
    with pytest.raises(ConfigError) as ei:
        Config.from_dict(d)
    assert field in str(ei.value), f"message does not name {field!r}: {ei.value}"
    return ei.value


# ---------------------------------------------------------------------------------------------- real config
def test_real_config_parses(real_cfg):
    c = real_cfg
    assert c.pattern == PATTERN
    assert c.num_hidden_layers == 52
    assert (c.pattern.count("M"), c.pattern.count("E"), c.pattern.count("*"), c.pattern.count("-")) == (23, 23, 6, 0)
    assert c.layer_indices("M") == M_IDX
    assert c.layer_indices("E") == E_IDX
    assert c.layer_indices("*") == A_IDX
    assert c.pattern[-1] == "E"
    assert c.layers_block_type[:6] == ("linear_attention", "moe", "linear_attention", "moe", "linear_attention",
                                       "full_attention")
    assert (c.hidden_size, c.vocab_size) == (2688, 131072)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 2, 128)
    assert (c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size, c.n_groups) == (64, 64, 128, 8)
    assert (c.conv_kernel, c.chunk_size, c.use_conv_bias) == (4, 128, True)
    assert c.mamba_d_inner == 4096  # nh * P, not expand * H (= 5376)
    assert c.mamba_in_proj_dim == 10304
    assert c.mamba_conv_dim == 6144
    assert (c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (128, 6, 1856)
    assert (c.n_shared_experts, c.moe_shared_expert_intermediate_size) == (1, 3712)
    assert (c.n_group, c.topk_group, c.norm_topk_prob, c.routed_scaling_factor) == (1, 1, True, 2.5)
    assert c.intermediate_size == 1856
    assert c.layer_norm_epsilon == 1e-5
    assert c.tie_word_embeddings is False and c.residual_in_fp32 is False
    assert c.max_position_embeddings == 262144
    assert c.time_step_limit is None  # absent in the file -> no dt clamp
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, (2,), 0)
    assert c.torch_dtype == "bfloat16"


def test_eos_token_list():
    d = real_dict()
    d["eos_token_id"] = [2, 11]
    assert Config.from_dict(d).eos_token_id == (2, 11)
    assert Config.from_dict(d).to_dict()["eos_token_id"] == [2, 11]


def test_hf5_fixture_equal(real_cfg):
    with open(HF5_JSON) as f:
        d5 = json.load(f)
    assert "hybrid_override_pattern" not in d5 and "num_hidden_layers" not in d5
    assert len(d5["layers_block_type"]) == 52
    # transformers 5 writes time_step_limit = [0.0, {"__float__": "Infinity"}] (its default, "no clamp")
    assert Config.from_json(HF5_JSON) == real_cfg
    assert Config.from_dict(d5) == real_cfg


def test_from_json_accepts_folder(tmp_path, real_cfg):
    (tmp_path / "config.json").write_text(json.dumps(real_dict()))
    assert Config.from_json(tmp_path) == real_cfg


# ---------------------------------------------------------------------------------------------- parameters
def test_count_params(real_cfg):
    assert count_params(real_cfg) == TOTAL_PARAMS


def _specs_by_name(cfg) -> dict:
    return {s.ckpt: s for _, s in tree_paths(param_specs(cfg))}


def test_tensor_names_and_shapes(real_cfg):
    specs = _specs_by_name(real_cfg)
    H, V = 2688, 131072
    expect = {  # the published checkpoint's tensors: checkpoint name -> checkpoint shape
        "backbone.embeddings.weight": (V, H),
        "backbone.norm_f.weight": (H,),
        "lm_head.weight": (V, H),
        "backbone.layers.0.norm.weight": (H,),
        "backbone.layers.1.norm.weight": (H,),
        "backbone.layers.5.norm.weight": (H,),
        "backbone.layers.0.mixer.in_proj.weight": (10304, H),
        "backbone.layers.0.mixer.conv1d.weight": (6144, 1, 4),
        "backbone.layers.0.mixer.conv1d.bias": (6144,),
        "backbone.layers.0.mixer.dt_bias": (64,),
        "backbone.layers.0.mixer.A_log": (64,),
        "backbone.layers.0.mixer.D": (64,),
        "backbone.layers.0.mixer.norm.weight": (4096,),
        "backbone.layers.0.mixer.out_proj.weight": (H, 4096),
        "backbone.layers.1.mixer.gate.weight": (128, H),
        "backbone.layers.1.mixer.gate.e_score_correction_bias": (128,),
        "backbone.layers.1.mixer.shared_experts.up_proj.weight": (3712, H),
        "backbone.layers.1.mixer.shared_experts.down_proj.weight": (H, 3712),
        "backbone.layers.5.mixer.q_proj.weight": (4096, H),
        "backbone.layers.5.mixer.k_proj.weight": (256, H),
        "backbone.layers.5.mixer.v_proj.weight": (256, H),
        "backbone.layers.5.mixer.o_proj.weight": (H, 4096),
    }
    for name, shape in expect.items():
        assert name in specs, name
        s = specs[name]
        assert (s.ckpt_shape or s.shape) == shape, (name, s)
        assert not s.stacked
    # conv1d: [C, K] in the tree, [C, 1, K] in the checkpoint
    assert specs["backbone.layers.0.mixer.conv1d.weight"].shape == (6144, 4)
    # per-expert checkpoint tensors, stacked [E, ...] in the tree
    up = specs["backbone.layers.1.mixer.experts.{e}.up_proj.weight"]
    down = specs["backbone.layers.1.mixer.experts.{e}.down_proj.weight"]
    assert up.stacked and down.stacked
    assert up.shape == (128, 1856, H) and down.shape == (128, H, 1856)
    assert up.shape[1:] == (1856, H) and down.shape[1:] == (H, 1856)  # one checkpoint tensor per expert
    names = [up.ckpt.format(e=e) for e in range(up.shape[0])]
    assert names[0] == "backbone.layers.1.mixer.experts.0.up_proj.weight"
    assert names[127] == "backbone.layers.1.mixer.experts.127.up_proj.weight"
    assert down.ckpt.format(e=5) == "backbone.layers.1.mixer.experts.5.down_proj.weight"
    # every layer has exactly its own mixer's tensors
    for i in A_IDX:
        assert f"backbone.layers.{i}.mixer.q_proj.weight" in specs
        assert f"backbone.layers.{i}.mixer.in_proj.weight" not in specs
    for i in M_IDX:
        assert f"backbone.layers.{i}.mixer.A_log" in specs
    for i in E_IDX:
        assert f"backbone.layers.{i}.mixer.gate.weight" in specs
    assert not any(".mixer.up_proj." in n for n in specs)  # no dense MLP layers in this model
    # 2 globals + lm_head + per layer: norm + mixer (M: 8, E: 6, *: 4)
    assert len(specs) == 3 + 52 + 23 * 8 + 23 * 6 + 6 * 4


def test_dense_mlp_layer_shapes():
    d = real_dict()
    d["hybrid_override_pattern"] = "-" + PATTERN[1:]
    specs = _specs_by_name(Config.from_dict(d))
    assert specs["backbone.layers.0.mixer.up_proj.weight"].shape == (1856, 2688)
    assert specs["backbone.layers.0.mixer.down_proj.weight"].shape == (2688, 1856)


def test_tied_embeddings_drop_lm_head(real_cfg):
    d = real_dict()
    d["tie_word_embeddings"] = True
    cfg = Config.from_dict(d)
    assert "lm_head" not in param_specs(cfg)
    assert count_params(cfg) == TOTAL_PARAMS - 131072 * 2688


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def test_abstract_params_allocate_nothing(real_cfg, tiny_cfg):
    abstract_params(tiny_cfg)  # warm up any lazy jax initialisation
    rss0 = _rss_bytes()
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        tree = abstract_params(real_cfg, "bfloat16")
        specs = param_specs(real_cfg)
        n = count_params(real_cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    dt = time.perf_counter() - t0
    rss_growth = _rss_bytes() - rss0
    assert n == TOTAL_PARAMS
    assert peak < 50 * 2**20, f"tracemalloc peak {peak / 2**20:.1f} MiB"
    assert rss_growth < 50 * 2**20, f"RSS grew {rss_growth / 2**20:.1f} MiB"
    assert dt < 5.0, f"building abstract params took {dt:.2f} s"

    leaves = jax.tree.leaves(tree)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert all(is_spec(s) for s in jax.tree.leaves(specs, is_leaf=is_spec))
    assert jax.tree.structure(tree) == jax.tree.structure(jax.tree.map(lambda s: 0, specs, is_leaf=is_spec))
    assert sum(math.prod(x.shape) for x in leaves) == TOTAL_PARAMS

    fp32 = {"A_log", "D", "e_score_correction_bias"}
    for path, leaf in tree_paths(tree):
        want = jnp.float32 if path.rsplit(".", 1)[-1] in fp32 else jnp.bfloat16
        assert leaf.dtype == want, (path, leaf.dtype)
    assert tree["layers"][0]["mixer"]["A_log"].dtype == jnp.float32
    assert tree["layers"][0]["mixer"]["D"].dtype == jnp.float32
    assert tree["layers"][0]["mixer"]["dt_bias"].dtype == jnp.bfloat16
    assert tree["layers"][1]["mixer"]["e_score_correction_bias"].dtype == jnp.float32
    assert tree["layers"][1]["mixer"]["experts"]["up_proj"].shape == (128, 1856, 2688)
    assert tree["layers"][0]["mixer"]["conv1d"].shape == (6144, 4)
    # the fp32 family: 23 * (64 + 64 + 128) * 4 bytes (matches the checkpoint scan in §6)
    fp32_bytes = sum(math.prod(x.shape) * 4 for x in leaves if x.dtype == jnp.float32)
    assert fp32_bytes == 23_552
    # float32 load keeps everything fp32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract_params(real_cfg, "float32")))


def active_params(cfg: Config) -> int:
    """Per-token active parameters (§7): everything except the embedding table (one row counts) and all
    but num_experts_per_tok of the routed experts in each MoE layer."""
    total = 0
    for _, s in tree_paths(param_specs(cfg)):
        n = math.prod(s.shape)
        if s.stacked:
            n = n // cfg.n_routed_experts * cfg.num_experts_per_tok
        elif s.ckpt == "backbone.embeddings.weight":
            n = cfg.hidden_size
        total += n
    return total


def test_active_params(real_cfg):
    assert active_params(real_cfg) == ACTIVE_PARAMS
    # §7 breakdown
    specs = param_specs(real_cfg)
    size = lambda tree: sum(math.prod(s.shape) for s in jax.tree.leaves(tree, is_leaf=is_spec))
    assert size(specs["layers"][0]) == 38_744_896
    assert size(specs["layers"][5]) == 23_399_040
    assert size(specs["layers"][1]) == 1_297_468_160
    assert size(specs["layers"][1]["mixer"]["experts"]) == 1_277_165_568
    moe_active = size(specs["layers"][1]) - size(specs["layers"][1]["mixer"]["experts"]) * (128 - 6) // 128
    assert moe_active == 80_169_728
    assert ACTIVE_PARAMS - 131072 * 2688 - 2688 == 2_875_433_280  # "2.88 B excluding lm_head/norm_f"


# ---------------------------------------------------------------------------------------------- aliases
def test_legacy_aliases(real_cfg):
    d = real_dict()
    ren = {"n_groups": "mamba_n_groups", "conv_kernel": "mamba_d_conv", "chunk_size": "mamba_chunk_size",
           "use_conv_bias": "mamba_conv_bias", "head_dim": "attention_head_dim",
           "n_routed_experts": "num_local_experts", "ssm_state_size": "mamba_d_state",
           "expand": "mamba_expand", "time_step_min": "mamba_dt_min", "time_step_max": "mamba_dt_max",
           "time_step_floor": "mamba_dt_init_floor"}
    for new, old in ren.items():
        d[old] = d.pop(new)
    del d["layer_norm_epsilon"], d["norm_eps"]
    d["rms_norm_eps"] = 1e-5
    assert Config.from_dict(d) == real_cfg

    d = real_dict()
    del d["layer_norm_epsilon"]  # norm_eps alone
    assert Config.from_dict(d) == real_cfg

    d = real_dict()
    d["mamba_dt_limit"] = [0.001, 1e9]
    assert Config.from_dict(d).time_step_limit == (0.001, 1e9)


def test_alias_disagreement_names_both_fields():
    d = real_dict()
    d["mamba_n_groups"] = 4
    err = _raises(d, "mamba_n_groups")
    assert "n_groups" in str(err)


def test_alias_values_really_used():
    d = dict(TINY)
    for k in ("n_groups", "conv_kernel", "chunk_size", "head_dim", "n_routed_experts", "layer_norm_epsilon"):
        d.pop(k)
    d["mamba_n_groups"] = 4
    d["mamba_d_conv"] = 3
    d["mamba_chunk_size"] = 8
    d["mamba_conv_bias"] = False
    d["attention_head_dim"] = 8
    d["num_local_experts"] = 16
    d["rms_norm_eps"] = 1e-6
    d["mamba_dt_limit"] = [0.0, 100.0]
    c = Config.from_dict(d)
    assert (c.n_groups, c.conv_kernel, c.chunk_size, c.use_conv_bias) == (4, 3, 8, False)
    assert (c.head_dim, c.n_routed_experts, c.layer_norm_epsilon, c.time_step_limit) == (8, 16, 1e-6, (0.0, 100.0))
    assert "conv1d_bias" not in param_specs(c)["layers"][0]["mixer"]


def test_layers_block_type_legacy_names():
    d = dict(TINY)
    pattern = d.pop("hybrid_override_pattern")
    names = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
    d["layers_block_type"] = [names[c] for c in pattern]
    assert Config.from_dict(d).pattern == pattern
    d["layers_block_type"] = [{"M": "linear_attention", "*": "full_attention"}.get(c, names[c]) for c in pattern]
    assert Config.from_dict(d).pattern == pattern
    d.pop("num_hidden_layers")
    assert Config.from_dict(d).num_hidden_layers == len(pattern)


def test_time_step_limit():
    d = real_dict()
    d["time_step_limit"] = [0.001, 1e9]
    assert Config.from_dict(d).time_step_limit == (0.001, 1e9)
    d["time_step_limit"] = [0, float("inf")]
    assert Config.from_dict(d).time_step_limit is None
    # JSON `Infinity` (Python's json) and transformers 5's {"__float__": "Infinity"}
    text = json.dumps(d)
    assert "Infinity" in text
    assert Config.from_dict(json.loads(text)).time_step_limit is None
    d["time_step_limit"] = [0.0, {"__float__": "Infinity"}]
    assert Config.from_dict(d).time_step_limit is None
    d["time_step_limit"] = [0.001, {"__float__": "Infinity"}]
    assert Config.from_dict(d).time_step_limit == (0.001, math.inf)
    for bad in ([0.1], "fast", [0.1, "x"], [0.5, 0.1], [-1.0, 1.0], [0.0, {"__float__": "nope"}]):
        d["time_step_limit"] = bad
        _raises(d, "time_step_limit")


# ---------------------------------------------------------------------------------------------- errors
def _with(**kw) -> dict:
    d = real_dict()
    for k, v in kw.items():
        if v is _DEL:
            d.pop(k, None)
        else:
            d[k] = v
    return d


_DEL = object()


@pytest.mark.parametrize("changes, field", [
    (dict(num_hidden_layers=51), "num_hidden_layers"),
    (dict(hybrid_override_pattern=PATTERN[:-1] + "X"), "hybrid_override_pattern"),
    (dict(hybrid_override_pattern=_DEL, layers_block_type=["linear_attention", "moe", "swa"],
          num_hidden_layers=_DEL), "layers_block_type"),
    (dict(num_key_value_heads=3), "num_attention_heads"),
    (dict(n_groups=6), "n_groups"),
    (dict(n_group=3), "n_group"),
    (dict(n_group=4, topk_group=8), "topk_group"),
    (dict(num_experts_per_tok=129), "num_experts_per_tok"),
    (dict(n_group=64, topk_group=2), "num_experts_per_tok"),  # 2 groups * 2 experts = 4 < 6
    (dict(mlp_hidden_act="gelu"), "mlp_hidden_act"),
    (dict(moe_latent_size=1024), "moe_latent_size"),
    (dict(sliding_window=4096), "sliding_window"),
    (dict(model_type="llama"), "model_type"),
    (dict(hidden_size=_DEL), "hidden_size"),
    (dict(hybrid_override_pattern=_DEL), "hybrid_override_pattern"),
    (dict(mamba_hidden_act="gelu"), "mamba_hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(n_shared_experts=2), "n_shared_experts"),
    (dict(vocab_size="big"), "vocab_size"),
])
def test_invalid_values_name_the_field(changes, field):
    _raises(_with(**changes), field)


def test_group_limited_routing_accepted():
    c = Config.from_dict(_with(n_group=8, topk_group=2))  # 2 groups of 16 experts: top-6 selectable
    assert (c.n_group, c.topk_group) == (8, 2)


def test_from_json_invalid_json_names_path(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"hidden_size": 2688,')
    with pytest.raises(ConfigError) as ei:
        Config.from_json(p)
    assert str(p) in str(ei.value)


def test_from_json_config_error_names_path(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(_with(model_type="llama")))
    with pytest.raises(ConfigError) as ei:
        Config.from_json(p)
    assert str(p) in str(ei.value) and "model_type" in str(ei.value)


def test_from_json_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        Config.from_json(tmp_path)  # a folder without config.json
    assert str(tmp_path / "config.json") in str(ei.value)
    with pytest.raises(FileNotFoundError) as ei:
        Config.from_json(tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in str(ei.value)


# ---------------------------------------------------------------------------------------------- identity
def test_hashable_and_static(real_cfg):
    other = Config.from_dict(real_dict())
    assert other == real_cfg and other is not real_cfg
    assert hash(other) == hash(real_cfg)
    assert len({real_cfg, other}) == 1
    d = real_dict()
    d["routed_scaling_factor"] = 2.0
    assert Config.from_dict(d) != real_cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        real_cfg.hidden_size = 1  # type: ignore[misc]

    calls = []

    def f(x, cfg):
        calls.append(1)
        return x * cfg.routed_scaling_factor

    g = jax.jit(f, static_argnums=1)
    assert float(g(jnp.float32(2.0), real_cfg)) == 5.0
    assert float(g(jnp.float32(2.0), other)) == 5.0
    assert len(calls) == 1  # equal config -> cache hit, no retrace


def test_to_dict_round_trip(real_cfg, tiny_cfg):
    for c in (real_cfg, tiny_cfg):
        d = c.to_dict()
        assert Config.from_dict(d) == c
        assert Config.from_dict(json.loads(json.dumps(d))) == c
        assert Config.from_dict(copy.deepcopy(d)).to_dict() == d
    d = real_dict()
    d["time_step_limit"] = [0.001, 1e9]
    c = Config.from_dict(d)
    assert Config.from_dict(c.to_dict()) == c
    assert c.to_dict()["time_step_limit"] == [0.001, 1e9]


@requires_torch
def test_transformers_accepts_to_dict(real_cfg, tiny_cfg):
    from transformers import NemotronHConfig

    for c in (real_cfg, tiny_cfg):
        hf = NemotronHConfig.from_dict(c.to_dict())
        assert tuple(hf.layers_block_type) == c.layers_block_type
        assert hf.num_hidden_layers == c.num_hidden_layers
        assert (hf.mamba_num_heads, hf.mamba_head_dim, hf.ssm_state_size, hf.n_groups, hf.conv_kernel) == \
            (c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size, c.n_groups, c.conv_kernel)
        assert (hf.n_routed_experts, hf.num_experts_per_tok, hf.n_shared_experts) == \
            (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts)
        assert (hf.moe_intermediate_size, hf.moe_shared_expert_intermediate_size) == \
            (c.moe_intermediate_size, c.moe_shared_expert_intermediate_size)
        assert (hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim) == \
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        # and transformers' own serialisation of it reads back to the same Config
        assert Config.from_dict(json.loads(hf.to_json_string())) == c


@pytest.mark.parametrize("field,value,what", [
    ("hidden_size", "128", "an integer"), ("hidden_size", 128.0, "an integer"), ("vocab_size", True, "an integer"),
    ("layer_norm_epsilon", "x", "a finite number"), ("layer_norm_epsilon", math.inf, "a finite number"),
    ("tie_word_embeddings", "false", "true or false"), ("use_conv_bias", 1, "true or false"),
    ("pad_token_id", "0", "an integer token id"), ("eos_token_id", [2, "x"], "an integer token id"),
    ("torch_dtype", 16, "a string")])
def test_field_types_are_checked(field, value, what):
    """A value of the wrong JSON type is an error naming the field, never coerced (``"false"`` is not true)."""
    d = {**TINY, field: value}
    with pytest.raises(ConfigError, match=f"config field '{field}': expected {what}"):
        Config.from_dict(d)


def test_config_file_that_is_not_an_object_utf8_or_shallow(tmp_path):
    for i, raw in enumerate([b"null", b"[1, 2]", b'{"hidden_size": "\xff"}', b"[" * 100000 + b"]" * 100000]):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "config.json").write_bytes(raw)
        with pytest.raises(ConfigError, match=str(folder / "config.json")):
            Config.from_json(folder)
    with pytest.raises(ConfigError, match="layers_block_type"):
        Config.from_dict({**TINY, "hybrid_override_pattern": None, "layers_block_type": [{}]})
