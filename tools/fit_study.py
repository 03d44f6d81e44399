#!/usr/bin/env python3
"""Study candidate 4-bit defaults in simulation (numpy + ONNX Runtime), before touching the compiler.

The DSConv model is simulated with ONNX Runtime on a BN-folded copy of the ONNX model in which every
conv the compiler would convert (group == 1, not the first conv, as in ``DSConvConfig``'s defaults):

* has its weight replaced by the dequantized candidate ``xi * q`` (numpy, ``dsconv_tvm.weights`` or a
  candidate fit defined here), and
* (``--bfp``) has its input replaced by its BFP round trip, written as ONNX ops (block max over B
  channels, exponent, ``Round`` (half to even), clip, rescale; unsigned mantissa after a ReLU).

Metrics against the fp32 model on the Fashion-MNIST test images (labels only for top-1): top-1 %,
loss in points, top-1 agreement with fp32 and the logit SQNR (dB), which is far less noisy than top-1.

    python tools/fit_study.py models/inception_small.onnx --fits l2 mse --bits 4 --block 32 [--bfp]
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

from dsconv_tvm.scheme.weights import alpha_grid, quantize_weight  # noqa: E402

MEAN, STD = 0.2860, 0.3530


# ---------------------------------------------------------------- candidate weight fits (numpy)
def _slices(w: np.ndarray, block: int):
    """(CO, CI, KH, KW) -> x (Bp, S) one slice per column, plus the inverse mapping."""
    co, ci, kh, kw = w.shape
    g = -(-ci // block)
    bp = min(block, ci) if g == 1 else block
    wp = np.zeros((co, g * bp, kh, kw), np.float64)
    wp[:, :ci] = w
    x = wp.reshape(co, g, bp, kh, kw).transpose(2, 0, 1, 3, 4).reshape(bp, -1)

    def back(xs):
        return xs.reshape(bp, co, g, kh, kw).transpose(1, 2, 0, 3, 4).reshape(co, g * bp, kh, kw)[:, :ci]
    return x, back


def fit_alpha(w, bits, block, alpha):
    """Fixed clipping: step t = alpha * max|w| / 2^(b-1), nearest rounding, LS scale."""
    x, back = _slices(w, block)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    a = x[np.argmax(np.abs(x), 0), np.arange(x.shape[1])]
    inv = np.divide(lo, a * alpha, out=np.zeros_like(a), where=np.abs(a) > 0)
    q = np.clip(np.rint(x * inv), lo, hi)
    sqq = (q * q).sum(0)
    xi = np.divide((x * q).sum(0), sqq, out=np.zeros_like(sqq), where=sqq > 0)
    return back(q * xi.astype(np.float32)).astype(np.float32)


def fit_balanced(w, bits, block, fit="l2"):
    """Balanced blocks: the same number of blocks G = ceil(CI/B), each of ceil(CI/G) channels."""
    ci = w.shape[1]
    g = -(-ci // block)
    b2 = -(-ci // g)
    return make_fit(fit)(w, bits, b2)


def fit_weighted(w, bits, block, power=1.0):
    """Grid search over the clipping scale minimising sum |w|^p (w - xi q)^2 (large weights matter)."""
    x, back = _slices(w, block)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    a = x[np.argmax(np.abs(x), 0), np.arange(x.shape[1])]
    wt = np.abs(x) ** power + 1e-30
    best = np.full(x.shape[1], np.inf)
    out = np.zeros_like(x)
    for alpha in alpha_grid(bits):
        inv = np.divide(lo, a * alpha, out=np.zeros_like(a), where=np.abs(a) > 0)
        q = np.clip(np.rint(x * inv), lo, hi)
        sqq = (wt * q * q).sum(0)
        xi = np.divide((wt * x * q).sum(0), sqq, out=np.zeros_like(sqq), where=sqq > 0)
        xi = xi.astype(np.float32).astype(np.float64)
        e = (wt * (x - xi * q) ** 2).sum(0)
        take = e < best
        best[take] = e[take]
        out[:, take] = (q * xi)[:, take]
    return back(out).astype(np.float32)


def fit_l2_refined(w, bits, block, steps=2):
    """The l2 fit, then alternating (q <- clip(rint(w / xi)), xi <- LS) steps kept per slice if better."""
    x, back = _slices(w, block)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    a = x[np.argmax(np.abs(x), 0), np.arange(x.shape[1])]
    inv = np.divide(lo, a, out=np.zeros_like(a), where=np.abs(a) > 0)
    q = np.clip(np.rint(x * inv), lo, hi)

    def ls(q):
        sqq = (q * q).sum(0)
        xi = np.divide((x * q).sum(0), sqq, out=np.zeros_like(sqq), where=sqq > 0)
        return xi, ((x - xi * q) ** 2).sum(0)
    xi, err = ls(q)
    for _ in range(steps):
        q2 = np.clip(np.rint(x * np.divide(1.0, xi, out=np.zeros_like(xi), where=xi != 0)), lo, hi)
        xi2, err2 = ls(q2)
        take = err2 < err
        q[:, take], xi[take], err[take] = q2[:, take], xi2[take], err2[take]
    return back(q * xi.astype(np.float32)).astype(np.float32)


def make_fit(spec: str):
    """'l2', 'mse', 'l2r', 'alpha0.9', 'wt1', 'wt2' (|w|^p-weighted clipping search), 'bal-<fit>'."""
    if spec in ("l2", "mse"):
        return lambda w, b, B: quantize_weight(w, b, B, spec).dequantize()
    if spec == "l2r":
        return fit_l2_refined
    if spec.startswith("alpha"):
        al = float(spec[5:])
        return lambda w, b, B: fit_alpha(w, b, B, al)
    if spec.startswith("bal-"):
        f = spec[4:]
        return lambda w, b, B: fit_balanced(w, b, B, f)
    if spec.startswith("wt"):
        p = float(spec[2:])
        return lambda w, b, B: fit_weighted(w, b, B, p)
    raise SystemExit(f"unknown fit {spec}")


# ---------------------------------------------------------------- the simulated model (ONNX)
def load_folded(path: str):
    import onnx

    from dsconv_tvm.frontend.batchnorm import fold_conv_batchnorm
    model = onnx.load(path)
    fold_conv_batchnorm(model)
    return model


def converted_convs(model) -> list:
    """Conv nodes the compiler converts by default: constant weight, group 1, not the first conv."""
    import onnx
    inits = {t.name for t in model.graph.initializer}
    out = []
    for i, node in enumerate(n for n in model.graph.node if n.op_type == "Conv"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if i == 0 or attrs.get("group", 1) != 1 or node.input[1] not in inits:
            continue
        out.append(node)
    return out


def _bfp_nodes(x: str, tag: str, channels: int, block: int, mantissa: int, unsigned: bool, clip_max: float):
    """ONNX nodes + initializers computing the BFP round trip of NCHW ``x``; returns (nodes, inits, out)."""
    from onnx import helper, numpy_helper
    g = -(-channels // block)
    pad = g * block - channels
    f = mantissa if unsigned else mantissa - 1
    lo, hi = (0, 2 ** mantissa - 1) if unsigned else (-(2 ** (mantissa - 1)), 2 ** (mantissa - 1) - 1)
    c = lambda name, v: numpy_helper.from_array(np.asarray(v), f"{tag}_{name}")  # noqa: E731
    inits = [c("pads", np.array([0, 0, 0, 0, 0, pad, 0, 0], np.int64)),
             c("shape5", np.array([0, g, block, -1], np.int64)),
             c("ax2", np.array([2], np.int64)),
             c("tiny", np.float32(1e-30)), c("two", np.float32(2.0)), c("one", np.float32(1.0)),
             c("f", np.float32(f)), c("lo", np.float32(lo)), c("hi", np.float32(hi)),
             c("clip", np.float32(clip_max)),
             c("st", np.array([0], np.int64)), c("en", np.array([channels], np.int64)),
             c("ax1", np.array([1], np.int64))]
    n = lambda op, ins, out, **kw: helper.make_node(op, [f"{tag}_{i}" if not i.startswith("@") else i[1:] for i in ins],  # noqa: E731
                                                     [f"{tag}_{out}"], **kw)
    nodes = [n("Pad", [f"@{x}", "pads"], "xp"),
             n("Reshape", ["xp", "shape5"], "x5"),
             n("Abs", ["x5"], "a5"),
             n("ReduceMax", ["a5", "ax2"], "amax", keepdims=1),
             n("Mul", ["amax", "clip"], "amaxc"),
             n("Max", ["amaxc", "tiny"], "amax2"),
             n("Log", ["amax2"], "ln"),
             # k with amax in [2^(k-1), 2^k): floor(log2 amax) + 1
             n("Div", ["ln", "ln2"], "l2"),
             n("Floor", ["l2"], "fl"),
             n("Add", ["fl", "one"], "e"),
             n("Sub", ["f", "e"], "fe"),
             n("Pow", ["two", "fe"], "inv"),
             n("Mul", ["x5", "inv"], "xs"),
             n("Round", ["xs"], "r"),
             n("Clip", ["r", "lo", "hi"], "m"),
             n("Div", ["m", "inv"], "xq5"),
             n("Shape", ["xp"], "shape4"),
             n("Reshape", ["xq5", "shape4"], "xq4"),
             n("Slice", ["xq4", "st", "en", "ax1"], "out")]
    inits.append(c("ln2", np.float32(math.log(2.0))))
    return nodes, inits, f"{tag}_out"


def build_sim(model, weights: dict[str, np.ndarray], bfp: dict | None = None):
    """Copy of ``model`` with conv weights replaced and (optionally) BFP round trips on conv inputs."""
    import onnx
    from onnx import numpy_helper, shape_inference
    m = onnx.ModelProto()
    m.CopyFrom(model)
    by_name = {t.name: t for t in m.graph.initializer}
    for wname, w in weights.items():
        by_name[wname].CopyFrom(numpy_helper.from_array(w.astype(np.float32), wname))
    if bfp:
        inferred = shape_inference.infer_shapes(m)
        chans = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
            dims = vi.type.tensor_type.shape.dim
            if len(dims) == 4 and dims[1].dim_value:
                chans[vi.name] = dims[1].dim_value
        producers = {o: nd for nd in m.graph.node for o in nd.output}
        new_nodes = []
        conv_names = set(bfp["convs"])
        for i, node in enumerate(m.graph.node):
            if node.op_type == "Conv" and node.name in conv_names:
                x = node.input[0]
                prod = producers.get(x)
                unsigned = bfp["unsigned"] and prod is not None and prod.op_type == "Relu"
                nodes, inits, out = _bfp_nodes(x, f"bfp{i}", chans[x], bfp["block"], bfp["mantissa"],
                                               unsigned, bfp.get("clip", 1.0))
                new_nodes += nodes
                m.graph.initializer.extend(inits)
                node.input[0] = out
            new_nodes.append(node)
        del m.graph.node[:]
        m.graph.node.extend(new_nodes)
    return m


def run(model, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def metrics(ref: np.ndarray, out: np.ndarray, labels: np.ndarray) -> dict:
    agree = ref.argmax(1) == out.argmax(1)
    d = ((ref - out) ** 2).sum()
    return {"top1": float((out.argmax(1) == labels).mean() * 100),
            "loss_pt": float(((ref.argmax(1) == labels).mean() - (out.argmax(1) == labels).mean()) * 100),
            "agreement": float(agree.mean()),
            "agreement_se": float(math.sqrt(agree.mean() * (1 - agree.mean()) / len(agree))),
            "logit_sqnr_db": float(10 * math.log10((ref ** 2).sum() / max(d, 1e-30)))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--fits", nargs="+", default=["l2", "mse"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--mantissa", type=int, default=8)
    ap.add_argument("--bfp", action="store_true", help="simulate the BFP activations too")
    ap.add_argument("--clip", type=float, nargs="+", default=[1.0], help="BFP block-max scale(s) (with --bfp)")
    ap.add_argument("--normalized", nargs="*", default=["dense_small"],
                    help="model stems that take the normalized image")
    ap.add_argument("--limit", type=int, default=10000)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from onnx import numpy_helper

    from dsconv_tvm.accuracy.datasets import load_fashion_mnist
    x, y = load_fashion_mnist("test")
    x, y = x[:args.limit], y[:args.limit]
    results = []
    for path in args.models:
        stem = Path(path).stem
        xin = ((x - MEAN) / STD).astype(np.float32) if stem in args.normalized else x
        model = load_folded(path)
        convs = converted_convs(model)
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        ref = run(model, xin)
        for spec in args.fits:
            fit = make_fit(spec)
            weights = {n.input[1]: fit(inits[n.input[1]], args.bits, args.block) for n in convs}
            for clip in (args.clip if args.bfp else [None]):
                bfp = ({"convs": [n.name for n in convs], "block": args.block, "mantissa": args.mantissa,
                        "unsigned": True, "clip": clip} if args.bfp else None)
                out = run(build_sim(model, weights, bfp), xin)
                r = {"model": stem, "fit": spec, "bits": args.bits, "block": args.block,
                     "bfp": bool(args.bfp), "clip": clip, **metrics(ref, out, y)}
                results.append(r)
                print(f"{stem:16s} {spec:10s} clip={clip} top1 {r['top1']:.2f} loss {r['loss_pt']:+.2f} "
                      f"agree {r['agreement']:.4f}±{r['agreement_se']:.4f} logit SQNR {r['logit_sqnr_db']:.2f} dB",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
