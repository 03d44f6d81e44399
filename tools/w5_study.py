#!/usr/bin/env python3
"""Why is uniform W5 barely better than W4 on mobilenet_small and inception_small?

Weights only, simulated in ONNX Runtime (``tools/fit_study.py``'s BN-folded model with every converted
conv's weight replaced by its dequantized ``xi * q``; activations fp32 -- ``fit_study.py --bfp
--mantissa 8`` and ``--mantissa 16`` give the same numbers, so the BFP mantissa width is not it), on
the first ``--limit`` Fashion-MNIST test images.  For W4/W5/W6 and the fits l2 / mse:

* the logit SQNR of the whole model, the share of its error that is a mean shift of the logits, and
  the SQNR predicted by adding up the errors of each layer quantized alone;
* the same with every weight error's sign randomised (same magnitudes, no pattern);
* per layer: the model-output SQNR with only that layer quantized, and its weight SQNR.

    python tools/w5_study.py [--models mobilenet_small inception_small] [--limit 2000]
Writes results/w5_study.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from fit_study import build_sim, converted_convs, load_folded, run  # noqa: E402


def db(ref: np.ndarray, err_energy: float) -> float:
    return 10 * math.log10(float((ref ** 2).sum()) / max(err_energy, 1e-30))


def study(name: str, x: np.ndarray, fits, log) -> list[dict]:
    from onnx import numpy_helper

    from dsconv_tvm.scheme.metrics import sqnr_db
    from dsconv_tvm.scheme.weights import quantize_weight

    model = load_folded(str(REPO / "models" / f"{name}.onnx"))
    convs = converted_convs(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    ref = run(model, x).astype(np.float64)
    rng = np.random.default_rng(0)
    rows = []
    for fit in fits:
        for b in (4, 5, 6):
            ws = {n.input[1]: quantize_weight(inits[n.input[1]], b, 32, fit).dequantize() for n in convs}
            d = run(build_sim(model, ws), x).astype(np.float64) - ref
            flipped = {k: inits[k] + (w - inits[k]) * rng.choice([-1, 1], size=w.shape) for k, w in ws.items()}
            dr = run(build_sim(model, flipped), x).astype(np.float64) - ref
            alone = {}
            for n in convs:
                e = run(build_sim(model, {n.input[1]: ws[n.input[1]]}), x).astype(np.float64) - ref
                w = inits[n.input[1]]
                alone[n.name] = {"output_sqnr_db": db(ref, float((e ** 2).sum())),
                                 "weight_sqnr_db": sqnr_db(w, ws[n.input[1]]),
                                 "energy": float((e ** 2).sum())}
            row = {"model": name, "fit": fit, "bits": b, "logit_sqnr_db": db(ref, float((d ** 2).sum())),
                   "mean_shift_share": float((d.mean(0) ** 2).sum() * len(d) / (d ** 2).sum()),
                   "sum_of_alone_sqnr_db": db(ref, sum(v["energy"] for v in alone.values())),
                   "random_sign_sqnr_db": db(ref, float((dr ** 2).sum())),
                   "agreement": float((ref.argmax(1) == (ref + d).argmax(1)).mean()), "layers": alone}
            rows.append(row)
            worst = sorted(alone.items(), key=lambda kv: kv[1]["output_sqnr_db"])[:3]
            log(f"{name} {fit} W{b}: logit {row['logit_sqnr_db']:.2f} dB (mean shift {row['mean_shift_share']:.2f}), "
                f"sum of alone {row['sum_of_alone_sqnr_db']:.2f}, random sign {row['random_sign_sqnr_db']:.2f}, "
                f"agreement {row['agreement']:.4f}; worst alone: " +
                ", ".join(f"{k} {v['output_sqnr_db']:.1f} dB (weights {v['weight_sqnr_db']:.1f})" for k, v in worst))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet_small", "inception_small"])
    ap.add_argument("--fits", nargs="+", default=["l2", "mse"])
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--out", default=str(REPO / "results" / "w5_study.json"))
    args = ap.parse_args(argv)
    from dsconv_tvm.accuracy.datasets import load_fashion_mnist

    x = load_fashion_mnist("test")[0][:args.limit]
    rows = [r for m in args.models for r in study(m, x, args.fits, lambda s: print(s, flush=True))]
    Path(args.out).write_text(json.dumps({"images": len(x), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
