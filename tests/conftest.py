"""Shared fixtures: tiny configs and a transformers reference built inside the tests (never downloaded)."""
from __future__ import annotations

import os

# The suite's time goes mostly to compiling hundreds of small programs: LLVM's optimisation level 0 halves it
# (the HLO passes, fusions and layouts, are the same at every level; speed is measured by tools/, not by tests).
# JAX 0.10's XLA:CPU also has its older fusion emitters, which compile in about 60% of the time of the default
# MLIR ones (the whole suite 1070 s -> 717 s on two cores). The flag is gone from later versions (an unknown flag
# aborts the process), and the JAX 0.12 run of .ci/run tests the default emitters.
from importlib.metadata import version  # noqa: E402

OLDER_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
_flags = "--xla_cpu_multi_thread_eigen=true --xla_backend_optimization_level=0"
if tuple(int(v) for v in version("jaxlib").split(".")[:2]) < (0, 11):
    _flags += " " + OLDER_EMITTERS
os.environ.setdefault("XLA_FLAGS", _flags)
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

from nemojax import Config  # noqa: E402

TINY = dict(
    vocab_size=512, hidden_size=64, hybrid_override_pattern="MEM*E-M*E", num_hidden_layers=9,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, intermediate_size=96,
    layer_norm_epsilon=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def tiny_config(**overrides) -> Config:
    d = dict(TINY)
    d.update(overrides)
    if "hybrid_override_pattern" in overrides and "num_hidden_layers" not in overrides:
        d["num_hidden_layers"] = len(d["hybrid_override_pattern"])
    return Config.from_dict(d)


# the slowest test files, slowest first (measured with --durations): collected first, so that pytest-xdist's
# workers (``--dist loadfile``: a file per worker) start on them and finish together
SLOWEST_FIRST = ("test_offload.py", "test_sharding.py", "test_kernels.py", "test_server.py", "test_mmap.py",
                 "test_engine.py", "test_nvfp4.py", "test_hlwq_checkpoints.py", "test_quality_table.py",
                 "test_convert.py", "test_fp8.py", "test_generate.py", "test_orbax.py", "test_real_widths.py")


def assert_cpu_backend_matches(q: dict, cfg: Config, seed: int = 2) -> None:
    """Quantized params ``q`` on the "cpu" backend give the reference's logits (fp32, a 7-token prefill: within
    ``CPU_ROWS``) and the same greedy tokens from generate's decode loop."""
    import numpy as np

    from nemojax import quant
    from nemojax.generate import generate
    from nemojax.model import forward_jit

    qc = quant.set_backend(q, "cpu")
    ids = np.random.default_rng(seed).integers(3, cfg.vocab_size, (2, 7))
    ref = np.asarray(forward_jit(q, cfg, ids), np.float32)
    got = np.asarray(forward_jit(qc, cfg, ids), np.float32)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_array_equal(generate(qc, cfg, ids.tolist(), 6), generate(q, cfg, ids.tolist(), 6))


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda it: rank.get(os.path.basename(str(it.path)), len(rank)))  # stable: file order kept


@pytest.fixture(autouse=True, scope="module")
def _fresh_jit_caches():
    """Drop compiled programs between test modules: the suite compiles hundreds of distinct programs, and keeping
    them all alive grows the process for nothing."""
    yield
    jax.clear_caches()


def folder_files(folder) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes (what a failed or refused conversion must leave untouched)."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


@pytest.fixture
def tiny_cfg() -> Config:
    return tiny_config()


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


requires_torch = pytest.mark.skipif(not have_torch(), reason="needs torch + transformers (test extra)")
