"""Value and size checks of an ONNX model, before TVM sees it: every constant finite and of a sane
magnitude (weights of the layers converted to DSConv and of those kept in fp32, BatchNorm
statistics), and every tensor's element count within int32 (what TVM's index arithmetic uses).
Each problem is one :class:`ModelError` naming the node and the tensor."""

from __future__ import annotations

import numpy as np

from ..errors import ModelError
from ..scheme.metrics import first_non_finite

#: larger magnitudes are not weights: their squares and sums overflow float32 in the kernels
MAX_ABS_VALUE = 1e30
INT32_MAX = 2**31 - 1

_BN_STATS = {1: "scale (gamma)", 2: "bias (beta)", 3: "mean", 4: "variance"}


def _constants(model):
    """(tensor name, TensorProto) of every initializer and Constant node value."""
    for init in model.graph.initializer:
        yield init.name, init
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    yield node.output[0], a.t


def check_values(model, path: str, stage: str = "") -> None:
    """Every float constant of ``model`` finite and below :data:`MAX_ABS_VALUE` in magnitude; the
    variance of each BatchNormalization >= 0.  ``stage`` says where in the loading this runs (e.g.
    "after folding BatchNorm")."""
    from onnx import numpy_helper

    users: dict[str, list] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            users.setdefault(name, []).append((node, i))
    when = f" ({stage})" if stage else ""
    for name, tensor in _constants(model):
        try:
            arr = numpy_helper.to_array(tensor)
        except Exception as exc:  # noqa: BLE001  (truncated raw data, ...)
            raise ModelError(f"{path}: tensor '{name}' cannot be read ({exc})") from None
        if arr.dtype.kind != "f" or arr.size == 0:
            continue
        a = arr.astype(np.float64, copy=False)
        found = first_non_finite(a)
        what = None
        if found is not None:
            idx, value, count = found
            what = f"contains {float(value)} at index {idx} ({count} non-finite values)"
        else:
            big = np.abs(a) > MAX_ABS_VALUE
            if big.any():
                idx = tuple(int(i) for i in np.argwhere(big)[0])
                what = f"contains {a[idx]:.3g} at index {idx} (|value| > {MAX_ABS_VALUE:g}: not a weight)"
        if what is None:
            for node, i in users.get(name, []):
                if node.op_type == "BatchNormalization" and i == 4 and (a < 0).any():
                    idx = tuple(int(j) for j in np.argwhere(a < 0)[0])
                    what = f"contains a negative variance {float(a[idx])} at index {idx}"
                    break
        if what is not None:
            raise ModelError(f"{path}: {_where(name, users)} {what}{when}; every weight and "
                             f"statistic must be a finite number")


def _where(name: str, users) -> str:
    uses = users.get(name, [])
    if not uses:
        return f"tensor '{name}'"
    node, i = uses[0]
    role = {"Conv": {1: "weight", 2: "bias"}, "ConvTranspose": {1: "weight", 2: "bias"},
            "Gemm": {1: "weight", 2: "bias"}, "MatMul": {1: "weight"},
            "BatchNormalization": _BN_STATS}.get(node.op_type, {}).get(i, f"input {i}")
    return f"node '{node.name or node.output[0]}' ({node.op_type}): {role} '{name}'"


def check_sizes(model, input_shapes: dict[str, list[int]], path: str) -> None:
    """Every graph input, constant and (by ONNX shape inference) every intermediate tensor has at
    most 2^31 - 1 elements."""
    import copy

    import onnx

    for name, shape in input_shapes.items():
        _check_count(path, f"input '{name}'", shape)
    for name, tensor in _constants(model):
        _check_count(path, f"tensor '{name}'", list(tensor.dims))
    try:
        m = copy.deepcopy(model)
        for inp in m.graph.input:
            if inp.name in input_shapes:
                for d, v in zip(inp.type.tensor_type.shape.dim, input_shapes[inp.name]):
                    d.ClearField("dim_param")
                    d.dim_value = v
        inferred = onnx.shape_inference.infer_shapes(m)
    except Exception:  # noqa: BLE001  (best effort: TVM's import reports shape errors itself)
        return
    producer = {o: n for n in inferred.graph.node for o in n.output}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        if dims and all(d is not None for d in dims):
            node = producer.get(v.name)
            what = (f"the output '{v.name}' of node '{node.name or node.output[0]}' ({node.op_type})"
                    if node is not None else f"tensor '{v.name}'")
            _check_count(path, what, dims)


def _check_count(path: str, what: str, shape) -> None:
    n = 1
    for d in shape:
        n *= int(d)
    if n > INT32_MAX:
        raise ModelError(f"{path}: {what} has shape {list(shape)}, {n} elements: more than 2^31 - 1 "
                         f"(the largest tensor TVM's 32-bit indices can address)")
