"""ONNX in: load and check a model, fold BatchNorm into its convs, fix input shapes, import to Relax.

Everything the user can get wrong about the model is reported here as one :class:`ModelError`
sentence naming the file, the node or the input, before TVM sees the model.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass

from ..errors import ModelError
from .batchnorm import fold_conv_batchnorm
from .checks import check_sizes, check_values
from .power import power_to_sqrt


@dataclass
class LoadedModel:
    path: str
    model: object                        # the (BN-folded) onnx.ModelProto
    input_shapes: dict[str, list[int]]   # every graph input, static
    input_dtypes: dict[str, str]
    conv_names: list[str]                # Conv node names in graph order
    folded_bn: list[str]                 # names of BatchNormalization nodes folded into convs


def parse_input_shapes(text: str | None) -> dict[str, list[int]]:
    """Parse ``"input:[1,1,28,28] other:[1,3]"`` (tvmc's syntax) into a dict."""
    if not text:
        return {}
    out = {}
    for m in re.finditer(r"\s*([^:\s,]+)\s*:\s*\[([^\]]*)\]\s*,?", text):
        name, dims = m.group(1), m.group(2)
        try:
            out[name] = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError as exc:
            raise ModelError(f"--input-shapes: cannot read the dimensions of {name!r}: [{dims}]") from exc
    rest = re.sub(r"\s*([^:\s,]+)\s*:\s*\[([^\]]*)\]\s*,?", "", text).strip()
    if rest or not out:
        raise ModelError(f"--input-shapes {text!r} is not of the form 'name:[d0,d1,...] name2:[...]'")
    for name, dims in out.items():
        if any(d <= 0 for d in dims):
            raise ModelError(f"--input-shapes: dimensions of {name!r} must be positive, got {dims}")
    return out


def _supported_ops() -> set[str]:
    from tvm.relax.frontend.onnx import onnx_frontend

    return set(onnx_frontend._get_convert_map().keys())


def load_onnx(path: str, input_shapes: dict[str, list[int]] | None = None, batch: int = 1) -> LoadedModel:
    """Load, check and prepare an ONNX model.  Symbolic input dimensions default to ``batch``
    for the first axis; other symbolic dimensions must be given in ``input_shapes``."""
    import onnx

    if not os.path.exists(path):
        raise ModelError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelError(f"{path}: is a directory, not an ONNX model")
    try:
        model = onnx.load(path, load_external_data=True)
    except Exception as exc:  # DecodeError, OSError, ... from protobuf
        raise ModelError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})".strip()) from exc
    if not model.graph.node and not model.graph.input:
        raise ModelError(f"{path}: not an ONNX model (no graph nodes or inputs)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"{path}: invalid ONNX model: {str(exc).splitlines()[0]}") from exc

    supported = _supported_ops()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise ModelError(f"{path}: unsupported operator '{node.domain}.{node.op_type}' "
                             f"(node '{node.name or node.output[0]}')")
        if node.op_type not in supported:
            raise ModelError(f"{path}: unsupported operator '{node.op_type}' "
                             f"(node '{node.name or node.output[0]}')")

    model = copy.deepcopy(model)
    check_values(model, path)                # NaN/Inf anywhere: one error naming the node
    sum_to_add(model)
    folded = fold_conv_batchnorm(model)
    _name_nodes(model)
    if folded:                               # a fold can overflow (huge gamma, tiny variance)
        check_values(model, path, "after folding BatchNorm into the convs")

    inits = {i.name for i in model.graph.initializer}
    shapes, dtypes = {}, {}
    given = dict(input_shapes or {})
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    known = [i.name for i in graph_inputs]
    for name in given:
        if name not in known:
            raise ModelError(f"{path}: --input-shapes names input {name!r}, but the model's inputs are "
                             f"{', '.join(known)}")
    for inp in graph_inputs:
        tt = inp.type.tensor_type
        dtypes[inp.name] = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        dims = [(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")) for d in tt.shape.dim]
        if inp.name in given:
            want = given[inp.name]
            if len(want) != len(dims):
                raise ModelError(f"{path}: input {inp.name!r} has rank {len(dims)} {dims}, but "
                                 f"--input-shapes gives rank {len(want)} {want}")
            for axis, (d, w) in enumerate(zip(dims, want)):
                if isinstance(d, int) and d > 0 and d != w:
                    raise ModelError(f"{path}: input {inp.name!r} has shape {dims}; --input-shapes "
                                     f"{want} does not fit (axis {axis}: {w} != {d})")
            shapes[inp.name] = list(want)
        else:
            fixed = []
            for axis, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    fixed.append(d)
                elif axis == 0:
                    fixed.append(batch)
                else:
                    raise ModelError(f"{path}: input {inp.name!r} has a symbolic dimension {d!r} at axis "
                                     f"{axis}; give it with --input-shapes \"{inp.name}:[...]\"")
            shapes[inp.name] = fixed
    check_sizes(model, shapes, path)
    conv_names = [n.name for n in model.graph.node if n.op_type == "Conv"]
    return LoadedModel(path, model, shapes, dtypes, conv_names, folded)


def _name_nodes(model) -> None:
    """Give unnamed nodes stable names (op type + index) so layers can be referred to."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def sum_to_add(model) -> int:
    """Rewrite every two-input ``Sum`` (old exporters' residual add) into ``Add``, the op the DSConv
    pass fuses into a conv's epilogue; returns how many.  Same math (elementwise, broadcasting)."""
    count = 0
    for node in model.graph.node:
        if node.op_type == "Sum" and len(node.input) == 2:
            node.op_type = "Add"
            count += 1
    return count


def to_relax(loaded: LoadedModel):
    """Import the prepared ONNX model into a Relax IRModule with constant weights, BN decomposed
    and constants folded (the form ``DSConvRewrite`` expects)."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    try:
        mod = from_onnx(loaded.model, shape_dict=loaded.input_shapes, dtype_dict=loaded.input_dtypes)
        # FoldConstant legalizes ops: shape errors (e.g. an input too small for a conv) surface here
        mod = relax.transform.DecomposeOpsForInference()(mod)
        mod = relax.transform.FoldConstant()(mod)
        mod, _ = power_to_sqrt(mod)            # LRN's x^0.75: vector square roots, not powf
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        empty = _first_empty_output(loaded)
        where = (f" (node '{empty[0]}' would output shape {empty[1]})" if empty else "")
        raise ModelError(f"{loaded.path}: TVM cannot import the model with input shapes "
                         f"{loaded.input_shapes}{where}: {msg[-1] if msg else type(exc).__name__}") from exc
    return mod


def _first_empty_output(loaded: LoadedModel):
    """(node name, shape) of the first node ONNX shape inference gives a dimension <= 0, or None."""
    try:
        import onnx

        model = copy.deepcopy(loaded.model)
        for inp in model.graph.input:
            if inp.name in loaded.input_shapes:
                dims = inp.type.tensor_type.shape.dim
                for d, v in zip(dims, loaded.input_shapes[inp.name]):
                    d.dim_value = v
        inferred = onnx.shape_inference.infer_shapes(model)
        shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None
                           for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
        for node in inferred.graph.node:
            for out in node.output:
                shape = shapes.get(out)
                if shape and any(d is not None and d <= 0 for d in shape):
                    return node.name or out, shape
    except Exception:  # noqa: BLE001  (best effort: only used to improve a message)
        pass
    return None
