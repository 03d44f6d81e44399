"""The one local runner: load a compiled library (or a freshly built executable) into a Relax VM,
run ``main`` on numpy data in batches, and time it (medians)."""

from __future__ import annotations

import os
import statistics

import numpy as np

from ..errors import ModelError
from ..host import check_library


def vm_of(executable, dev=None):
    """A Relax VM for an executable (``tvm.compile`` result or loaded ``.so``) on ``dev``
    (default: the CPU)."""
    import tvm
    from tvm import relax

    return relax.VirtualMachine(executable, dev or tvm.cpu())


def call_main(vm, inputs: list[np.ndarray], dev=None, all_outputs: bool = False):
    """``main`` on numpy inputs: its first output (a tuple of outputs: the first), or the list of
    every output with ``all_outputs``."""
    import tvm

    dev = dev or tvm.cpu()
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs])
    outs = [out] if hasattr(out, "numpy") else list(out)
    return [o.numpy() for o in outs] if all_outputs else outs[0].numpy()


def run_executable(ex, inputs: list[np.ndarray], dev=None) -> np.ndarray:
    """Run ``main`` of a host executable (or a loaded .so) on numpy inputs (on ``dev``, default CPU)."""
    return call_main(vm_of(ex, dev), inputs, dev)


def load_library(path: str):
    """A Relax VM on the CPU for a host ``.so``, and its compiled input shape.  The file is checked
    first (a complete ELF shared library), so that a damaged one is an error, not a SIGBUS."""
    import tvm

    check_library(path)
    try:
        vm = vm_of(tvm.runtime.load_module(os.path.abspath(path)))
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


def run_batches(vm, batch: int, x: np.ndarray, pad: bool = False, progress=None, all_outputs: bool = False):
    """``main`` on every sample of ``x`` in calls of the compiled ``batch``.  The leading dimension must
    be a multiple of it unless ``pad`` (the last call is then zero-padded).  Returns the first output
    (or, with ``all_outputs``, the list of every output) for all samples."""
    if not pad and x.shape[0] % batch:
        raise ModelError(f"{len(x)} samples is not a multiple of the compiled batch {batch}")
    outs: list[list[np.ndarray]] = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        real = len(chunk)
        if real < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - real,) + chunk.shape[1:], chunk.dtype)])
        ys = call_main(vm, [np.ascontiguousarray(chunk, np.float32)], all_outputs=True)
        outs.append([y[:real] for y in ys])
        if progress is not None:
            progress.update(i + real)
    if not all_outputs:
        return np.concatenate([o[0] for o in outs])
    return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]


def predict(path: str, x: np.ndarray) -> np.ndarray:
    """Outputs of ``main`` for every sample of ``x`` (leading dim a multiple of the compiled batch)."""
    vm, shape = load_library(path)
    return run_batches(vm, shape[0], x)


def run_library(path: str, x: np.ndarray, progress=None, all_outputs: bool = False):
    """Run a host ``.so`` on every sample of ``x``; the last batch is zero-padded to the compiled batch.
    Returns the first output (or, with ``all_outputs``, the list of every output)."""
    vm, shape = load_library(path)
    return run_batches(vm, shape[0], x, pad=True, progress=progress, all_outputs=all_outputs)


def sample_inputs(loaded, seed: int = 0) -> list[np.ndarray]:
    """A deterministic sample input per graph input of a loaded model (uniform [0, 1): image-like)."""
    rng = np.random.default_rng(seed)
    return [rng.random(shape).astype(loaded.input_dtypes[name])
            for name, shape in loaded.input_shapes.items()]


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
