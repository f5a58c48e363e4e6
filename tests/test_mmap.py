"""``nemojax.load(..., mmap=True)`` / ``--mmap``: parameters alias the safetensors files' read-only memory maps (by
pointer, inside the file's mapped ranges of /proc/self/maps), logits and tokens equal the normal load, the
offloaded experts stay per-expert views of the files, and the command line passes the option through."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax import quant
from nemojax.checkpoint import MapReport, load_params, save_orbax, save_params
from nemojax.checkpoint.write import checkpoint_tensors
from nemojax.cli import main
from nemojax.params import init_params

from .conftest import tiny_config
from .tiny_tokenizer import make_tokenizer

CFG = tiny_config(n_routed_experts=8, num_experts_per_tok=3)
DTYPE = {"bfloat16": "bfloat16", "float32": "float32", "nvfp4": "float32", "fp8": "float32",
         "hlwq-q5": "float32"}  # the dtype each folder is loaded in


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A checkpoint per kind: BF16, FP32, and NVFP4, FP8 and HLWQ quantized here from fresh random FP32 weights."""
    p32 = init_params(CFG, 31, dtype="float32")
    out = {}
    kinds = [("bfloat16", init_params(CFG, 32, dtype="bfloat16")), ("float32", p32),
             ("nvfp4", quant.apply(p32, CFG, "nvfp4-all"))]
    for kind, params in kinds + [(r, quant.apply(p32, CFG, r)) for r in ("fp8", "hlwq-q5")]:
        d = tmp_path_factory.mktemp(kind)
        save_params(params, CFG, d)
        make_tokenizer(d, vocab_size=CFG.vocab_size)
        out[kind] = str(d)
    return out


def _ids(seed=3):
    return np.random.default_rng(seed).integers(3, CFG.vocab_size, (2, 11))


def _prompts():
    rng = np.random.default_rng(9)
    return [list(rng.integers(3, CFG.vocab_size, m)) for m in (7, 12)]


def file_ranges(path: str) -> list[tuple[int, int]]:
    """The address ranges this process has mapped from file ``path`` (/proc/self/maps)."""
    real, out = os.path.realpath(path), []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == real:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi))
    return out


def _leaves(params):
    return [x for x in jax.tree.leaves(params) if isinstance(x, jax.Array)]


@pytest.mark.parametrize("kind", ["bfloat16", "float32", "nvfp4", "fp8", "hlwq-q5"])
def test_logits_equal_normal_load(folders, kind):
    ref = nemojax.load(folders[kind], dtype=DTYPE[kind])
    m = nemojax.load(folders[kind], dtype=DTYPE[kind], mmap=True)
    assert ref.mapped is None and isinstance(m.mapped, MapReport)
    assert m.mapped.mapped_bytes > 0 and m.mapped.on_disk_bytes > 0
    np.testing.assert_array_equal(np.asarray(m.logits(_ids())), np.asarray(ref.logits(_ids())))
    for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(ref.params)):  # the banks, stacked on first use
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kind", ["bfloat16", "nvfp4"])
def test_mapped_arrays_alias_the_file(folders, kind):
    """Every byte the report calls mapped is a parameter whose buffer lies inside this process's mapping of the
    checkpoint file; nothing of the normal load does."""
    path = os.path.join(folders[kind], "model.safetensors")
    report = MapReport()
    params = load_params(folders[kind], CFG, DTYPE[kind], mmap=True, report=report)
    ranges = file_ranges(path)
    assert ranges

    def inside(x):
        p = x.unsafe_buffer_pointer()
        return any(lo <= p and p + x.nbytes <= hi for lo, hi in ranges)

    leaves = _leaves(params)
    mapped = [x for x in leaves if inside(x)]
    assert sum(x.nbytes for x in mapped) == report.mapped_bytes > 0
    assert len(mapped) == report.mapped_tensors
    assert report.mapped_bytes + report.copied_bytes == sum(x.nbytes for x in leaves)
    assert report.mapped_fraction > 0.5  # the writer aligns every tensor whose size allows it
    if kind == "bfloat16":  # stored as used, except the stacked banks (copied into RAM without bank_views)
        banks = sum(lp["mixer"]["experts"][k].nbytes for lp in params["layers"] if "experts" in lp["mixer"]
                    for k in ("up_proj", "down_proj"))
        assert report.copied_bytes >= banks
    plain = load_params(folders[kind], CFG, DTYPE[kind])
    ranges = file_ranges(path)
    assert not any(any(lo <= x.unsafe_buffer_pointer() < hi for lo, hi in ranges) for x in _leaves(plain))


def test_sharded_writer_aligns_tensors(tmp_path):
    """Shards of ``save_params(max_shard_bytes=...)`` start their data at 64 bytes and store every tensor whose size
    is whole 64-byte blocks at an aligned offset (the others last): a mmap load copies exactly the tensors left
    misaligned."""
    params = quant.apply(init_params(CFG, 34, dtype="float32"), CFG, "nvfp4-all")
    save_params(params, CFG, tmp_path, max_shard_bytes=200_000)
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(shards) > 2
    odd = 0  # bytes of the non-expert tensors at offsets that are not multiples of 64
    for f in shards:
        sf = nemojax.checkpoint.SafeFile(tmp_path / f)
        assert sf._base % 64 == 0
        for n in sf.keys():
            nb, aligned = sf.get(n).nbytes, (sf._base + sf._info[n][2]) % 64 == 0
            assert aligned or nb % 64, n
            if not aligned and ".experts." not in n:
                odd += nb
    report = MapReport()
    load_params(tmp_path, CFG, "float32", mmap=True, bank_views=True, report=report)
    assert report.copied_bytes == odd and report.mapped_bytes > 10 * odd and report.on_disk_bytes > 0


def test_file_rewritten_in_place_changes_mapped_params_renamed_file_does_not(tmp_path):
    """What docs/real-shapes.md says: bytes written into the mapped file show up in the parameters; a new file
    renamed over it (what ``nemojax convert --force`` does) leaves them as they were."""
    params = init_params(CFG, 33, dtype="float32")
    save_params(params, CFG, tmp_path)
    path = str(tmp_path / "model.safetensors")
    m = nemojax.load(tmp_path, dtype="float32", mmap=True)
    norm = m.params["norm_f"]
    want = np.asarray(params["norm_f"]).copy()
    fresh = np.random.default_rng(5).standard_normal(want.shape).astype(np.float32)
    tensors = dict(checkpoint_tensors(params, CFG, "original"))
    new = {**tensors, "backbone.norm_f.weight": fresh}
    new_path = str(tmp_path / "new.safetensors")
    nemojax.checkpoint.save_file(new, new_path)
    os.replace(new_path, path)  # atomic replacement: the old inode stays mapped
    np.testing.assert_array_equal(np.asarray(jnp.copy(norm)), want)
    m2 = nemojax.load(tmp_path, dtype="float32", mmap=True)
    np.testing.assert_array_equal(np.asarray(jnp.copy(m2.params["norm_f"])), fresh)
    sf = nemojax.checkpoint.SafeFile(path)
    off = sf._base + sf._info["backbone.norm_f.weight"][2]
    with open(path, "r+b") as f:  # in place: the mapping sees it
        f.seek(off)
        f.write((fresh * 2).tobytes())
    np.testing.assert_array_equal(np.asarray(jnp.copy(m2.params["norm_f"])), fresh * 2)


def _host_views(off, path):
    """Every routed-expert leaf of the offloaded model's host stores is a list of E separate arrays (no stacked
    [E, ...] copy) lying inside this process's mapping of ``path`` (the 4-byte scalar scales are copies)."""
    ranges, n = file_ranges(path), 0
    for lay in off.experts.layers.values():
        for per_expert in lay.host:
            assert isinstance(per_expert, list) and len(per_expert) == CFG.n_routed_experts
            for a in per_expert:
                if a.nbytes >= 64:
                    p = a.ctypes.data
                    assert any(lo <= p and p + a.nbytes <= hi for lo, hi in ranges)
                    n += a.nbytes
    return n


def test_offload_tokens_equal_resident_and_experts_stay_views(folders):
    d = folders["float32"]
    ref = nemojax.load(d, dtype="float32").generate(_prompts(), 6)
    m = nemojax.load(d, dtype="float32", mmap=True)
    off = m.offload(3)
    assert all("experts" not in lp["mixer"] for lp in off.params["layers"])
    np.testing.assert_array_equal(off.generate(_prompts(), 6), ref)
    st = off.experts.stats
    assert st.misses == 0 and off.experts.slot_bytes == 0  # the prefill (19 live tokens) read them in place too
    assert st.in_place >= 6 * CFG.num_experts_per_tok  # the prefill and the decode steps (2 rows)
    assert _host_views(off, os.path.join(d, "model.safetensors")) == m.mapped.on_disk_bytes > 0


def test_offload_nvfp4_logits_and_views(folders):
    d = folders["nvfp4"]
    ref = np.asarray(nemojax.load(d, dtype="float32").logits(_ids()))
    off = nemojax.load(d, dtype="float32", mmap=True).offload(2)
    np.testing.assert_allclose(np.asarray(off.logits(_ids())), ref, rtol=1e-5, atol=1e-5)
    assert _host_views(off, os.path.join(d, "model.safetensors")) > 0
    few = _ids()[:, :3]  # 6 rows: the experts are read in place, not through the slots
    ref_few = np.asarray(nemojax.load(d, dtype="float32").logits(few))
    before = off.experts.stats.in_place
    np.testing.assert_allclose(np.asarray(off.logits(few)), ref_few, rtol=1e-5, atol=1e-5 * np.abs(ref_few).max())
    assert off.experts.stats.in_place > before


@pytest.mark.parametrize("kind", ["float32", "nvfp4"])
def test_in_place_prefill_needs_no_slots(folders, kind):
    """A CPU reading mapped experts in place runs prefill-sized forwards on each expert's own rows: the logits of
    the resident model, no slot allocated, nothing copied."""
    d = folders[kind]
    off = nemojax.load(d, dtype="float32", mmap=True).offload(2)
    for ids in (_ids(5)[:, :2], _ids(5), _ids(6)[:1]):  # 4 rows (every row per expert), 22 rows, 11 rows
        ref = np.asarray(nemojax.load(d, dtype="float32").logits(ids))
        got = np.asarray(off.logits(ids))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    st = off.experts.stats
    assert off.experts.slot_bytes == 0 and st.misses == st.hits == st.bytes_moved == 0 and st.in_place > 0


# ----------------------------------------------------------------------------------------------- the command line
def _run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err.strip().splitlines()


@pytest.mark.parametrize("extra", [[], ["--expert-cache", "2"]])
def test_cli_generate_mmap(folders, capsys, extra):
    args = ["generate", "--model", folders["float32"], "--prompt", "hello there", "--max-new-tokens", "3",
            "--dtype", "float32", "--json", *extra]
    rc, out, _ = _run(capsys, *args)
    assert rc == 0
    want = json.loads(out)
    rc, out, _ = _run(capsys, *args, "--mmap")
    assert rc == 0
    got = json.loads(out)
    assert got["token_ids"] == want["token_ids"] and len(got["token_ids"]) > 0
    assert "mmap" not in want and got["mmap"]["mapped_bytes"] > 0 and got["mmap"]["on_disk_bytes"] > 0


def test_cli_verify_mmap(folders, capsys):
    rc, out, _ = _run(capsys, "verify", folders["bfloat16"], "--mmap", "--json")
    r = json.loads(out)
    assert rc == 0 and r["ok"] and r["mapped_bytes"] > 0


def _one_error(capsys, cmd, *args):
    rc, _, lines = _run(capsys, cmd, *args)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"nemojax {cmd}: error: ") and "--mmap" in lines[0], lines
    return lines[0]


def test_cli_mmap_refused_for_orbax_and_off_cpu(folders, capsys, tmp_path, monkeypatch):
    orbax = tmp_path / "orbax"
    params = nemojax.load(folders["bfloat16"]).params
    save_orbax(params, CFG, orbax, side_files_from=folders["bfloat16"])
    line = _one_error(capsys, "generate", "--model", orbax, "--prompt", "hi", "--mmap")
    assert "orbax" in line
    assert "orbax" in _one_error(capsys, "verify", orbax, "--mmap")
    with pytest.raises(ValueError, match=r"mmap=True: .* orbax"):
        nemojax.load(orbax, mmap=True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    line = _one_error(capsys, "generate", "--model", folders["bfloat16"], "--prompt", "hi", "--mmap")
    assert "CPU backend" in line and "'gpu'" in line
    assert "CPU backend" in _one_error(capsys, "serve", "--model", folders["bfloat16"], "--mmap")
    with pytest.raises(ValueError, match="mmap=True needs the CPU backend"):
        nemojax.load(folders["bfloat16"], mmap=True)


def _rss_file_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:")) / 1024


def test_fetched_expert_pages_leave_the_resident_set(tmp_path):
    """After an expert's bytes are copied out of its file view, its pages stop counting in the process's RSS
    (they stay in the page cache): reading every expert of a large checkpoint must not grow the RSS by all of it."""
    from nemojax.experts.bank import drop_mapped_pages

    path = tmp_path / "experts.bin"
    data = np.random.default_rng().integers(0, 255, 96 * 2 ** 20, dtype=np.uint8)
    data.tofile(path)
    view = np.memmap(path, dtype=np.uint8, mode="r", shape=data.shape).reshape(96, -1)
    before = _rss_file_mb()
    copy = np.array(view[10:90])  # the fetch: a copy of some experts
    touched = _rss_file_mb()
    np.testing.assert_array_equal(copy, data.reshape(96, -1)[10:90])
    drop_mapped_pages(view[10])
    after = _rss_file_mb()
    assert touched - before > 60, (before, touched)
    assert touched - after > 60, (before, touched, after)
    np.testing.assert_array_equal(np.asarray(view[50]), data.reshape(96, -1)[50])  # still readable afterwards
    drop_mapped_pages(np.zeros(3))  # not a view of a file: nothing happens


def test_model_replace_keeps_the_rest_and_names_unknown_fields():
    m = nemojax.load(os.path.join(os.path.dirname(nemojax.__file__), "default_model"), dtype="float32")
    p2 = jax.tree.map(lambda a: a * 0 + 1 if a.ndim == 1 else a, m.params)
    r = m.replace(params=p2)
    assert r.config is m.config and r.experts is m.experts and r.params is p2 and m.params is not p2
    with pytest.raises(TypeError, match="unknown field.*'parms'"):
        m.replace(parms=p2)


def test_mapped_fp8_load_does_not_scan_the_expert_codes(folders, monkeypatch):
    """The FP8 NaN-code scan reads every byte it checks (pages a mapped load must leave on disk: 29 GB of experts
    at the real shapes), so a mapped load scans every module but the routed experts, and a plain load all."""
    import nemojax.formats.fp8 as fp8

    scanned, orig = {}, fp8.check_arrays
    monkeypatch.setattr(fp8, "check_arrays", lambda *a, scan_codes=True, **k: (
        scanned.__setitem__(a[3], scan_codes), orig(*a, scan_codes=scan_codes, **k))[1])
    nemojax.load(folders["fp8"], dtype="float32", mmap=True)
    experts = {m for m in scanned if ".experts." in m}
    assert experts and not any(scanned[m] for m in experts)
    assert any(scanned[m] for m in set(scanned) - experts)
    scanned.clear()
    nemojax.load(folders["fp8"], dtype="float32")
    assert scanned and all(scanned.values())


@pytest.mark.parametrize("kind", ["hlwq-q5", "nvfp4-all", "fp8-all"])
def test_mapped_load_leaves_the_expert_pages_unread(tmp_path, kind):
    """Loading with mmap=True reads none of the routed experts: the load's checks sample a few pages of each
    tensor (the HLWQ bit-order check once faulted in every page of every expert: the 30B checkpoint's 19 GB; the
    FP8 NaN-code scan read all 29 GB of its experts)."""
    cfg = tiny_config(hidden_size=512, moe_intermediate_size=1024, n_routed_experts=32, num_experts_per_tok=2,
                      hybrid_override_pattern="ME", num_hidden_layers=2)
    params = quant.apply(init_params(cfg, 7, dtype="float32"), cfg, kind)
    save_params(params, cfg, tmp_path)
    bank = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    before = _rss_file_mb()
    m = nemojax.load(str(tmp_path), dtype="float32", mmap=True)
    grown = _rss_file_mb() - before
    assert m.mapped.on_disk_bytes > 0.8 * bank, m.mapped  # the experts are most of the file
    assert grown < 0.1 * bank / 2 ** 20, (grown, bank / 2 ** 20)
