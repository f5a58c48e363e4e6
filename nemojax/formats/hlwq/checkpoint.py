"""polarengine (HLWQ / PolarQuant) checkpoint layouts of one module, detected from the tensors (not from labels):

* A -- ``P.codes`` one byte per code ``[out, in_pad]`` (int8), ``P.ct`` (levels) or ``P.ct_scaled`` (levels/sqrt(128)),
  ``P.norms`` fp16 ``[out, n_blocks]`` (the eoq notebooks, what ``polarquant-convert`` reads);
* B -- ``P.codes`` uint8 ``[out, in_pad*bits/8]``, 8 codes -> ``bits`` bytes LSB-first per row (``quantize_model
  (pack_q5=True)``), ``P.ct_scaled``, ``P.norms`` (nemojax writes B, with the raw levels as ``P.ct``);
* C -- ``P.weight__packed`` flat uint8, MSB-first over the row-major code array, ``P.weight__norms``,
  ``P.weight__meta`` int64 ``[out, n_blocks, 128, out*in_pad, in]``; no table (the 100-iteration Lloyd-Max one).

For packed codes the bit order is confirmed with the code-histogram test (``packing.detect_bit_order``).
``P`` is the parameter name without ``.weight``. The layers of ``polar_config.json`` (read by
``nemojax.checkpoint.polar``, passed in here as a dict) give ``in_features`` / ``bits`` when present.
"""
from __future__ import annotations

import math

import numpy as np

from ..base import QuantError, expert_index
from .codebook import lloyd_max_table
from .hadamard import BLOCK, padded_in
from .packing import detect_bit_order, unpack_msb_flat

__all__ = ["layout_kind", "module_tensors", "read_layout", "layer_entry", "polar_config"]


def layout_kind(ck, mod: str) -> str | None:
    """'codes' (layout A or B), 'packed_c' (layout C) or None (module not HLWQ-quantized)."""
    if mod + ".codes" in ck:
        return "codes"
    if mod + ".weight__packed" in ck:
        return "packed_c"
    return None


def module_tensors(ck, mod: str) -> list[str]:
    """Every checkpoint tensor one HLWQ module uses."""
    if layout_kind(ck, mod) == "codes":
        return [mod + s for s in (".codes", ".norms", ".ct", ".ct_scaled") if mod + s in ck]
    return [mod + s for s in (".weight__packed", ".weight__norms", ".weight__meta") if mod + s in ck]


def _unscale(ct_scaled: np.ndarray) -> np.ndarray:
    """Levels ``t`` (float32) with ``float32(t / sqrt(128)) == ct_scaled`` exactly, so dequantizing from a stored
    ``ct_scaled`` reproduces the package's bytes (a plain ``* sqrt(128)`` can be an ulp off)."""
    s = np.float32(math.sqrt(BLOCK))
    t = (ct_scaled.astype(np.float64) * math.sqrt(BLOCK)).astype(np.float32)
    for _ in range(4):
        q = (t / s).astype(np.float32)
        if np.array_equal(q, ct_scaled):
            break
        t = np.where(q < ct_scaled, np.nextafter(t, np.float32(np.inf)),
                     np.where(q > ct_scaled, np.nextafter(t, np.float32(-np.inf)), t)).astype(np.float32)
    return t


def read_table(ck, name: str) -> np.ndarray:
    """A stored codebook (``.ct`` levels or ``.ct_scaled``) as float32 ``[2**bits]``: floating point, one dimension,
    2..256 finite levels, a power of two in number (QuantError naming the tensor otherwise)."""
    t = np.asarray(ck.get(name))
    if t.dtype.kind != "f":
        raise QuantError(f"{name}: an HLWQ codebook must be floating point, got {t.dtype}")
    if t.ndim != 1 or t.size < 2 or t.size > 256 or t.size & (t.size - 1):
        raise QuantError(f"{name}: an HLWQ codebook has shape [2**bits] (2..256 levels), got {list(t.shape)}")
    t = t.astype(np.float32)
    if not np.all(np.isfinite(t)):
        raise QuantError(f"{name}: HLWQ codebook contains NaN or Inf")
    return t


def read_layout(ck, mod: str, shape: tuple[int, int], pc: dict | None):
    """One HLWQ linear ``[out, in]`` from any layout: ``(codes, norms, table, bits, in_features)`` as NumPy arrays
    for ``HLWQWeight`` (codes one per weight or LSB-first packed; the raw levels), checked so far as the layout
    goes (QuantError naming the file and module)."""
    out_f, in_f = shape
    layer = ((pc or {}).get("layers") or {}).get(mod, {})
    if not isinstance(layer, dict):
        raise QuantError(f"polar_config.json: layers[{mod!r}] must be an object, got {type(layer).__name__}")
    for key, lo, hi in (("bits", 1, 8), ("in_features", 1, 1 << 31)):
        v = layer.get(key, (pc or {}).get(key) if key == "bits" else None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi):
            raise QuantError(f"polar_config.json: {mod}.{key} must be an integer in [{lo}, {hi}], got {v!r}")
    in_f = int(layer.get("in_features", in_f))
    k_pad = padded_in(in_f)
    kind = layout_kind(ck, mod)
    where = f"{ck.file_of(module_tensors(ck, mod)[0])}: {mod}"
    try:
        if kind == "codes":
            codes, norms = np.asarray(ck.get(mod + ".codes")), np.asarray(ck.get(mod + ".norms"))
            if mod + ".ct" in ck:
                table = read_table(ck, mod + ".ct")
            elif mod + ".ct_scaled" in ck:
                table = _unscale(read_table(ck, mod + ".ct_scaled"))
            else:
                table = None
            bits = int(layer.get("bits") or (round(math.log2(table.size)) if table is not None else 5))
            table = lloyd_max_table(bits) if table is None else table
            if table.size != 1 << bits:
                raise QuantError(f"HLWQ table shape [{table.size}], expected [{1 << bits}] for {bits} bits")
            if codes.ndim != 2 or codes.shape[0] != out_f:
                raise QuantError(f"codes shape {list(codes.shape)} does not fit a [{out_f}, {in_f}] weight")
            # a bank's experts come from one writer: the bit order is checked on expert 0's codes only (each
            # check faults in a few pages of a mapped file; 17664 expert tensors at the real shapes)
            if codes.shape[-1] == k_pad * bits // 8 and codes.shape[-1] != k_pad and expert_index(mod) in (None, 0):
                order = detect_bit_order(codes, bits, table, max_groups=1024)
                if order == "msb":
                    raise QuantError("packed codes are MSB-first per row, a layout no writer is known to produce")
            return codes, norms, table, bits, in_f
        if kind == "packed_c":
            meta = np.asarray(ck.get(mod + ".weight__meta")).reshape(-1) if mod + ".weight__meta" in ck else None
            bits = int(layer.get("bits") or (pc or {}).get("bits") or 5)
            if meta is not None and meta.size >= 5:  # [out, n_blocks, 128, number of codes, in]
                out_m, nb_m, blk, n_codes, in_m = (int(v) for v in meta[:5])
                if (out_m, in_m, blk, nb_m, n_codes) != (out_f, in_f, BLOCK, k_pad // BLOCK, out_f * k_pad):
                    raise QuantError(f"weight__meta {meta.tolist()} does not fit a [{out_f}, {in_f}] weight")
            packed = np.asarray(ck.get(mod + ".weight__packed")).reshape(-1)
            need = -(-out_f * k_pad // 8) * bits
            if packed.size != need:
                raise QuantError(f"weight__packed has {packed.size} bytes, expected {need}")
            table = lloyd_max_table(bits)
            if detect_bit_order(packed, bits, table) == "lsb":
                raise QuantError("hlwq-q5 packed codes look LSB-first; layout C is MSB-first")
            codes = unpack_msb_flat(packed, bits, (out_f, k_pad))
            return codes, np.asarray(ck.get(mod + ".weight__norms")), table, bits, in_f
    except QuantError as e:
        msg = str(e)
        raise QuantError(msg if msg.startswith(mod) else f"{where}: {msg}") from None
    raise QuantError(f"{where}: not an HLWQ-quantized module")


def layer_entry(out_features: int, in_features: int, bits: int) -> dict:
    """One module's ``polar_config.json`` layer, in the quantizer's flavour for layout B (``packed_q5``)."""
    return {"in_features": in_features, "out_features": out_features, "in_features_padded": padded_in(in_features),
            "n_blocks": padded_in(in_features) // BLOCK, "bits": bits, "block_size": BLOCK, "packed": True,
            "scale_dtype": "float16", "packed_q5": bits == 5}


def polar_config(layers: dict[str, dict]) -> dict:
    """``polar_config.json`` from ``{module: layer_entry(...)}``."""
    bits = sorted({v["bits"] for v in layers.values()})
    return {"format": "polar_engine_v5", "quantization": "polarengine", "block_size": BLOCK,
            "bits": bits[0] if len(bits) == 1 else bits, "producer": "nemojax", "layers": dict(layers)}
