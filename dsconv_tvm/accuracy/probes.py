"""The fp32 teacher, run by ONNX Runtime (the independent reference): outputs of a model, and probe
copies of it whose graph outputs include every conv's output."""

from __future__ import annotations

import os

import numpy as np

from ..errors import DSConvError


def _ort():
    """onnxruntime, or one clear error naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError as exc:

        raise DSConvError("this command runs the fp32 model with ONNX Runtime: pip install onnxruntime") from exc
    return onnxruntime


def require_onnxruntime() -> None:
    """One clear error now (before any compile) if ONNX Runtime, the fp32 teacher, is missing."""
    _ort()


def probe_model(model, conv_names: list[str]):
    """A copy of the ONNX ``model`` whose graph outputs are the logits followed by the output of every
    Conv in ``conv_names`` (in that order)."""
    import copy

    import onnx

    m = copy.deepcopy(model)
    by_name = {n.name: n for n in m.graph.node}
    infos = {v.name: v for v in onnx.shape_inference.infer_shapes(m).graph.value_info}
    for name in conv_names:
        out = by_name[name].output[0]
        if out in infos:
            m.graph.output.append(copy.deepcopy(infos[out]))
        else:   # rank-4 float, dimensions unknown
            m.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT,
                                                                     ["n", "c", "h", "w"]))
    return m


def ort_session(model):
    """An ONNX Runtime CPU session of a model (a path or serialized bytes), on all cores."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def ort_outputs(model, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    """Every output of an ONNX model (a path or serialized bytes) on ``x``, in batches, with ONNX
    Runtime on all cores."""
    sess = ort_session(model)
    name = sess.get_inputs()[0].name
    parts = [sess.run(None, {name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def onnx_predict(model_path: str, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """fp32 outputs of the ONNX model with ONNX Runtime (the first output)."""
    return ort_outputs(model_path, x, batch)[0]
