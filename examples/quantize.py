"""Quantize a checkpoint to NVFP4 (ModelOpt layout, calibrated, FP8 KV) and to HLWQ Q5, then compare logits.

    python examples/quantize.py [--model DIR] [--out DIR]
"""
import argparse
import os

import numpy as np

import nemojax
from nemojax import quant
from nemojax.cli import default_model_path
from nemojax.checkpoint import save_params


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--out", default="quantized")
    a = ap.parse_args()
    m = nemojax.load(a.model, dtype="bfloat16")
    cfg = m.config
    rng = np.random.default_rng(0)
    calib = [rng.integers(3, cfg.vocab_size, (2, 64)) for _ in range(4)]
    amax = quant.calibrate_model(m.params, cfg, calib, "nvfp4")
    variants = {"nvfp4": quant.apply(m.params, cfg, "nvfp4", calibration=amax),
                "hlwq-q5": quant.apply(m.params, cfg, "hlwq-q5")}
    ids = rng.integers(3, cfg.vocab_size, (1, 32))
    ref = np.asarray(m.logits(ids))
    for name, params in variants.items():
        folder = os.path.join(a.out, name)
        save_params(params, cfg, folder)
        q = nemojax.load(folder, dtype="bfloat16")
        err = np.abs(np.asarray(q.logits(ids)) - ref).mean()
        print(f"{name}: written to {folder}, mean |dlogit| vs bf16 = {err:.4f}")


if __name__ == "__main__":
    main()
