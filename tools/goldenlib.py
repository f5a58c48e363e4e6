"""Shared pieces of the golden-data generators (``tools/make_{nvfp4,fp8,hlwq}_golden.py``).

What does not depend on the quantized format: the tiny Nemotron-H they quantize (its config, the BF16 source
checkpoint nemojax writes, transformers' model and logits on it), the verification report, reproducible .npz /
index / manifest / report output, small tensor helpers; for a third-party quantizer run offline (HLWQ): a quiet
context, stand-ins for transformers' Auto classes and for the hub's snapshot_download; for the two ModelOpt
generators (NVFP4, FP8): ModelOpt's run on a bf16 nn.Sequential with per-module export, the Nano-style BF16
exceptions of a recipe, the checks of an ``export_hf_checkpoint`` that do not depend on the format, and a
run-time patch of ModelOpt's exclude_modules name mapper. Heavy packages (torch, NumPy, ModelOpt, transformers,
JAX) are imported inside the functions that need them.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import re
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the tiny Nemotron-H (original NVIDIA config.json field names); layers: 0 M, 1 E, 2 M, 3 *, 4 E, 5 -, 6 M, 7 *, 8 E
NEMOTRONH_CONFIG = dict(
    model_type="nemotron_h", vocab_size=512, hidden_size=64, hybrid_override_pattern="MEM*E-M*E",
    num_hidden_layers=9, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, intermediate_size=96,
    layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, torch_dtype="bfloat16",
)
KEEP_FP32 = ("A_log", "D", "e_score_correction_bias")  # leaves the source checkpoint keeps in float32
BUFFERS = ("e_score_correction_bias",)                  # registered buffers in the HF model -> not parameters
E4M3_MAX = 448.0


# ----------------------------------------------------------------------------------------------------------------
# report, files, small helpers
# ----------------------------------------------------------------------------------------------------------------
class Report:
    """The verification lines (verify.txt); a failed check's line starts with "FAIL " and is counted."""

    def __init__(self):
        self.lines, self.failures = [], 0

    def add(self, line, ok=True):
        self.lines.append(("" if ok else "FAIL ") + line)
        self.failures += 0 if ok else 1


def f32(t):
    return t.detach().float().cpu().numpy()


def save_npz(path, arrays):
    """np.savez_compressed with fixed zip timestamps, so re-running the tool gives identical bytes."""
    import io
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def sort_weight_map(folder):
    """Rewrite ``folder``/model.safetensors.index.json (indent 2) with its weight_map in name order, so a writer
    that lists the tensors in set order gives identical bytes on every run (same JSON content)."""
    idx = folder / "model.safetensors.index.json"
    index = json.loads(idx.read_text())
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    idx.write_text(json.dumps(index, indent=2))


def safetensors_table(path):
    """[(name, dtype string as stored, shape)] from a safetensors header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return [(k, v["dtype"], v["shape"]) for k, v in sorted(header.items()) if k != "__metadata__"]


def load_safetensors(folder):
    from safetensors.torch import load_file

    out = {}
    for p in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


def rel(a, b):
    """||a - b|| / ||b|| in float32."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def exact(a, b):
    import torch

    return bool(torch.equal(a.float().reshape(()), b.float().reshape(())))


def manifest_lines(out, path):
    """``# <path relative to out>`` then ``name\tdtype\tshape`` per tensor of a safetensors file."""
    return [f"# {path.relative_to(out)}"] + [f"{n}\t{d}\t{s}" for n, d, s in safetensors_table(path)]


def write_outputs(out, manifest, readme, rep, summary=(), list_files=False):
    """manifest.txt (unless ``manifest`` is None), README.md and verify.txt under ``out``; prints the report, the
    ``summary`` lines if any and, with ``list_files``, every file under ``out`` with its size; exit status (1 if
    a check failed)."""
    if manifest is not None:
        (out / "manifest.txt").write_text("\n".join(manifest) + "\n")
    (out / "README.md").write_text(readme)
    (out / "verify.txt").write_text("\n".join(rep.lines) + "\n")
    print("\n".join(rep.lines))
    if summary:
        print("\n# summary\n" + "\n".join(summary))
    if list_files:
        files = sorted(p for p in out.rglob("*") if p.is_file())
        print("\n# files")
        for p in files:
            print(f"{p.relative_to(out)}\t{p.stat().st_size}")
        print(f"total {sum(p.stat().st_size for p in files) / 1e6:.2f} MB")
    print(f"\n{rep.failures} failed checks; wrote {out}")
    return 1 if rep.failures else 0


def checkpoint_manifest(root, subs):
    """(manifest lines, summary lines) of the checkpoints ``root/<sub>`` for ``sub`` in ``subs``: per safetensors
    file ``# <root name>/<sub>/<file>`` then its compact_table; per checkpoint its shard count, size and how many
    tensors it holds per (name suffix, dtype)."""
    manifest, summary = [], []
    for sub in subs:
        files = sorted((root / sub).glob("*.safetensors"))
        kinds = {}
        for p in files:
            tab = safetensors_table(p)
            manifest += [f"# {root.name}/{sub}/{p.name}"] + compact_table(tab)
            for n, d, _ in tab:
                key = (n.rsplit(".", 1)[-1], d)
                kinds[key] = kinds.get(key, 0) + 1
        size = sum(f.stat().st_size for f in (root / sub).iterdir())
        summary.append(f"{sub}: {len(files)} shard(s), {size / 1024:.0f} KiB; suffix/dtype counts "
                       + ", ".join(f"{k}:{d}x{c}" for (k, d), c in sorted(kinds.items())))
    return manifest, summary


def compact_table(tab):
    """Manifest lines "name<TAB>dtype<TAB>shape", the routed experts of a layer folded into one line
    (experts.{0..E-1}) when they all have the same dtype and shape."""
    groups = {}
    for n, d, s in tab:
        key = re.sub(r"\.experts\.\d+\.", ".experts.{e}.", n)
        groups.setdefault(key, []).append((n, d, tuple(s)))
    lines = []
    for key, members in groups.items():
        if "{e}" in key and len({(d, s) for _, d, s in members}) == 1:
            e = sorted(int(re.search(r"\.experts\.(\d+)\.", n).group(1)) for n, _, _ in members)
            folded = key.replace("{e}", "{" + f"{e[0]}..{e[-1]}" + "}")
            lines.append(f"{folded}\t{members[0][1]}\t{list(members[0][2])}")
        else:
            lines += [f"{n}\t{d}\t{list(s)}" for n, d, s in members]
    return lines


def u8(t):
    """The bytes of an int8/uint8 torch tensor as a uint8 NumPy array (int8 code 200 is stored as -56)."""
    import torch

    return t.contiguous().view(torch.uint8).numpy()


def rel_err(a, b):
    """||a - b|| / ||b|| of two arrays in float64 (``rel`` does torch tensors in float32)."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@contextlib.contextmanager
def patched(obj, attr, value):
    """``obj.attr = value`` inside the ``with`` block, the old value restored after it."""
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


# ----------------------------------------------------------------------------------------------------------------
# the tiny Nemotron-H
# ----------------------------------------------------------------------------------------------------------------
def write_nemotronh_source(folder, seed):
    """The BF16 source checkpoint (``init_params_numpy(seed=seed)``, every leaf bf16 except KEEP_FP32,
    ``save_params(naming="original")``), built by nemojax so a test can rebuild it exactly. Returns the Config."""
    sys.path.insert(0, str(REPO))
    import jax
    import ml_dtypes

    from nemojax import Config
    from nemojax.params import init_params_numpy
    from nemojax.checkpoint import save_params

    cfg = Config.from_dict(NEMOTRONH_CONFIG)
    params = init_params_numpy(cfg, seed=seed, dtype="float32")

    def cast(path, leaf):
        key = getattr(path[-1], "key", None)
        return leaf if key in KEEP_FP32 else leaf.astype(ml_dtypes.bfloat16)

    params = jax.tree_util.tree_map_with_path(cast, params)
    save_params(params, cfg, folder, naming="original")
    return cfg


def load_nemotronh(folder, dtype):
    """transformers' NemotronHForCausalLM from ``folder`` in ``dtype``, in eval mode, every Mamba layer with
    ``time_step_limit = (0, inf)``. Returns (model, loading info, number of Mamba layers)."""
    from transformers import NemotronHForCausalLM

    model, info = NemotronHForCausalLM.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    model.eval()
    n_mamba = 0
    for layer in model.model.layers:
        if layer.block_type == "linear_attention":
            layer.mixer.time_step_limit = (0.0, float("inf"))  # canonical: no dt floor
            n_mamba += 1
    return model, info, n_mamba


def nemotronh_logits_f32(folder, input_ids):
    """load_nemotronh(folder, float32)'s logits on ``input_ids`` as a NumPy array (transformers' progress bars
    switched off); returns (logits, loading info, number of Mamba layers)."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, info, n_mamba = load_nemotronh(folder, torch.float32)
    with torch.no_grad():
        logits = model(input_ids, use_cache=False).logits
    return f32(logits), info, n_mamba


# ----------------------------------------------------------------------------------------------------------------
# a third-party quantizer run offline on the tiny Nemotron-H
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet(logger):
    """Swallow prints, and the warnings of the logging logger ``logger`` (errors still show)."""
    lg = logging.getLogger(logger)
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        lg.setLevel(old)


def module_from_path(name, path):
    """The Python file ``path`` imported as a module ``name`` (for a module that a sibling package shadows)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def standin_model(tensors, dtype):
    """An nn.Module tree with the checkpoint's (hub) names, what from_pretrained(dtype=...) would hand a checkpoint
    writer: weights as parameters, e_score_correction_bias (BUFFERS) as buffers, all cast to ``dtype``."""
    from torch import nn

    root = nn.Module()
    for name, t in tensors.items():
        *path, leaf = name.split(".")
        m = root
        for p in path:
            if p not in m._modules:
                m.add_module(p, nn.Module())
            m = m._modules[p]
        t = t.to(dtype)
        if any(b in name for b in BUFFERS):
            m.register_buffer(leaf, t)
        else:
            m.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
    return root


@contextlib.contextmanager
def standin_auto_classes(src_dir, tensors, model_dtype):
    """Inside the ``with`` block transformers' AutoModelForCausalLM.from_pretrained(src_dir, dtype=model_dtype)
    returns standin_model(tensors, model_dtype) (another name or dtype fails) and AutoTokenizer.from_pretrained
    raises OSError (the tiny model has no tokenizer)."""
    import transformers

    class StandInAuto:
        @staticmethod
        def from_pretrained(name, dtype=None, **kw):
            assert Path(name) == Path(src_dir) and dtype == model_dtype, (name, dtype)
            return standin_model(tensors, dtype)

    class NoTokenizer:
        @staticmethod
        def from_pretrained(*a, **kw):
            raise OSError("the tiny model has no tokenizer")

    with patched(transformers, "AutoModelForCausalLM", StandInAuto), \
            patched(transformers, "AutoTokenizer", NoTokenizer):
        yield


@contextlib.contextmanager
def offline_hub(repo_id, src_dir):
    """Inside the ``with`` block huggingface_hub.snapshot_download(repo_id) returns a temporary hub-style copy of
    the single-file checkpoint ``src_dir`` (model.safetensors plus its model.safetensors.index.json); any other
    repository raises OSError."""
    import shutil
    import tempfile

    import huggingface_hub

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        shutil.copy(src_dir / "model.safetensors", base / "model.safetensors")
        names = [n for n, _, _ in safetensors_table(base / "model.safetensors")]
        (base / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}))

        def snapshot_download(name, **kw):
            if name == repo_id:
                return str(base)
            raise OSError(f"offline: {name}")

        with patched(huggingface_hub, "snapshot_download", snapshot_download):
            yield


# ----------------------------------------------------------------------------------------------------------------
# ModelOpt (NVFP4, FP8)
# ----------------------------------------------------------------------------------------------------------------
def patch_exclude_name_mapper():
    """Replace ModelOpt's reverse name mapper for quant-config module names by one with a letter-free sentinel.

    The original appends ".\\x00modelopt_name_sentinel" before applying the checkpoint rename rules, and the
    nemotron_h rule "model." -> "backbone." also matches inside "modelopt" (its "." matches any character)."""
    import modelopt.torch.export.quant_aware_conversion as qac
    import modelopt.torch.export.unified_export_hf as ueh

    sentinel = ".\x00\x01\x00"

    def build_reverse_name_mapper(model):
        _, rename_rules, _ = qac._build_reverse_rules(model)
        if not rename_rules:
            return None
        compiled = qac._compile_rename_rules(rename_rules)

        def mapper(name: str) -> str:
            suffix = ".*" if name.endswith(".*") else ("*" if name.endswith("*") else "")
            base = name[: len(name) - len(suffix)]
            mapped = qac._apply_rename_rules(base + sentinel, compiled)
            if not mapped.endswith(sentinel):
                raise RuntimeError(f"rename rules consumed the sentinel of {name!r}: {mapped!r}")
            return mapped[: -len(sentinel)] + suffix

        return mapper

    ueh.build_reverse_name_mapper = build_reverse_name_mapper


def seq_model(w0, b0, w2):
    """nn.Sequential(Linear(64, 128, bias), ReLU, Linear(128, 48)) in bf16 with these weights."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(64, 128, bias=True), torch.nn.ReLU(),
                                torch.nn.Linear(128, 48, bias=False)).to(torch.bfloat16).eval()
    with torch.no_grad():
        model[0].weight.copy_(w0)
        model[0].bias.copy_(b0)
        model[2].weight.copy_(w2)
    return model


def quantize_export_seq(model, quant_cfg, calib, x_test, linears, out, keep_inputs=False):
    """Quantize the bf16 nn.Sequential ``model`` with ``quant_cfg`` (max calibration on ``calib``), run
    ``x_test`` through it, export the quantized ``linears`` with ModelOpt's per-module export and write
    ``out``/{model.safetensors, hf_quant_config.json, reference.npz} (see the module docstring). Captures per
    linear ``<i>.input_fq`` / ``<i>.weight_fq`` (and ``<i>.input`` with ``keep_inputs``).

    Returns (bf16 state dict, captured tensors, calibrated amaxes, y_bf16, y_fakequant)."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export.quant_utils import get_quant_config, postprocess_state_dict
    from modelopt.torch.export.unified_export_hf import _export_quantized_weight
    from safetensors.torch import save_file

    w_bf16 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y_bf16 = model(x_test)

    def forward_loop(m):
        with torch.no_grad():
            for batch in calib:
                m(batch)

    model = mtq.quantize(model, copy.deepcopy(quant_cfg), forward_loop)
    captured = {}

    def capture(name):
        def hook(mod, args, output):
            if keep_inputs:
                captured[f"{name}.input"] = args[0].detach().clone()
            captured[f"{name}.input_fq"] = mod.input_quantizer(args[0]).detach().clone()
            captured[f"{name}.weight_fq"] = mod.weight_quantizer(mod.weight).detach().clone()

        return hook

    handles = [model[int(i)].register_forward_hook(capture(i)) for i in linears]
    with torch.no_grad():
        y_fq = model(x_test)
    for h in handles:
        h.remove()
    with torch.no_grad():
        y_fq32 = copy.deepcopy(model).float()(x_test.float())  # same quantizers, float32 arithmetic
    amax = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("._amax")}

    hf_quant_config = get_quant_config(model)
    with torch.no_grad():
        for i in linears:
            _export_quantized_weight(model[int(i)], torch.bfloat16)
    sd = {k: v.detach().contiguous() for k, v in postprocess_state_dict(model.state_dict(), E4M3_MAX, None).items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "hf_quant_config.json").write_text(json.dumps(hf_quant_config, indent=4) + "\n")

    arrays = dict(x_test=f32(x_test), calib=f32(calib), y_bf16=f32(y_bf16), y_fakequant=f32(y_fq),
                  y_fakequant_f32=f32(y_fq32))
    arrays.update({f"w_bf16.{k}": f32(v) for k, v in w_bf16.items()})
    arrays.update({k: f32(v) for k, v in captured.items()})
    arrays.update({k: f32(v) for k, v in amax.items()})
    save_npz(out / "reference.npz", arrays)
    return w_bf16, captured, amax, y_bf16, y_fq


def bf16_attention_rules(pattern, layers):
    """ModelOpt quant_cfg rules that disable the quantizers of the attention layers ``layers`` (q/k/v/o
    projections) and of the Mamba layer right before each (in/out projections), keeping them BF16 as the
    published Nemotron-3-Nano checkpoints do; ``pattern`` is the hybrid_override_pattern."""
    rules = []
    for i in layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            rules.append({"quantizer_name": f"*.layers.{i}.mixer.{proj}.*", "enable": False})
        if i > 0 and pattern[i - 1] == "M":
            for proj in ("in_proj", "out_proj"):
                rules.append({"quantizer_name": f"*.layers.{i - 1}.mixer.{proj}.*", "enable": False})
    return rules


def quantized_weights(model):
    """{export-style module name: (bf16 weight, weight quantizer, input quantizer)} for every enabled NVFP4
    weight quantizer, with fused transformers-5 experts split per expert. Names use in-memory prefixes."""
    out = {}
    for name, mod in model.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if wq is not None and getattr(wq, "is_enabled", False):
            out[name] = (mod.weight, wq, mod.input_quantizer)
        for proj in ("up_proj", "down_proj", "gate_up_proj"):
            wqs = getattr(mod, f"{proj}_weight_quantizers", None)
            if wqs is None:
                continue
            for e, q in enumerate(wqs):
                if q.is_enabled:
                    out[f"{name}.{e}.{proj}"] = (getattr(mod, proj)[e], q, getattr(mod, f"{proj}_input_quantizer"))
    return out


def in_memory_name(export_name):
    """backbone.layers.L.mixer.experts.E.up_proj -> model.layers.L.mixer.experts.E.up_proj (quantized_weights'
    naming: transformers' in-memory prefix)."""
    return "model." + export_name.removeprefix("backbone.")


def check_exported_linears(rep, exp, source, exported_q, fq, check, fmt):
    """``check(rep, name, exp, w_bf16, w_amax, in_amax, weight_fq) -> counts`` for every exported quantized
    linear (``fq``: quantized_weights' tensors by in-memory name), after checking its in-memory weight is the
    source's; returns the counts summed over the linears."""
    import torch

    totals = None
    for name in exported_q:
        key = in_memory_name(name)
        if key not in fq:
            rep.add(f"{name}: exported as {fmt} but no enabled weight quantizer {key}", False)
            continue
        w, w_amax, in_amax, w_fq = fq[key]
        src_w = source.get(name + ".weight")
        if src_w is None or not torch.equal(src_w.to(torch.bfloat16), w):
            rep.add(f"{name}: in-memory bf16 weight differs from the source checkpoint", False)
        counts = check(rep, name, exp, w, w_amax, in_amax, w_fq)
        totals = counts if totals is None else tuple(a + b for a, b in zip(totals, counts))
    return totals


def check_unquantized(rep, exp, source, exported_q, fq):
    """The export's unquantized tensors equal the source cast to the export dtype; every exported quantized
    linear ``exported_q`` has an enabled weight quantizer in ``fq`` and vice versa."""
    import torch

    changed, cast_only = [], []
    for k, t in sorted(exp.items()):
        if k.rsplit(".", 1)[0] in exported_q or k.endswith((".k_scale", ".v_scale")):
            continue
        s = source.get(k)
        if s is None:
            changed.append(f"{k} (not in source)")
        elif not torch.equal(s.to(t.dtype), t):
            changed.append(k)
        elif s.dtype != t.dtype:
            cast_only.append(f"{k.rsplit('.', 1)[1]} {str(s.dtype)[6:]}->{str(t.dtype)[6:]}")
    rep.add(f"unquantized tensors == source cast to the export dtype: {not changed} {changed}", not changed)
    rep.add(f"note: unquantized tensors whose dtype changed in the export: {sorted(set(cast_only))}")
    missing = sorted(set(in_memory_name(n) for n in exported_q) ^ set(fq))
    rep.add(f"quantized linears: {len(exported_q)} exported, {len(fq)} enabled weight quantizers; "
            f"unmatched: {missing}", not missing)


def check_kv_scales(rep, exp, kv):
    """k_scale / v_scale == the k/v_bmm quantizer's amax / 448, one pair per calibrated attention layer."""
    for k in sorted(exp):
        if k.endswith((".k_scale", ".v_scale")):
            letter = k[-7]
            buf = in_memory_name(k.rsplit(".", 2)[0]) + f".{letter}_bmm_quantizer._amax"
            ok = buf in kv and exact(exp[k], kv[buf].float() / E4M3_MAX)
            rep.add(f"{k} = {exp[k].item():.6g} == {letter}_bmm amax/448: {ok}", ok)
    n_kv_exp = sum(k.endswith((".k_scale", ".v_scale")) for k in exp)
    rep.add(f"kv scales exported {n_kv_exp}, kv quantizers calibrated {len(kv)}", n_kv_exp == len(kv))


def check_exclude_modules(rep, hf_quant_config):
    """exclude_modules holds no junk left by the name mapper (see patch_exclude_name_mapper)."""
    excl = hf_quant_config["quantization"].get("exclude_modules") or []
    rep.add(f"exclude_modules clean (no control chars / 'sentinel'): "
            f"{all(ch.isprintable() for e in excl for ch in e) and not any('sentinel' in e for e in excl)}",
            all(ch.isprintable() for e in excl for ch in e) and not any("sentinel" in e for e in excl))


def write_seq_and_nemotronh(out, readme, make_seq=None, make_nemotronh=None):
    """A ModelOpt generator's output: ``make_seq(out / "seq", rep)`` and ``make_nemotronh(out / "nemotronh", rep)``
    (each skipped when None), then manifest.txt (seq/model.safetensors, nemotronh/export/*.safetensors),
    README.md (``readme``) and verify.txt. Returns the exit status (1 if a check failed)."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rep = Report()
    manifest = []
    if make_seq is not None:
        make_seq(out / "seq", rep)
        manifest += manifest_lines(out, out / "seq" / "model.safetensors")
    if make_nemotronh is not None:
        make_nemotronh(out / "nemotronh", rep)
        for p in sorted((out / "nemotronh" / "export").glob("*.safetensors")):
            manifest += manifest_lines(out, p)
    return write_outputs(out, manifest, readme, rep)
