"""``dsconv-tvm adapt``: fit the KDS scales (and the float biases) of every DSConv layer to the fp32
teacher on unlabelled inputs, by layer-wise least squares, and write an ONNX model that ``compile``
turns into exactly the adapted DSConv model.

Method (sequential layer-wise reconstruction, numpy only).  The teacher is the fp32 model: ONNX
Runtime gives the output ``Y`` of every Conv on the calibration images.  The student is the DSConv
model run by ``onnx.reference`` in graph order (the numpy DSConv of :mod:`dsconv_tvm.scheme.reference` for
converted convs, so it sees its own quantized activations, including the error of the layers before).
When the student reaches a converted conv with input ``X``, ``X`` is BFP-quantized exactly as the
kernel does; the layer's output is then *linear* in its KDS scales and bias:

    out[n, co, p] = sum_(g, tap) xi[co, g, tap] * T[n, co, g, tap, p] + b[co],
    T = (sum_(c in g) Q[co, c, tap] * M[n, c, p + tap]) * 2^(e[n, g, p + tap] - f)

so the scales minimising ``||out - Y||^2`` (student on its own input, teacher on its own) are one
small ridge-regularised least-squares problem per output channel (``G*KH*KW + 1`` unknowns).  Per
output channel the new parameters are kept only if they lower that error.  The integers ``Q`` are the
``l2`` fit's and do not change.

Output: the BN-folded ONNX model with each converted conv's weight replaced by ``xi' * Q`` and its
bias by ``b'``.  Because every nonzero ``l2`` slice holds ``Q = -2^(b-1)`` at its largest element,
``compile --fit l2`` with the same ``--bits/--block`` re-derives exactly this ``Q`` and (to float32
rounding) ``xi'`` from it: the packed format is unchanged and any tool that reads ONNX can run it.
:func:`adapt_model` checks that re-derivation before writing.  No label is ever read.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np

from ..config import DSConvConfig, scheme_bits
from ..driver.compile import build_relax
from ..errors import ConfigError, ModelError
from ..fileio import atomic_write
from ..frontend.onnx import load_onnx
from ..scheme.bfp import bfp_dequantize, bfp_quantize, block_scales
from ..scheme.geometry import windows
from ..scheme.weights import quantize_weight
from .datasets import check_samples
from .probes import ort_outputs, probe_model

RIDGE = 1e-4          # ridge weight, relative to the mean diagonal of the normal matrix, towards the l2 fit
_CHUNK_FLOATS = 1 << 24


@dataclass
class LayerFit:
    name: str
    unknowns: int
    err_before: float    # ||out - Y||^2 / ||Y||^2 with the l2 scales (on the adapted upstream input)
    err_after: float     # the same with the adapted scales and bias
    channels_changed: int
    channels: int
    rounding: str = "nearest"   # the integers: the l2 fit's (nearest) or re-rounded (gptq)


@dataclass
class AdaptResult:
    output: str
    config: DSConvConfig
    images: int
    layers: list[LayerFit] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0     # CPU time of this process (all threads)


def _tap_terms(xq_m, scales, q, geom, oh, ow, block):
    """T (n, co, G*KH*KW, OH*OW) float32 for a chunk of images (see the module doc)."""
    n = xq_m.shape[0]
    co, ci, kh, kw = q.shape
    g = scales.shape[1]
    qp = np.zeros((co, g * block, kh, kw), np.float32)
    qp[:, :ci] = q
    t = np.empty((n, co, g, kh * kw, oh * ow), np.float32)
    for i in range(kh):
        for j in range(kw):
            mw = windows(xq_m, geom, oh, ow, i, j).reshape(n, g, block, oh * ow)   # exact ints in f32
            sw = windows(scales, geom, oh, ow, i, j).reshape(n, g, oh * ow)
            wb = qp[:, :, i, j].reshape(co, g, block)
            acc = np.einsum("ngbp,ogb->nogp", mw, wb, optimize=True)              # < 2^24: exact
            t[:, :, :, i * kw + j, :] = acc * sw[:, None]
    return t.reshape(n, co, g * kh * kw, oh * ow)


def fit_layer(x: np.ndarray, y: np.ndarray, q: np.ndarray, xi: np.ndarray, bias: np.ndarray | None,
              block: int, mantissa: int, geom, unsigned: bool, ridge: float = RIDGE, want_output: bool = False):
    """Least-squares KDS scales and bias of one layer: (xi' float32, b' float32, err_before, err_after,
    channels changed[, output]).  ``x`` is the student's float input, ``y`` the teacher's conv output.
    With ``want_output`` the layer's output with the new parameters (float32, summed in another order
    than :func:`dsconv_tvm.scheme.reference.dsconv2d`) is returned too."""
    n, _, h, w = x.shape
    co, _, kh, kw = q.shape
    g = xi.shape[1]
    oh, ow = geom.out_size(h, w, kh, kw)
    if y.shape != (n, co, oh, ow):
        raise ModelError(f"teacher output shape {y.shape} does not match the layer's {(n, co, oh, ow)}")
    k = g * kh * kw + 1
    m, e = bfp_quantize(x, block, mantissa, unsigned)
    s = block_scales(e, mantissa, unsigned)
    pt, pl, pb, pr = geom.padding
    m = np.pad(m.astype(np.float32), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    s = np.pad(s, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    step = max(1, _CHUNK_FLOATS // max(1, co * k * oh * ow))

    def chunks():
        for a in range(0, n, step):
            t = _tap_terms(m[a:a + step], s[a:a + step], q, geom, oh, ow, block)       # (nc, co, K-1, P)
            nc = t.shape[0]
            t = np.concatenate([t, np.ones((nc, co, 1, oh * ow), np.float32)], axis=2)  # bias column
            yield a, nc, t.transpose(1, 2, 0, 3).reshape(co, k, nc * oh * ow)

    gram = np.zeros((co, k, k), np.float64)
    rhs = np.zeros((co, k), np.float64)
    yy = np.zeros(co, np.float64)
    for a, nc, tt in chunks():
        yc = y[a:a + nc].reshape(nc, co, oh * ow).transpose(1, 0, 2).reshape(co, nc * oh * ow)
        gram += np.matmul(tt, tt.transpose(0, 2, 1)).astype(np.float64)
        rhs += np.matmul(tt, yc[..., None])[..., 0].astype(np.float64)
        yy += np.einsum("cp,cp->c", yc.astype(np.float64), yc.astype(np.float64))
    theta0 = np.concatenate([xi.reshape(co, -1).astype(np.float64),
                             (np.zeros((co, 1)) if bias is None else bias.reshape(co, 1).astype(np.float64))], axis=1)
    diag = np.maximum(np.einsum("ckk->ck", gram).mean(axis=1), 1e-30)
    lam = ridge * diag
    a_mat = gram + lam[:, None, None] * np.eye(k)[None]
    theta = np.linalg.solve(a_mat, (rhs + lam[:, None] * theta0)[..., None])[..., 0]
    theta32 = theta.astype(np.float32).astype(np.float64)

    def err(th):
        return np.einsum("ck,ckl,cl->c", th, gram, th) - 2 * np.einsum("ck,ck->c", th, rhs) + yy

    e0, e1 = err(theta0), err(theta32)
    better = e1 < e0
    theta_new = np.where(better[:, None], theta32, theta0)
    e_new = np.where(better, e1, e0)
    ysum = max(float(yy.sum()), 1e-30)
    xi_new = theta_new[:, :-1].reshape(xi.shape).astype(np.float32)
    b_new = theta_new[:, -1].astype(np.float32)
    out = (xi_new, b_new, float(e0.sum() / ysum), float(e_new.sum() / ysum), int(better.sum()))
    if not want_output:
        return out
    y_new = np.empty((n, co, oh, ow), np.float32)
    th32 = theta_new.astype(np.float32)
    for a, nc, tt in chunks():
        yc = np.matmul(th32[:, None, :], tt)[:, 0]                                 # (co, nc*P)
        y_new[a:a + nc] = yc.reshape(co, nc, oh, ow).transpose(1, 0, 2, 3)
    return out + (y_new,)


def _anchors(w: np.ndarray, xi: np.ndarray, block: int) -> np.ndarray:
    """bool (CO, CI, KH, KW): the largest-magnitude element of every nonzero slice (where the l2 fit
    puts q = -2^(b-1); keeping it there is what lets ``compile`` re-derive the integers)."""
    co, ci, kh, kw = w.shape
    g = xi.shape[1]
    a = np.zeros((co, g * block, kh, kw), np.float64)
    a[:, :ci] = np.abs(w)
    idx = np.argmax(a.reshape(co, g, block, kh, kw), axis=2)                       # (co, g, kh, kw)
    mask = np.zeros((co, g * block, kh, kw), bool)
    o, gg, i, j = np.indices(idx.shape)
    mask[o, gg * block + idx, i, j] = xi != 0
    return mask[:, :ci]


def input_hessian(x: np.ndarray, kh: int, kw: int, geom, max_rows: int = 200_000, seed: int = 0) -> np.ndarray:
    """H = A^T A / rows over the im2col rows A (one per output pixel, columns (ci, i, j)) of ``x``;
    at most ``max_rows`` pixels, drawn with a fixed seed."""
    n, ci, h, w = x.shape
    oh, ow = geom.out_size(h, w, kh, kw)
    pt, pl, pb, pr = geom.padding
    xp = np.pad(x.astype(np.float32), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    rng = np.random.default_rng(seed)
    per_image = max(1, min(oh * ow, max_rows // max(1, n)))
    d = ci * kh * kw
    hess = np.zeros((d, d), np.float64)
    rows = 0
    step = max(1, (1 << 22) // max(1, d * per_image))
    for a in range(0, n, step):
        cols = np.stack([windows(xp[a:a + step], geom, oh, ow, i, j) for i in range(kh) for j in range(kw)],
                        axis=2)                                        # (nc, ci, taps, oh, ow)
        nc = cols.shape[0]
        cols = cols.reshape(nc, d, oh * ow)
        if per_image < oh * ow:
            pick = rng.choice(oh * ow, per_image, replace=False)
            cols = cols[:, :, pick]
        m = cols.transpose(0, 2, 1).reshape(-1, d)
        hess += (m.T @ m).astype(np.float64)
        rows += m.shape[0]
    return hess / max(rows, 1)


def gptq_round(w: np.ndarray, xi: np.ndarray, bits: int, block: int, hess: np.ndarray,
               damp: float = 0.01) -> np.ndarray:
    """Integers for fixed scales ``xi`` that minimise the output error ||(W - xi Q) X|| (X's second
    moment ``hess``) rather than the weight error: columns are rounded one at a time and the rounding
    error is pushed onto the columns not yet rounded through the inverse Hessian (OBQ/GPTQ,
    Frantar et al. 2022).  The anchor of every slice keeps q = -2^(b-1)."""
    co, ci, kh, kw = w.shape
    d = ci * kh * kw
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    h = hess.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h += damp * float(np.mean(np.diag(h))) * np.eye(d)
    u = np.linalg.cholesky(np.linalg.inv(h)).T                          # upper: H^-1 = U^T U
    wr = w.astype(np.float64).reshape(co, d).copy()
    scale = np.repeat(xi.astype(np.float64), block, axis=1)[:, :ci].reshape(co, d)
    anchor = _anchors(w, xi, block).reshape(co, d)
    q = np.zeros((co, d), np.float64)
    inv_s = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    for j in range(d):
        col = np.clip(np.rint(wr[:, j] * inv_s[:, j]), lo, hi)
        col = np.where(anchor[:, j], lo, col)
        q[:, j] = col
        err = (wr[:, j] - scale[:, j] * col) / u[j, j]
        wr[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    return q.reshape(w.shape).astype(np.int8)


ROUNDINGS = ("gptq", "nearest")


def adapt_model(model_path: str, x: np.ndarray, config: DSConvConfig, output: str, log=None,
                ridge: float = RIDGE, rounding: str = "gptq") -> AdaptResult:
    """Adapt ``model_path`` on the unlabelled images ``x`` and write the adapted ONNX to ``output``."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.ops.op_conv import Conv as _OnnxConv

    log = log or (lambda m: None)
    if rounding not in ROUNDINGS:
        raise ConfigError(f"--rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")
    if config.fit != "l2":
        raise ConfigError("adapt starts from the l2 fit (its integers are re-derived exactly by "
                          "`compile --fit l2`); use --fit l2")
    t0, c0 = time.time(), time.process_time()
    loaded = load_onnx(model_path)
    in_name, want = check_samples(model_path, loaded, x)
    _, report = build_relax(loaded, config)
    layers = {layer.name: layer for layer in report.converted}
    if not layers:
        raise ModelError(f"{model_path}: no conv is converted to DSConv with this scheme; nothing to adapt")
    names = [n for n in loaded.conv_names if n in layers]
    log(f"teacher: fp32 conv outputs of {len(names)} DSConv layers on {len(x)} images (ONNX Runtime)")
    teacher = dict(zip(names, ort_outputs(probe_model(loaded.model, names).SerializeToString(), x)[1:]))
    model = loaded.model
    nodes = {n.name: n for n in model.graph.node}
    result = AdaptResult(output, config, len(x))
    new_params: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    class Conv(_OnnxConv):
        op_domain = ""

        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
                 pads=None, strides=None):
            name = self.onnx_node.name
            layer = layers.get(name)
            if layer is None:
                return super()._run(X, W, B, auto_pad=auto_pad, dilations=dilations, group=group,
                                    kernel_shape=kernel_shape, pads=pads, strides=strides)
            qw = layer.quantized
            X = X.astype(np.float32)
            bias = None if B is None else np.asarray(B, np.float32)
            target = teacher.pop(name)
            args = (config.block, config.mantissa, layer.geom, layer.unsigned, ridge)
            fit = fit_layer(X, target, qw.q, qw.xi, bias, *args, want_output=rounding == "nearest")
            q, how = qw.q, "nearest"
            if rounding == "gptq":
                m_, e_ = bfp_quantize(X, config.block, config.mantissa, layer.unsigned)
                xd = bfp_dequantize(m_, e_, config.block, config.mantissa, layer.unsigned, X.shape[1])
                w = np.asarray(W, np.float32)
                q_g = gptq_round(w, qw.xi, qw.bits, config.block,
                                 input_hessian(xd, w.shape[2], w.shape[3], layer.geom))
                fit_g = fit_layer(X, target, q_g, qw.xi, bias, *args, want_output=True)
                if fit_g[3] < fit[3]:
                    fit, q, how = fit_g[:1] + fit_g[1:2] + (fit[2],) + fit_g[3:], q_g, "gptq"
                else:
                    fit = fit_layer(X, target, qw.q, qw.xi, bias, *args, want_output=True)
            xi, b, e0, e1, changed, y = fit
            new_params[name] = (q, xi, b)
            rec = LayerFit(name, qw.xi[0].size + 1, e0, e1, changed, qw.q.shape[0], how)
            result.layers.append(rec)
            log(f"  {name}: rel. error {e0:.5f} -> {e1:.5f} (rounding {how}, {changed}/{rec.channels} "
                f"channels' scales changed)")
            return (y,)

    log("student: numpy DSConv forward, fitting each layer in graph order")
    ReferenceEvaluator(model, new_ops=[Conv]).run(None, {in_name: x})

    for name, (q, xi, b) in new_params.items():
        node = nodes[name]
        w_new = (q.astype(np.float32) * np.repeat(xi, config.block, axis=1)[:, :q.shape[1]]).astype(np.float32)
        again = quantize_weight(w_new, layers[name].quantized.bits, config.block, "l2", config.scale_dtype)
        if not np.array_equal(again.q[xi_nonzero(xi, config.block, q.shape[1])],
                              q[xi_nonzero(xi, config.block, q.shape[1])]) \
                or not np.allclose(again.xi, xi, rtol=1e-5, atol=0):
            raise ModelError(f"{name}: the adapted weight does not re-quantize to the same integers "
                             f"(internal error)")
        wname, bname = f"{name}_W_adapted", f"{name}_B_adapted"
        model.graph.initializer.extend([numpy_helper.from_array(w_new, wname), numpy_helper.from_array(b, bname)])
        new_inputs = [node.input[0], wname, bname]
        del node.input[:]
        node.input.extend(new_inputs)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    meta = {"bits": config.bits, "block": config.block, "mantissa": config.mantissa, "fit": "l2",
            **({"layer_bits": dict(config.layer_bits)} if config.layer_bits else {}),
            "images": len(x), "source": str(model_path).rsplit("/", 1)[-1]}
    model.metadata_props.append(onnx.StringStringEntryProto(key="dsconv_tvm.adapted", value=json.dumps(meta)))
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    atomic_write(output, lambda f: f.write(data))
    result.seconds = time.time() - t0
    result.cpu_seconds = time.process_time() - c0
    return result


def xi_nonzero(xi: np.ndarray, block: int, ci: int) -> np.ndarray:
    """bool (CO, CI, KH, KW): weights whose slice has a nonzero scale (elsewhere q does not matter)."""
    return (np.repeat(xi, block, axis=1)[:, :ci] != 0)


def format_adapt(res: AdaptResult) -> str:
    c = res.config
    lines = [f"scheme    {scheme_bits(c)} B={c.block} m={c.mantissa} (fit l2, first layer {c.first_layer}, "
             f"depthwise {c.depthwise}); {res.images} unlabelled images",
             f"  {'layer':<32} {'unknowns/ch':>11} {'rel. err l2 fit':>16} {'adapted':>10} {'rounding':>9} "
             f"{'channels':>10}"]
    for f in res.layers:
        lines.append(f"  {f.name[:32]:<32} {f.unknowns:>11} {f.err_before:>16.5f} {f.err_after:>10.5f} "
                     f"{f.rounding:>9} {f.channels_changed:>4}/{f.channels:<5}")
    tot0 = sum(f.err_before for f in res.layers)
    tot1 = sum(f.err_after for f in res.layers)
    lines.append(f"objective sum of per-layer relative errors {tot0:.5f} -> {tot1:.5f}")
    lines.append(f"wrote     {res.output} in {res.seconds:.1f} s ({res.cpu_seconds:.0f} s CPU) "
                 "(compile it with the same --bits/--block/--mantissa and --fit l2)")
    return "\n".join(lines)
