"""``dsconv-tvm adapt``: fit the KDS scales (and the float biases) of every DSConv layer to the fp32
teacher on unlabelled inputs, by layer-wise least squares, and write an ONNX model that ``compile``
turns into exactly the adapted DSConv model.

Method (sequential layer-wise reconstruction, numpy only).  The teacher is the fp32 model: ONNX
Runtime gives the output ``Y`` of every Conv on the calibration images.  The student is the DSConv
model run by ``onnx.reference`` in graph order (the numpy DSConv of :mod:`dsconv_tvm.reference` for
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

from .bfp import bfp_quantize, block_scales
from .config import DSConvConfig
from .errors import ConfigError, ModelError
from .weights import quantize_weight

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


@dataclass
class AdaptResult:
    output: str
    config: DSConvConfig
    images: int
    layers: list[LayerFit] = field(default_factory=list)
    seconds: float = 0.0


def _tap_terms(xq_m, scales, q, geom, oh, ow, block):
    """T (n, co, G*KH*KW, OH*OW) float32 for a chunk of images (see the module doc)."""
    from .reference import _windows

    n = xq_m.shape[0]
    co, ci, kh, kw = q.shape
    g = scales.shape[1]
    qp = np.zeros((co, g * block, kh, kw), np.float32)
    qp[:, :ci] = q
    t = np.empty((n, co, g, kh * kw, oh * ow), np.float32)
    for i in range(kh):
        for j in range(kw):
            mw = _windows(xq_m, geom, oh, ow, i, j).reshape(n, g, block, oh * ow)   # exact ints in f32
            sw = _windows(scales, geom, oh, ow, i, j).reshape(n, g, oh * ow)
            wb = qp[:, :, i, j].reshape(co, g, block)
            acc = np.einsum("ngbp,ogb->nogp", mw, wb, optimize=True)              # < 2^24: exact
            t[:, :, :, i * kw + j, :] = acc * sw[:, None]
    return t.reshape(n, co, g * kh * kw, oh * ow)


def fit_layer(x: np.ndarray, y: np.ndarray, q: np.ndarray, xi: np.ndarray, bias: np.ndarray | None,
              block: int, mantissa: int, geom, unsigned: bool, ridge: float = RIDGE, want_output: bool = False):
    """Least-squares KDS scales and bias of one layer: (xi' float32, b' float32, err_before, err_after,
    channels changed[, output]).  ``x`` is the student's float input, ``y`` the teacher's conv output.
    With ``want_output`` the layer's output with the new parameters (float32, summed in another order
    than :func:`dsconv_tvm.reference.dsconv2d`) is returned too."""
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


def adapt_model(model_path: str, x: np.ndarray, config: DSConvConfig, output: str, log=None,
                ridge: float = RIDGE) -> AdaptResult:
    """Adapt ``model_path`` on the unlabelled images ``x`` and write the adapted ONNX to ``output``."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.ops.op_conv import Conv as _OnnxConv

    from .accuracy import _ort_outputs, probe_model
    from .compiler import build_relax
    from .frontend import load_onnx
    from .outputs import atomic_write

    log = log or (lambda m: None)
    if config.fit != "l2":
        raise ConfigError("adapt starts from the l2 fit (its integers are re-derived exactly by "
                          "`compile --fit l2`); use --fit l2")
    t0 = time.time()
    loaded = load_onnx(model_path)
    in_name = next(iter(loaded.input_shapes))
    want = list(loaded.input_shapes[in_name][1:])
    if list(x.shape[1:]) != want:
        raise ModelError(f"{model_path}: input {in_name!r} takes samples of shape {want}, the data has {list(x.shape[1:])}")
    _, report = build_relax(loaded, config)
    layers = {layer.name: layer for layer in report.converted}
    if not layers:
        raise ModelError(f"{model_path}: no conv is converted to DSConv with this scheme; nothing to adapt")
    names = [n for n in loaded.conv_names if n in layers]
    log(f"teacher: fp32 conv outputs of {len(names)} DSConv layers on {len(x)} images (ONNX Runtime)")
    teacher = dict(zip(names, _ort_outputs(probe_model(loaded.model, names).SerializeToString(), x)[1:]))
    model = loaded.model
    inits = {i.name: i for i in model.graph.initializer}
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
            xi, b, e0, e1, changed, y = fit_layer(X, teacher.pop(name), qw.q, qw.xi, bias, config.block,
                                                  config.mantissa, layer.geom, layer.unsigned, ridge,
                                                  want_output=True)
            new_params[name] = (xi, b)
            fit = LayerFit(name, qw.xi[0].size + 1, e0, e1, changed, qw.q.shape[0])
            result.layers.append(fit)
            log(f"  {name}: rel. error {e0:.5f} -> {e1:.5f} ({changed}/{fit.channels} channels changed)")
            return (y,)

    log("student: numpy DSConv forward, fitting each layer in graph order")
    ReferenceEvaluator(model, new_ops=[Conv]).run(None, {in_name: x})

    for name, (xi, b) in new_params.items():
        node, qw = nodes[name], layers[name].quantized
        w_new = (qw.q.astype(np.float32) * np.repeat(xi, config.block, axis=1)[:, :qw.q.shape[1]]).astype(np.float32)
        again = quantize_weight(w_new, config.bits, config.block, "l2", config.scale_dtype)
        if not np.array_equal(again.q, qw.q) or not np.allclose(again.xi, xi, rtol=1e-5, atol=0):
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
            "images": len(x), "source": str(model_path).rsplit("/", 1)[-1]}
    model.metadata_props.append(onnx.StringStringEntryProto(key="dsconv_tvm.adapted", value=json.dumps(meta)))
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    atomic_write(output, lambda f: f.write(data))
    _ = inits
    result.seconds = time.time() - t0
    return result


def format_adapt(res: AdaptResult) -> str:
    c = res.config
    lines = [f"scheme    W{c.bits} B={c.block} m={c.mantissa} (fit l2, first layer {c.first_layer}, "
             f"depthwise {c.depthwise}); {res.images} unlabelled images",
             f"  {'layer':<32} {'unknowns/ch':>11} {'rel. err l2 fit':>16} {'adapted':>10} {'channels':>10}"]
    for f in res.layers:
        lines.append(f"  {f.name[:32]:<32} {f.unknowns:>11} {f.err_before:>16.5f} {f.err_after:>10.5f} "
                     f"{f.channels_changed:>4}/{f.channels:<5}")
    tot0 = sum(f.err_before for f in res.layers)
    tot1 = sum(f.err_after for f in res.layers)
    lines.append(f"objective sum of per-layer relative errors {tot0:.5f} -> {tot1:.5f}")
    lines.append(f"wrote     {res.output} in {res.seconds:.1f} s (compile it with the same --bits/--block/--mantissa and --fit l2)")
    return "\n".join(lines)
