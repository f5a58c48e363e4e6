"""Kernels (pallas_kernels/) against their pure-jnp references: Pallas interpret mode on CPU with NaN-poisoned
outputs (a tile the kernel never writes fails), ragged groups with empty experts, lowering for an H100 on the CPU
host (code the GPU backend rejects fails here), the Triton GEMVs under Triton's interpreter when triton + torch
are installed, compiled kernels and jax-triton when a GPU is present, and the model-level backend switch."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from nemojax import quant
from nemojax.formats import is_quantized
from nemojax.formats.hlwq import HLWQWeight
from nemojax.formats.nvfp4 import NVFP4Weight
from nemojax.generate import generate
from nemojax.model import forward_jit
from nemojax.params import init_params
from pallas_kernels import common as C
from pallas_kernels import hlwq as HK
from pallas_kernels import nvfp4 as NK
from pallas_kernels.common import KernelError
from pallas_kernels.lowering import lower_for_h100

from .conftest import tiny_config

ON_GPU = jax.default_backend() == "gpu"
if not ON_GPU:  # Triton reads this when it is imported: its kernels then run in Triton's interpreter (torch CPU)
    os.environ.setdefault("TRITON_INTERPRET", "1")
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (compiled Pallas / jax-triton)")
INTERP = not ON_GPU


def _rand(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _close(got, ref, tol=1e-5):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(got).all(), "kernel left NaN (an unwritten tile?)"
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * float(np.abs(ref).max()))


# (M, N, K; GEMV path for M <= 3, tensor-core path above): the model's widths 2688 (hidden), 1856 (expert), 4096
# (q_proj), 10304 (Mamba in_proj) as K with few outputs, and as N with a short K (interpret mode runs every
# program on the CPU)
DENSE = [(1, 32, 2688), (5, 48, 1856), (1, 16, 10304), (2, 4096, 64), (20, 1856, 128)]


@pytest.mark.parametrize("m,n,k", DENSE)
def test_nvfp4_matmul_interpret(m, n, k):
    node = NVFP4Weight.from_float(_rand((n, k), n + k))
    x = _rand((m, k), m)
    ref = NK.nvfp4_matmul_reference(x, node.packed, node.scale, node.scale_2)
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(node.matmul(x)))  # the reference is the XLA path
    path = "gemv" if m <= 3 else "mma"
    _close(NK.nvfp4_matmul(x, node.packed, node.scale, node.scale_2, interpret=True, path=path, poison=True), ref)


@pytest.mark.parametrize("m,n,k", DENSE)
def test_hlwq_matmul_interpret(m, n, k):
    node = HLWQWeight.from_float(_rand((n, k), n + k), 5, path="rotated")
    xr = node.rotate(_rand((m, k), m))
    ref = HK.hlwq_matmul_reference(xr, node.packed, node.norms, node.table, 5)
    _close(ref, node.matmul_rotated(xr))
    path = "gemv" if m <= 3 else "mma"
    _close(HK.hlwq_matmul(xr, node.packed, node.norms, node.table, 5, interpret=True, path=path, poison=True), ref)


def test_gemv_split_k_and_other_bits():
    node = NVFP4Weight.from_float(_rand((32, 1280), 3))
    x = _rand((3, 1280), 4)
    ref = NK.nvfp4_matmul_reference(x, node.packed, node.scale, node.scale_2)
    assert NK.gemv_launch(32, 1280, 3, splits=3) == dict(bm=4, bn=32, bw=16, per=3, splits=4, steps=10)
    for s in (3,):  # 3 steps per split over 10 K steps: the last split is short
        _close(NK.nvfp4_matmul(x, node.packed, node.scale, node.scale_2, interpret=True, splits=s, poison=True), ref)
    for bits in (3, 6):  # code pairs straddle words differently than at 5 bits
        h = HLWQWeight.from_float(_rand((16, 256), bits), bits, path="rotated")
        xr = h.rotate(_rand((2, 256), 5))
        _close(HK.hlwq_matmul(xr, h.packed, h.norms, h.table, bits, interpret=True, poison=True),
               HK.hlwq_matmul_reference(xr, h.packed, h.norms, h.table, bits))


# grouped: sizes with empty experts (first, middle, last), a tile straddling experts, rows past the groups
GROUPS = [((0, 3, 0, 17, 0, 2, 0), 25), ((1, 1, 1, 0, 1, 1, 1), 6), ((0, 0, 40, 0), 40), ((0, 2, 0, 3), 8)]


@pytest.mark.parametrize("sizes,rows,n,k", [(*GROUPS[0], 32, 2688), (*GROUPS[1], 1856, 64), (*GROUPS[2], 16, 4096)])
def test_nvfp4_grouped_interpret(sizes, rows, n, k):
    E = len(sizes)
    node = NVFP4Weight.from_float(_rand((E, n, k), k + E))
    x = _rand((rows, k), rows)
    gs = jnp.asarray(sizes, jnp.int32)
    ref = NK.nvfp4_grouped_matmul_reference(x, node.packed, node.scale, node.scale_2, gs)
    ends = np.cumsum(sizes)
    for e in range(E):  # the reference is expert e's own dense product on its rows
        if sizes[e]:
            rs = slice(ends[e] - sizes[e], ends[e])
            _close(ref[rs], NK.nvfp4_matmul_reference(x[rs], node.packed[e], node.scale[e], node.scale_2[e]))
    for path in ("gemv", "mma"):  # one visit per row through the decode GEMV / tensor-core row tiles
        got = NK.nvfp4_grouped_matmul(x, node.packed, node.scale, node.scale_2, gs, interpret=True, poison=True,
                                      path=path)
        _close(got, ref)
        assert not np.asarray(got[ends[-1]:]).any()


@pytest.mark.parametrize("sizes,rows,n,k", [(*GROUPS[0], 16, 1856), (*GROUPS[3], 2688, 128), (*GROUPS[1], 16, 10304)])
def test_hlwq_grouped_interpret(sizes, rows, n, k):
    E = len(sizes)
    node = HLWQWeight.from_float(_rand((E, n, k), k + E), 5, path="rotated")
    xr = node.rotate(_rand((rows, k), rows))
    gs = jnp.asarray(sizes, jnp.int32)
    ref = HK.hlwq_grouped_matmul_reference(xr, node.packed, node.norms, node.table, gs, 5)
    for path in ("gemv", "mma"):
        got = HK.hlwq_grouped_matmul(xr, node.packed, node.norms, node.table, gs, 5, interpret=True, poison=True,
                                     path=path)
        _close(got, ref)
        assert not np.asarray(got[int(sum(sizes)):]).any()


def test_group_plan_covers_every_row_once():
    rng = np.random.default_rng(0)
    plan_fn = jax.jit(C.group_plan, static_argnums=(1, 2))
    for _ in range(8):
        E, bm = int(rng.integers(1, 9)), int(rng.choice([1, 4, 16]))
        sizes = rng.integers(0, 3, E) * rng.integers(0, 12, E)
        rows = int(sizes.sum()) + int(rng.integers(0, 5))
        plan, src = (np.asarray(a) for a in plan_fn(jnp.asarray(sizes, jnp.int32), rows, bm))
        assert plan.shape[0] == max(1, -(-rows // bm) + (min(E, rows) - 1 if bm > 1 else 0))
        owner = {}
        for v, (g, t, lo, hi) in enumerate(plan):
            for r in range(t * bm + lo, t * bm + hi):
                assert r not in owner and np.searchsorted(np.cumsum(sizes), r, side="right") == g
                owner[r] = v * bm + r - t * bm
        assert owner == {r: int(s) for r, s in enumerate(src) if s >= 0}
        assert sorted(owner) == list(range(int(sizes.sum())))


def test_reference_decoders_match_the_formats():
    """pallas_kernels writes its own decoders (it imports nothing from nemojax): LSB-first unpacking at every width,
    the scaled level table, the Hadamard matrix, the FWHT and the NVFP4 dequantization equal the formats' bit for
    bit."""
    from nemojax.formats import hlwq as H
    from nemojax.formats.hlwq.codes import scaled_table

    for bits in range(2, 9):
        h = HLWQWeight.from_float(_rand((16, 300), bits), bits)
        np.testing.assert_array_equal(np.asarray(HK.unpack_lsb(h.packed, bits)), np.asarray(h.codes()))
        np.testing.assert_array_equal(np.asarray(HK.scaled_table(h.table)), np.asarray(scaled_table(h.table)))
    np.testing.assert_array_equal(HK.hadamard_matrix(), H.hadamard(128).astype(np.float32))
    x = _rand((3, 384), 1)
    np.testing.assert_array_equal(np.asarray(HK.fwht_reference(x)), np.asarray(H.fwht(x)))
    node = NVFP4Weight.from_float(_rand((2, 32, 64), 2))
    np.testing.assert_array_equal(np.asarray(NK.dequantize_reference(node.packed, node.scale, node.scale_2, BF)),
                                  np.asarray(node.dequantize(BF)))


@pytest.mark.parametrize("k", [1920, 4096])
def test_fwht_interpret(k):
    x = _rand((5, k), k)
    _close(HK.fwht(x, interpret=True, poison=True), HK.fwht_reference(x))


def test_poison_shows_an_unwritten_tile():
    from jax.experimental import pallas as pl

    def writes_first_tile_only(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    call = C.poisoned_call(True, writes_first_tile_only, grid=(2,), in_specs=[pl.BlockSpec((8, 16), lambda i: (i, 0))],
                           out_specs=pl.BlockSpec((8, 16), lambda i: (i, 0)),
                           out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32), interpret=True)
    out = np.asarray(call(_rand((16, 16), 0)))
    assert np.isfinite(out[:8]).all() and np.isnan(out[8:]).all()


def test_errors():
    node = NVFP4Weight.from_float(_rand((32, 128), 0))
    x = _rand((2, 128), 1)
    with pytest.raises(KernelError, match="packed holds K=128 inputs per row, x has K=96"):
        NK.nvfp4_matmul(x[:, :96], node.packed, node.scale, node.scale_2, interpret=True)
    with pytest.raises(KernelError, match="N % 16 == 0"):
        NK.nvfp4_matmul(x, node.packed[:24], node.scale[:24], node.scale_2, interpret=True)
    with pytest.raises(KernelError, match="path='gemv' takes at most 8 rows"):
        NK.nvfp4_matmul(_rand((9, 128), 2), node.packed, node.scale, node.scale_2, interpret=True, path="gemv")
    bank = NVFP4Weight.from_float(_rand((2, 16, 64), 3))
    with pytest.raises(KernelError, match="group_sizes must be"):
        NK.nvfp4_grouped_matmul(_rand((3, 64), 1), bank.packed, bank.scale, bank.scale_2, jnp.array([3]),
                                interpret=True)
    h = HLWQWeight.from_float(_rand((16, 256), 0), 5)
    with pytest.raises(KernelError, match="norms must be"):
        HK.hlwq_matmul(_rand((1, 256), 1), h.packed, h.norms[:, :1], h.table, 5, interpret=True)
    with pytest.raises(KernelError, match="path='gemv' takes at most 8 rows and 6 bits, got 1 rows of 7-bit"):
        h7 = HLWQWeight.from_float(_rand((16, 256), 0), 7)
        HK.hlwq_matmul(h7.rotate(_rand((1, 256), 1)), h7.packed, h7.norms, h7.table, 7, interpret=True, path="gemv")
    with pytest.raises(KernelError, match="K % 128"):
        HK.fwht(_rand((1, 100), 1), interpret=True)
    with pytest.raises(ValueError, match="backend='cuda'"):
        quant.set_backend({}, "cuda")
    if not ON_GPU:
        with pytest.raises(ValueError, match="backend='triton': the jax-triton GEMVs need an NVIDIA GPU"):
            quant.set_backend({}, "triton")


_VIEWS = {"reshape", "squeeze", "expand_dims", "broadcast_in_dim"}  # views of the same bytes


def _uses(fn, args) -> list[set]:
    """Per argument of ``fn``: the primitives outside the kernels that consume it (following reshapes, through
    nested jits). A kernel must get the checkpoint arrays as they are. Anything else on the codes or scales, a
    width-changing ``bitcast_convert_type`` above all, is on the GPU a fusion that writes a copy of the whole
    (expert) bank on every call: XLA's GPU compiler expands such bitcasts, it does not view them."""
    closed = jax.make_jaxpr(fn)(*args)
    uses: list[set] = [set() for _ in closed.jaxpr.invars]

    def walk(jaxpr, tracked: dict):  # var -> argument index
        for eqn in jaxpr.eqns:
            hit = [tracked.get(v) if not hasattr(v, "val") else None for v in eqn.invars]  # a Literal has .val
            if all(h is None for h in hit):
                continue
            sub = eqn.params.get("jaxpr")
            if eqn.primitive.name in ("pjit", "jit", "closed_call") and sub is not None:
                inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
                walk(inner, {iv: h for iv, h in zip(inner.invars, hit) if h is not None})
                continue
            for h in {h for h in hit if h is not None}:
                uses[h].add(eqn.primitive.name)
                if eqn.primitive.name in _VIEWS:
                    tracked.update({o: h for o in eqn.outvars})

    walk(closed.jaxpr, {v: i for i, v in enumerate(closed.jaxpr.invars)})
    return uses


def _weight_uses(fn, args, weights) -> set:
    return set().union(*(_uses(fn, args)[i] for i in weights))


def test_kernels_take_the_checkpoint_bytes_as_they_are():
    """The packed codes and scales reach every kernel (Pallas GEMV and mma paths, dense and grouped, and the
    jax-triton operands) as the checkpoint's arrays, reshaped at most: no bitcast or conversion outside."""
    n, k, E = 64, 256, 4
    nd = NVFP4Weight.from_float(_rand((n, k), 1))
    hd = HLWQWeight.from_float(_rand((n, k), 2), 5)
    nb = NVFP4Weight.from_float(_rand((E, n, k), 3))
    hb = HLWQWeight.from_float(_rand((E, n, k), 4), 5)
    gs = jnp.asarray([2, 0, 3, 1], jnp.int32)
    for m, path in ((1, "gemv"), (16, "mma")):
        x, xr = _rand((m, k), 5), hd.rotate(_rand((m, k), 5))
        f = functools.partial(NK.nvfp4_matmul, interpret=True, path=path)
        assert _weight_uses(f, (x, nd.packed, nd.scale, nd.scale_2), (1, 2)) <= _VIEWS | {"pallas_call"}, path
        f = functools.partial(HK.hlwq_matmul, bits=5, interpret=True, path=path)
        assert _weight_uses(f, (xr, hd.packed, hd.norms, hd.table), (1, 2)) <= _VIEWS | {"pallas_call"}, path
        rows = 6 if path == "gemv" else 80
        x, xr = _rand((rows, k), 6), hb.rotate(_rand((rows, k), 6))
        g = gs * (rows // 6) + jnp.asarray([rows % 6, 0, 0, 0], jnp.int32)
        f = functools.partial(NK.nvfp4_grouped_matmul, interpret=True, path=path)
        assert _weight_uses(f, (x, nb.packed, nb.scale, nb.scale_2, g), (1, 2)) <= _VIEWS | {"pallas_call"}, path
        f = functools.partial(HK.hlwq_grouped_matmul, bits=5, interpret=True, path=path)
        assert _weight_uses(f, (xr, hb.packed, hb.norms, hb.table, g), (1, 2)) <= _VIEWS | {"pallas_call"}, path
    from pallas_kernels import triton_gemv as TG

    x = _rand((1, k), 7)
    ops = TG.nvfp4_operands(x, nd.packed, nd.scale, nd.scale_2)
    assert ops[1] is nd.packed and ops[2] is nd.scale
    ops = TG.hlwq_operands(hd.rotate(x), hd.packed, hd.norms, hd.table, 5)
    assert ops[1] is hd.packed and ops[2] is hd.norms
    # the whole model on the pallas backend: every bank and matrix the kernels take reaches them untouched
    cfg = _model_cfg()
    ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (1, 5)))
    for recipe in ("nvfp4-all", "hlwq-q5"):
        qp = quant.set_backend(quant.apply(init_params(cfg, 2, dtype="float32"), cfg, recipe), "pallas")
        owner = {id(a): nd for nd in jax.tree.leaves(qp, is_leaf=is_quantized)  # codes / scales -> their node
                 if is_quantized(nd)
                 for a in (nd.packed, getattr(nd, "scale", None), getattr(nd, "norms", None)) if a is not None}
        leaves, treedef = jax.tree.flatten(qp)
        uses = _uses(lambda *ls, td=treedef: forward_jit(jax.tree.unflatten(td, ls), cfg, ids), leaves)
        checked = 0
        for a, u in zip(leaves, uses):
            node = owner.get(id(a))
            if node is None:
                continue
            takes = (NK.supported(*node.shape[-2:]) if isinstance(node, NVFP4Weight) else
                     node.packed.shape[-2] % 16 == 0)
            if takes and node is not qp["embeddings"]:  # the embedding is a row lookup, not a matmul
                assert u <= _VIEWS | {"pallas_call"}, (recipe, node.packed.shape, u)
                checked += 1
        assert checked >= 6, (recipe, checked)  # Mamba, attention, MoE banks and shared expert at least
    # the check itself sees a bitcast to words (what the GEMVs did before)
    words = lambda p: jax.lax.bitcast_convert_type(p.reshape(n, k // 8, 4), jnp.int32).sum()  # noqa: E731
    assert "bitcast_convert_type" in _weight_uses(words, (nd.packed,), (0,))


@pytest.mark.skipif(ON_GPU, reason="checks the message given where no GPU is present")
def test_cli_backend_unavailable(capsys):
    from nemojax.cli import main

    assert main(["generate", "--prompt", "hi", "--max-new-tokens", "1", "--backend", "triton"]) == 2
    assert "--backend 'triton': the jax-triton GEMVs need an NVIDIA GPU" in capsys.readouterr().err


S = jax.ShapeDtypeStruct
BF, U8 = jnp.bfloat16, jnp.uint8
LOWER = {
    "nvfp4 mma": (lambda x, p, s, s2: NK.nvfp4_matmul(x, p, s, s2, path="mma"), S((20, 2688), BF), S((1856, 1344), U8),
                  S((1856, 168), jnp.float8_e4m3fn), S((), jnp.float32)),
    "nvfp4 gemv": (lambda x, p, s, s2: NK.nvfp4_matmul(x, p, s, s2), S((1, 1856), BF), S((10304, 928), U8),
                   S((10304, 116), jnp.float8_e4m3fn), S((), jnp.float32)),
    "nvfp4 grouped gemv": (lambda x, p, s, s2, g: NK.nvfp4_grouped_matmul(x, p, s, s2, g), S((48, 2688), BF),
                           S((128, 1856, 1344), U8), S((128, 1856, 168), jnp.float8_e4m3fn), S((128,), jnp.float32),
                           S((128,), jnp.int32)),
    "nvfp4 grouped mma": (lambda x, p, s, s2, g: NK.nvfp4_grouped_matmul(x, p, s, s2, g, path="mma"),
                          S((96, 2688), BF), S((128, 1856, 1344), U8), S((128, 1856, 168), jnp.float8_e4m3fn),
                          S((128,), jnp.float32), S((128,), jnp.int32)),
    "hlwq mma": (lambda x, p, n, t: HK.hlwq_matmul(x, p, n, t, 5, path="mma"), S((20, 1920), BF), S((2688, 1200), U8),
                 S((2688, 15), jnp.float16), S((32,), jnp.float32)),
    "hlwq gemv": (lambda x, p, n, t: HK.hlwq_matmul(x, p, n, t, 5), S((1, 2688), BF), S((4096, 1680), U8),
                  S((4096, 21), jnp.float16), S((32,), jnp.float32)),
    "hlwq grouped gemv": (lambda x, p, n, t, g: HK.hlwq_grouped_matmul(x, p, n, t, g, 5), S((48, 1920), BF),
                          S((128, 2688, 1200), U8), S((128, 2688, 15), jnp.float16), S((128, 32), jnp.float32),
                          S((128,), jnp.int32)),
    "hlwq grouped mma": (lambda x, p, n, t, g: HK.hlwq_grouped_matmul(x, p, n, t, g, 5, path="mma"),
                         S((96, 1920), BF), S((128, 2688, 1200), U8), S((128, 2688, 15), jnp.float16),
                         S((128, 32), jnp.float32), S((128,), jnp.int32)),
    "fwht": (lambda x: HK.fwht(x), S((4, 2688), BF)),
}


@pytest.mark.parametrize("name", list(LOWER))
def test_lowers_for_h100(name):
    """Every kernel lowered for CUDA on an abstract H100 (Triton backend): ops the GPU lowering rejects (gathers
    on values, value slices, chained ref views) fail here although interpret mode accepts them."""
    fn, *args = LOWER[name]
    txt = lower_for_h100(fn, *args)
    assert "triton" in txt.lower()


def _model_cfg():
    return tiny_config(hidden_size=128, moe_intermediate_size=64, moe_shared_expert_intermediate_size=64,
                       intermediate_size=128, hybrid_override_pattern="*E")


@pytest.mark.parametrize("recipe", ["nvfp4-all", "hlwq-q5"])
def test_backend_switch_model(recipe):
    """One switch per model: logits and greedy tokens of the pallas backend (dense and grouped MoE kernels, in
    interpret mode here) match the xla reference. NVFP4 also runs generate's decode loop (the GEMV path); for
    HLWQ (slower to compile in interpret mode) the greedy token is taken from the logits."""
    cfg = _model_cfg()
    q = quant.apply(init_params(cfg, 2, dtype="float32"), cfg, recipe)
    qp = quant.set_backend(q, "pallas")
    assert {x.backend for x in jax.tree.leaves(qp, is_leaf=is_quantized) if is_quantized(x)} == {"pallas"}
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 7))
    got, ref = np.asarray(forward_jit(qp, cfg, ids)), np.asarray(forward_jit(q, cfg, ids))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
    if recipe.startswith("nvfp4"):
        np.testing.assert_array_equal(generate(qp, cfg, ids.tolist(), 2), generate(q, cfg, ids.tolist(), 2))


def test_grouped_experts_kernel_path_matches_loop():
    """The MoE's routed experts through the grouped kernels == the XLA while_loop for NVFP4 W4A4 (per-expert input
    scales, row by row) with ids >= E (another device's assignments: dropped); W4A16 and HLWQ banks are covered
    by the model test above."""
    from nemojax.blocks.moe import grouped_experts

    T, H, F, E, k = 5, 128, 64, 6, 2
    x = _rand((T, H), 0)
    idx = jnp.asarray([[0, 3], [3, 5], [0, 6], [5, 3], [6, 0]], jnp.int32)  # experts 1, 2, 4 empty; 6 = dropped
    w = jax.nn.softmax(_rand((T, k), 1))
    up_f, down_f = _rand((E, F, H), 2) * 0.1, _rand((E, H, F), 3) * 0.1
    up = NVFP4Weight.from_float(up_f, jnp.linspace(0.005, 0.02, E), "w4a4")
    down = NVFP4Weight.from_float(down_f, jnp.linspace(0.02, 0.005, E), "w4a4")
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):  # the reference on the CPU: XLA's own W4A4 loop is off on a GPU (see README)
        ref = grouped_experts(*jax.device_put((x, w, idx, up, down), cpu))
    with jax.default_matmul_precision("highest"):  # GPU: fp32 dots, not TF32 (W4A4 codes flip on 1e-3 errors)
        got = grouped_experts(x, w, idx, up.replace(backend="pallas"), down.replace(backend="pallas"))
    _close(got, ref, 1e-4)


# ------------------------------------------------------------------------------------ Triton (interpreter / GPU)
def _triton_interpreted():
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    if ON_GPU:
        pytest.skip("on a GPU the jax-triton tests below run the compiled kernels")
    from pallas_kernels import triton_gemv as TG

    return TG, TG.kernels()


@pytest.mark.parametrize("m,n,k", [(1, 128, 2688), (3, 64, 1856)])
def test_triton_gemv_kernels_interpreted(m, n, k):
    """The Triton kernels behind the jax-triton GEMVs, run by Triton's interpreter on torch CPU tensors."""
    TG, kern = _triton_interpreted()
    import torch

    def t(a):  # numpy has no float8: e4m3 goes over as its bytes
        a = np.array(a)
        if a.dtype == jnp.float8_e4m3fn:
            return torch.from_numpy(a.view(np.uint8)).view(torch.float8_e4m3fn)
        return torch.from_numpy(a)

    x = _rand((m, k), m)
    node = NVFP4Weight.from_float(_rand((n, k), k))
    ref = NK.nvfp4_matmul_reference(x, node.packed, node.scale, node.scale_2)
    variants = ((16, None), (32, 3), (8, 1)) if m == 1 else ((16, None),)  # default; ragged masked step; no split
    for bw, splits in variants:
        grid, meta = TG.nvfp4_launch(n, k, bw=bw, splits=splits)
        out = torch.full((grid[1], m, n), float("nan"))
        kern["nvfp4"][(*grid, m)](*map(t, TG.nvfp4_operands(x, node.packed, node.scale, node.scale_2)), out, **meta)
        _close(out.sum(0).numpy(), ref)
    # HLWQ: default launch; one split; ragged last step with a short last split; 6 bits (other straddles)
    cases = ((5, None, None), (5, 4, 1), (5, 8, 5), (6, None, None)) if m == 1 else ((5, None, None),)
    for bits, g, splits in cases:
        h = HLWQWeight.from_float(_rand((n, k), k + bits), bits)
        xr = h.rotate(x)
        grid, meta = TG.hlwq_launch(n, h.k_pad, bits, g=g, splits=splits)
        out = torch.full((grid[1], m, n), float("nan"))
        kern["hlwq"][(*grid, m)](*map(t, TG.hlwq_operands(xr, h.packed, h.norms, h.table, bits)), out, **meta)
        _close(out.sum(0).numpy(), HK.hlwq_matmul_reference(xr, h.packed, h.norms, h.table, bits))


def test_gemv_loops_compiled_for_h100():
    """The decode GEMVs compiled to sm_90 cubins on this host (pip Triton and its ptxas, no GPU;
    ``tools/kernel_sass.py``, in a fresh process: Triton's interpreter is on in this one) and their K loop read
    from the SASS: it fails on code the compiler rejects, on spills, and if the NVFP4 loops lose what makes them
    fast: 16-byte loads of the packed words, no byte-by-byte or strided activation loads, ~10 instructions per
    weight byte (the first versions: 17-18), weights requested two steps ahead; or the HLWQ loops their word
    loads and pair tables (10-12 instructions per weight byte; first versions 15-19, byte loads)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "kernel_sass.py")
    out = subprocess.run([sys.executable, tool, "--json", "--shape", "mamba in_proj"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["kernel"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"triton nvfp4_gemv", "triton hlwq_gemv", "pallas nvfp4 gemv", "pallas hlwq gemv"}
    for r in rows.values():
        assert r["local"] == 0, f"{r['kernel']}: spills ({r['local']} bytes of local memory)"
    for name in ("triton nvfp4_gemv", "pallas nvfp4 gemv"):
        r = rows[name]
        assert r["loads"].get("LDG.E.128", 0) >= 2, f"{name}: packed words not loaded 16 bytes at a time: {r['loads']}"
        assert not any(k.endswith((".U8", ".U16")) for k in r["loads"]), f"{name}: narrow loads {r['loads']}"
        assert r["instr_per_weight_byte"] < 12, f"{name}: {r['instr_per_weight_byte']} instructions per weight byte"
        assert r["prefetch"] and r["regs"] <= 80, r
    for name in ("triton hlwq_gemv", "pallas hlwq gemv"):  # words, not byte planes; code pairs, pair tables
        r = rows[name]
        assert "LDG.E.U8" not in r["loads"] and r["instr_per_weight_byte"] < 14 and r["regs"] <= 128, r


@gpu_only
@pytest.mark.parametrize("k", [2688, 1856, 4096, 10304])
def test_compiled_on_gpu(k):
    """Compiled Pallas (and jax-triton when installed) against the references in bf16, M = 1 (GEMV) and 20."""
    for m in (1, 20):
        xb = _rand((m, k), k).astype(BF)
        node = NVFP4Weight.from_float(_rand((256, k), k))
        ref = NK.nvfp4_matmul_reference(xb.astype(jnp.float32), node.packed, node.scale, node.scale_2)
        _close(NK.nvfp4_matmul(xb, node.packed, node.scale, node.scale_2, poison=True), ref, 2e-2)
        h = HLWQWeight.from_float(_rand((256, k), k + 1), 5)
        xr = h.rotate(xb.astype(jnp.float32)).astype(BF)
        href = HK.hlwq_matmul_reference(xr.astype(jnp.float32), h.packed, h.norms, h.table, 5)
        _close(HK.hlwq_matmul(xr, h.packed, h.norms, h.table, 5, poison=True), href, 2e-2)
        if m == 1 and _have_jax_triton():
            from pallas_kernels import triton_gemv as TG

            _close(TG.nvfp4_gemv(xb, node.packed, node.scale, node.scale_2), ref, 2e-2)
            _close(TG.hlwq_gemv(xr, h.packed, h.norms, h.table, 5), href, 2e-2)
    xp = jnp.pad(_rand((3, k), 1), ((0, 0), (0, -k % 128)))
    _close(HK.fwht(xp, poison=True), HK.fwht_reference(xp), 1e-3)


@gpu_only
@pytest.mark.parametrize("sizes", [(0, 3, 0, 17, 0, 2, 0, 30), (1, 0, 1, 1, 0, 1, 1, 1)])
def test_grouped_compiled_on_gpu(sizes):
    E, rows = len(sizes), sum(sizes) + 3
    gs = jnp.asarray(sizes, jnp.int32)
    x = _rand((rows, 2688), 0).astype(BF)
    node = NVFP4Weight.from_float(_rand((E, 1856, 2688), 1))
    ref = NK.nvfp4_grouped_matmul_reference(x.astype(jnp.float32), node.packed, node.scale, node.scale_2, gs)
    _close(NK.nvfp4_grouped_matmul(x, node.packed, node.scale, node.scale_2, gs, poison=True), ref, 2e-2)
    h = HLWQWeight.from_float(_rand((E, 2688, 1856), 2), 5)
    xr = h.rotate(_rand((rows, 1856), 3)).astype(BF)
    href = HK.hlwq_grouped_matmul_reference(xr.astype(jnp.float32), h.packed, h.norms, h.table, gs, 5)
    _close(HK.hlwq_grouped_matmul(xr, h.packed, h.norms, h.table, gs, 5, poison=True), href, 2e-2)


def _have_jax_triton() -> bool:
    """Through pallas_kernels.triton_gemv, never a bare ``import jax_triton`` (its Triton-version shim must run
    first: jax-triton 0.4.1 with Triton 3.6 otherwise stubs out the NVIDIA backend)."""
    from pallas_kernels import triton_gemv as TG

    return TG.unavailable() is None


@gpu_only
@pytest.mark.parametrize("recipe", ["nvfp4-all", "hlwq-q5"])
def test_backend_switch_model_gpu(recipe):
    """Compiled kernels: in fp32 the logits match the xla backend within 1e-3 and the greedy tokens are the same;
    in bf16 (rounding differs: the kernels apply the per-tensor scale after accumulating) logits within 5% of
    their range. "triton" too when jax-triton is installed."""
    cfg = _model_cfg()
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 7))
    backends = ("pallas", "triton") if _have_jax_triton() else ("pallas",)
    for dtype in ("float32", "bfloat16"):
        # fp32: full-precision dots on both sides (XLA and Triton both default to TF32 on a GPU)
        with jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext():
            _backends_agree(cfg, ids, recipe, dtype, backends)


def _backends_agree(cfg, ids, recipe, dtype, backends):
    q = quant.apply(init_params(cfg, 2, dtype=dtype), cfg, recipe)
    ref = np.asarray(forward_jit(q, cfg, ids), np.float32)
    toks = generate(q, cfg, ids.tolist(), 4) if dtype == "float32" else None
    for backend in backends:
        qp = quant.set_backend(q, backend)
        got = np.asarray(forward_jit(qp, cfg, ids), np.float32)
        if dtype == "float32":
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3, err_msg=backend)
            np.testing.assert_array_equal(generate(qp, cfg, ids.tolist(), 4), toks, err_msg=backend)
        else:
            assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max(), backend
