"""tools/quality_table.py on a handful of held-out problems of the default model (fast, CPU)."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import quality_table as qt  # noqa: E402

MODEL = os.path.join(REPO, "nemojax", "default_model")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(MODEL, "heldout.jsonl")),
                                reason="default model not present")


@pytest.fixture(scope="module")
def result():
    """Run the command itself, in its own process (as a user does; it also keeps this heavy sweep's compiled
    programs out of the test process)."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "quality_table.py"), "--model", MODEL, "--n", "4",
                          "--max-new-tokens", "160", "--calib-batches", "1", "--quiet", "--json"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_every_variant_and_ranges(result):
    rows = {r["key"]: r for r in result["variants"]}
    assert list(rows) == [k for k, *_ in qt.VARIANTS]
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["accuracy_per_task"] and all(0.0 <= v <= 1.0 for v in r["accuracy_per_task"].values())
        assert set(r["accuracy_per_task"]) <= set(qt.TASKS)
        assert 1.0 <= r["ppl"] < 100.0
        assert 0.0 <= r["top1_agreement"] <= 1.0
    assert result["setup"]["n_problems"] == 4 and result["setup"]["assistant_tokens"] > 100


def test_reference_and_quantized_divergence(result):
    rows = {r["key"]: r for r in result["variants"]}
    assert rows["bf16"]["kl"] == 0.0 and rows["bf16"]["top1_agreement"] == 1.0
    for k in ("nvfp4-w4a16", "nvfp4-w4a4", "hlwq-q5", "hlwq-q5-converged"):
        assert rows[k]["kl"] > 0.0, k
        assert rows[k]["top1_agreement"] > 0.9, k  # 4-5 bit formats keep the argmax almost everywhere
    # quantizing the activations as well can only add error on top of the same weights (up to noise)
    assert rows["nvfp4-w4a4"]["kl"] >= 0.5 * rows["nvfp4-w4a16"]["kl"]


def test_markdown_table(result):
    md = qt.markdown(result)
    lines = [l for l in md.splitlines() if l.startswith("|")]
    assert len(lines) == 2 + len(qt.VARIANTS)
    for _, label, *_ in qt.VARIANTS:
        assert any(l.startswith(f"| {label} |") for l in lines), label
    assert len({l.count("|") for l in lines}) == 1  # every row has every column


def test_recover_args_matches_corpus():
    import corpus

    for p in corpus.heldout_problems(60, seed=3):
        q = {"question": p["question"], "answer": p["answer"], "task": p["task"]}
        args = qt.recover_args(q)
        assert corpus.solve(p["task"], tuple(args)) == p["answer"]
        assert corpus._REASONERS[p["task"]](tuple(args)) == corpus._REASONERS[p["task"]](tuple(p["args"]))
