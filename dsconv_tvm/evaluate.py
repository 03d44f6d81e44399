"""Running compiled libraries on data sets: predictions, top-1, and latency (medians)."""

from __future__ import annotations

import os
import statistics

import numpy as np

from .errors import ModelError


def load_library(path: str):
    """A Relax VM on the CPU for a host ``.so``, and its compiled input shape."""
    import tvm
    from tvm import relax

    try:
        ex = tvm.runtime.load_module(os.path.abspath(path))
        vm = relax.VirtualMachine(ex, tvm.cpu())
    except Exception as exc:  # noqa: BLE001  (TVM's loader errors)
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise ModelError(f"{path}: cannot be loaded as a TVM Relax library "
                         f"({lines[-1] if lines else type(exc).__name__})") from exc
    try:
        shapes = vm["dsconv_input_shapes"]()
        shape = [int(d) for d in shapes[0]]
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path}: has no dsconv_input_shapes function (not built by dsconv-tvm)") from exc
    return vm, shape


def predict(path: str, x: np.ndarray) -> np.ndarray:
    """Outputs of ``main`` for every sample of ``x`` (leading dim a multiple of the compiled batch)."""
    import tvm

    vm, shape = load_library(path)
    batch = shape[0]
    if x.shape[0] % batch:
        raise ModelError(f"{len(x)} samples is not a multiple of the compiled batch {batch}")
    outs = [vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x[i:i + batch], np.float32))).numpy()
            for i in range(0, len(x), batch)]
    return np.concatenate(outs, axis=0)


def onnx_predict(model_path: str, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """fp32 outputs of the ONNX model with ONNX Runtime (the independent reference)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def bench_input(shape, seed: int = 0) -> np.ndarray:
    """The (image-like, uniform [0, 1)) input the latency measurements use."""
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def time_main(vm, x: np.ndarray, repeat: int, number: int) -> tuple[np.ndarray, list[float]]:
    """Run ``main`` on ``x`` once (warm-up; its output is returned), then TVM's time_evaluator:
    ``repeat`` measurements of ``number`` calls each, in milliseconds per call."""
    import tvm

    tx = tvm.runtime.tensor(x)
    y = vm["main"](tx).numpy()
    vm.set_input("main", tx)
    res = vm.time_evaluator("invoke_stateful", tvm.cpu(), number=number, repeat=repeat)("main")
    return y, [t * 1e3 for t in res.results]


def latency_ms(path: str, repeat: int = 30, number: int = 5, seed: int = 0) -> dict:
    """Median / min / max milliseconds of one ``main`` call (see :func:`time_main`)."""
    vm, shape = load_library(path)
    _, times = time_main(vm, bench_input(shape, seed), repeat, number)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "repeat": repeat, "number": number}
