"""The numpy DSConv forward: integer dot products inside blocks (int32), float across blocks.

This is the reference the compiled TensorIR kernels are compared with, and (through
:func:`reference_session`) the reference for whole ONNX models: ONNX's own reference evaluator runs
the graph with every converted Conv replaced by :func:`dsconv2d`.
"""

from __future__ import annotations

import numpy as np

from ..errors import NumericsError
from .bfp import bfp_quantize, block_scales
from .geometry import ConvGeometry, windows
from .layer import ACTIVATIONS


def dsconv2d(x: np.ndarray, q: np.ndarray, xi: np.ndarray, block: int, mantissa: int,
             geom: ConvGeometry = ConvGeometry(), bias: np.ndarray | None = None,
             unsigned: bool = False) -> np.ndarray:
    """DSConv forward of an NCHW float input.

    ``q`` int (CO, CI, KH, KW) weights, ``xi`` float32 (CO, G, KH, KW) scales.  The input is
    BFP-quantized (:func:`dsconv_tvm.scheme.bfp.bfp_quantize`), then for every block g and tap (i, j)

        acc = sum_{c in g} Q[co, c, i, j] * M[n, c, p*s + i*d, q*s + j*d]        (exact, int32)
        Y  += (float32(acc) * xi[co, g, i, j]) * 2^(e[n, g, ...] - f)           (float32)

    then the bias is added.  Returns float32 (N, CO, OH, OW).
    """
    if not np.all(np.isfinite(xi)):
        raise NumericsError("KDS scales contain NaN/Inf")
    n, c, h, w = x.shape
    co, ci, kh, kw = q.shape
    if ci != c:
        raise NumericsError(f"input has {c} channels but the weight expects {ci}")
    g = xi.shape[1]
    m, e = bfp_quantize(x, block, mantissa, unsigned)
    s = block_scales(e, mantissa, unsigned)
    pt, pl, pb, pr = geom.padding
    m = np.pad(m, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    s = np.pad(s, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh, ow = geom.out_size(h, w, kh, kw)
    qp = np.zeros((co, g * block, kh, kw), np.int64)
    qp[:, :ci] = q
    y = np.zeros((n, co, oh, ow), np.float32)
    for i in range(kh):
        for j in range(kw):
            mw = windows(m, geom, oh, ow, i, j).astype(np.int64)   # N, G*B, OH, OW
            sw = windows(s, geom, oh, ow, i, j)                     # N, G, OH, OW
            mb = mw.reshape(n, g, block, oh, ow)
            wb = qp[:, :, i, j].reshape(co, g, block)
            acc = np.einsum("ngbpq,ogb->nogpq", mb, wb, optimize=True)      # exact integers
            assert np.abs(acc).max(initial=0) < 2 ** 31
            term = (acc.astype(np.float32) * xi[None, :, :, i, j, None, None].astype(np.float32))
            term = (term * sw[:, None]).astype(np.float32)
            y += term.sum(axis=2, dtype=np.float32)
    if bias is not None:
        y += bias.astype(np.float32)[None, :, None, None]
    return y


def activate(y: np.ndarray, activation: str) -> np.ndarray:
    """``y`` after a layer's activation (:data:`dsconv_tvm.scheme.layer.ACTIVATIONS`: a clamp)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {activation!r}")
    if activation == "none":
        return y
    return np.clip(y, *ACTIVATIONS[activation]).astype(y.dtype, copy=False)


def reference_model(loaded, report, mantissa: int, block: int):
    """A callable running the whole (BN-folded) ONNX model in numpy with ``onnx.reference``, every
    converted Conv replaced by :func:`dsconv2d` with the same quantized weights as the compiled
    model.  ``report`` is the :class:`dsconv_tvm.rewrite.report.ConversionReport` of the compile;
    a grouped Conv converted as one layer per group (``<name>/g0``, ...) runs as those layers on
    their slices of the input channels, concatenated."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.ops.op_conv import Conv as _OnnxConv

    converted = {layer.name: layer for layer in report.converted}

    class Conv(_OnnxConv):  # noqa: D401  (overrides the standard op by name)
        op_domain = ""

        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
                 pads=None, strides=None):
            name = self.onnx_node.name
            layers = [converted[name]] if name in converted else \
                [converted.get(f"{name}/g{g}") for g in range(int(group or 1))]
            if None in layers:
                return super()._run(X, W, B, auto_pad=auto_pad, dilations=dilations, group=group,
                                    kernel_shape=kernel_shape, pads=pads, strides=strides)
            xs = np.split(X.astype(np.float32), len(layers), axis=1)
            bs = [None] * len(layers) if B is None else np.split(np.asarray(B, np.float32), len(layers))
            ys = [dsconv2d(x, la.quantized.q, la.quantized.xi, block, mantissa, la.geom, b, la.unsigned)
                  for la, x, b in zip(layers, xs, bs)]
            return (np.concatenate(ys, axis=1),)

    sess = ReferenceEvaluator(loaded.model, new_ops=[Conv])
    names = list(loaded.input_shapes)

    def run(*inputs: np.ndarray) -> np.ndarray:
        return sess.run(None, dict(zip(names, inputs)))[0]

    return run
