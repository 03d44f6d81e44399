"""BatchNormalization folded into the convs that feed it, exactly, before anything is quantized."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, NumericsError
from ..scheme.metrics import check_finite


def fold_batchnorm(w, bias, gamma, beta, mean, var, eps) -> tuple[np.ndarray, np.ndarray]:
    """Exact BN fold: ``a = gamma/sqrt(var+eps)``, ``w' = w*a[co]``, ``b' = (bias-mean)*a + beta``.

    ``bias=None`` means 0.  Computed in float64, returned as float32.
    """
    w64 = np.asarray(w, np.float64)
    if w64.ndim != 4:
        raise ConfigError(f"weight tensor must be 4-D (CO, CI, KH, KW), got shape {w64.shape}")
    co = w64.shape[0]
    vecs = []
    for name, v in (("bias", 0.0 if bias is None else bias), ("gamma", gamma), ("beta", beta),
                    ("mean", mean), ("var", var)):
        v = np.broadcast_to(np.asarray(v, np.float64), (co,)) if np.ndim(v) == 0 \
            else np.asarray(v, np.float64)
        if v.shape != (co,):
            raise ConfigError(f"batchnorm {name} has shape {v.shape}, expected ({co},)")
        check_finite(v, f"batchnorm {name}")
        vecs.append(v)
    b, gm, bt, mu, vr = vecs
    den = vr + float(eps)
    if (den <= 0).any():
        raise NumericsError(f"batchnorm var + eps must be > 0, got {den[den <= 0][0]!r}")
    a = gm / np.sqrt(den)
    return (w64 * a[:, None, None, None]).astype(np.float32), ((b - mu) * a + bt).astype(np.float32)


def fold_conv_batchnorm(model) -> list[str]:
    """Fold every BatchNormalization that is the only consumer of a Conv with constant weights
    into that Conv (exactly: W' = W * a, b' = (b - mean) * a + beta).  Edits ``model`` in place."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    folded, remove = [], []
    for node in list(graph.node):
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "BatchNormalization" or node.output[0] in outputs:
            continue
        bn = users[0]
        if len(bn.output) > 1 and any(bn.output[1:]):
            continue                                 # training-mode BN
        if not all(n in inits for n in bn.input[1:5]):
            continue
        if len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]) for n in bn.input[1:5])
        w = numpy_helper.to_array(inits[node.input[1]])
        b = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
        w2, b2 = fold_batchnorm(w, b, gamma, beta, mean, var, eps)
        wname, bname = f"{node.name or node.output[0]}_W_bnfolded", f"{node.name or node.output[0]}_B_bnfolded"
        graph.initializer.extend([numpy_helper.from_array(w2.astype(np.float32), wname),
                                  numpy_helper.from_array(b2.astype(np.float32), bname)])
        new_inputs = [node.input[0], wname, bname]
        del node.input[:]
        node.input.extend(new_inputs)
        node.output[0] = bn.output[0]
        remove.append(bn)
        folded.append(bn.name or bn.output[0])
    for bn in remove:
        graph.node.remove(bn)
    # drop initializers nobody reads any more (the unfolded weights, BN statistics)
    used = {name for n in graph.node for name in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return folded
