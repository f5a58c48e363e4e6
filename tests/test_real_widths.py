"""The real widths with all 128 experts: hidden 2688, the real Mamba and router shapes, 128 routed experts top-6
(expert width cut to 256 and the vocabulary to 2048 so the test stays small), NVFP4 as the published checkpoint
is, loaded memory-mapped with the routed experts left on disk behind an expert cache, against the resident
load of the same files."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

import nemojax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(REPO, "tests", "fixtures", "nemotron3_nano_30b_a3b_config.json")


@pytest.fixture(scope="module")
def real_nvfp4(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_random_checkpoint",
                                                  os.path.join(REPO, "tools", "make_random_checkpoint.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    root = tmp_path_factory.mktemp("real128")
    with open(REAL) as f:
        conf = json.load(f)
    conf.update(vocab_size=2048, moe_intermediate_size=256)
    with open(root / "config.json", "w") as f:
        json.dump(conf, f)
    out = str(root / "nvfp4")
    tool.make_checkpoint(str(root / "config.json"), out, "nvfp4-all", layers=2, seed=5, progress=False)
    return out


def test_128_experts_memory_mapped_and_offloaded_equal_the_resident_model(real_nvfp4):
    resident = nemojax.load(real_nvfp4, dtype="float32")  # fp32 activations: only summation order may differ
    cfg = resident.config
    assert (cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.pattern) == (2688, 128, 6, "ME")
    rng = np.random.default_rng()
    ids = rng.integers(3, cfg.vocab_size, (2, 96))  # 1152 assignments: every expert used, several rows each
    ref = np.asarray(resident.logits(ids))
    mapped = nemojax.load(real_nvfp4, dtype="float32", mmap=True)
    rep = mapped.mapped
    bank = 2 * 128 * 2688 * 256 // 2  # packed NVFP4 codes of one MoE layer's up + down banks
    assert rep is not None and rep.on_disk_bytes >= bank, rep
    off = mapped.offload(8)  # on a CPU the mapped experts are read in place, each on the rows that chose it
    np.testing.assert_allclose(np.asarray(off.logits(ids)), ref, rtol=1e-4, atol=1e-4)
    prompts = [list(r) for r in rng.integers(3, cfg.vocab_size, (2, 40))]
    want = resident.generate(prompts, 6)
    np.testing.assert_array_equal(off.generate(prompts, 6), want)
    stats = off.experts.stats.summary()
    assert stats["misses"] == 0 and stats["in_place"] > 128 and off.experts.slot_bytes == 0, stats
    slots = resident.offload(8)  # 8 of 128 experts in slots: the prompt's experts stream through the cache
    np.testing.assert_allclose(np.asarray(slots.logits(ids)), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(slots.generate(prompts, 6), want)
    stats = slots.experts.stats.summary()
    assert stats["misses"] > 8 and 0 <= stats["hit_rate"] < 1, stats
