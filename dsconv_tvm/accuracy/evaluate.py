"""``dsconv-tvm eval``: the fp32 model (ONNX Runtime) against the compiled DSConv model (the real
integer kernels, a host ``.so`` built by :func:`dsconv_tvm.driver.compile.compile_model`) on a data set.

Reports top-1 / top-5 against labels where there are labels; always top-1 agreement (same argmax)
and "fp32 top-1 within DSConv top-5"; and per-layer output SQNR: a second library, compiled from the
same (BN-folded) model with every Conv output added as a graph output, is run on a subset of the
inputs and each conv's output is compared with the fp32 model's (ONNX Runtime) output of the same
conv.  That SQNR is *accumulated*: it includes the error of every earlier layer, as deployed.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from ..config import DSConvConfig, scheme_bits
from ..driver.compile import compile_model
from ..errors import ModelError
from ..execute.compare import topk_hits
from ..execute.runner import run_library
from ..frontend.onnx import load_onnx
from ..scheme.metrics import sqnr_db
from .datasets import check_samples
from .probes import onnx_predict, ort_outputs, probe_model


class Progress:
    """A one-line progress bar on a terminal (``\\r``), else a line every ~10 %; silent if ``stream`` is None."""

    def __init__(self, total: int, what: str, stream="stderr"):
        stream = sys.stderr if stream == "stderr" else stream     # the stream of the moment, not of import time
        self.total, self.what, self.stream = max(1, total), what, stream
        self.t0 = time.perf_counter()
        self.tty = bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())
        self.last_decile = -1

    def update(self, done: int) -> None:
        if self.stream is None:
            return
        frac = min(1.0, done / self.total)
        secs = time.perf_counter() - self.t0
        eta = secs / frac - secs if frac > 0 else float("nan")
        text = f"{self.what} {done}/{self.total} ({100 * frac:3.0f} %, {secs:.0f} s, eta {eta:.0f} s)"
        if self.tty:
            bar = "#" * int(30 * frac)
            self.stream.write(f"\r[{bar:<30}] {text}")
            if done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif int(10 * frac) > self.last_decile:
            self.last_decile = int(10 * frac)
            print(text, file=self.stream, flush=True)


@dataclass
class LayerSQNR:
    name: str
    converted: bool
    sqnr_db: float


@dataclass
class EvalResult:
    model: str
    data: str
    reference: str
    n: int
    config: DSConvConfig
    fp32_top1: float | None = None
    fp32_top5: float | None = None
    dsconv_top1: float | None = None
    dsconv_top5: float | None = None
    agreement: float = float("nan")
    fp32_in_top5: float = float("nan")
    confident_agreement: float = float("nan")   # agreement where fp32 softmax max >= 0.5
    confident_n: int = 0
    weight_bytes_fp32: int = 0
    weight_bytes_deployed: int = 0
    layers: list[LayerSQNR] = field(default_factory=list)
    sqnr_images: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = dict(vars(self))
        d["config"] = self.config.to_dict()
        d["layers"] = [vars(layer) for layer in self.layers]
        return d


def _softmax_max(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(axis=1, keepdims=True)).max(axis=1)


def layer_sqnr(model_path: str, config: DSConvConfig, x: np.ndarray, batch: int, workdir: str,
               log=None, reference: str | None = None) -> list[LayerSQNR]:
    """Accumulated per-conv output SQNR of the compiled DSConv model vs fp32 (see the module doc)."""
    import onnx

    loaded = load_onnx(model_path)
    names = loaded.conv_names
    probe = probe_model(loaded.model, names)
    probe_path = os.path.join(workdir, "probe.onnx")
    onnx.save(probe, probe_path)
    so = os.path.join(workdir, "probe.so")
    in_name = next(iter(loaded.input_shapes))
    shape = [batch] + list(loaded.input_shapes[in_name][1:])
    res = compile_model(probe_path, "x86", so, config, {in_name: shape}, check=False, log=log)
    converted = {layer.name for layer in res.report.converted}
    ours = run_library(so, x, all_outputs=True)
    if reference:   # the fp32 model's outputs of the same (by name) convs
        ref_loaded = load_onnx(reference)
        if ref_loaded.conv_names != names:
            raise ModelError(f"{reference}: its Conv nodes differ from {model_path}'s; cannot compare layers")
        ref = ort_outputs(probe_model(ref_loaded.model, names).SerializeToString(), x)
    else:
        ref = ort_outputs(probe.SerializeToString(), x)
    if len(ours) != len(names) + 1 or len(ref) != len(names) + 1:
        raise ModelError(f"{model_path}: the probe model has {len(ours)} outputs, expected {len(names) + 1}")
    return [LayerSQNR(n, n in converted or f"{n}/g0" in converted, sqnr_db(r, o))    # /g0: a grouped conv
            for n, r, o in zip(names, ref[1:], ours[1:])]


def evaluate(model_path: str, x: np.ndarray, labels: np.ndarray | None, config: DSConvConfig,
             data_name: str, batch: int = 50, sqnr_images: int = 32, log=None,
             progress_stream="stderr", library: str | None = None,
             reference: str | None = None) -> EvalResult:
    """fp32 (ONNX Runtime) vs the compiled DSConv model on ``x`` (labels optional).  ``reference``:
    the fp32 model to compare with (default ``model_path``; the original model for an adapted one)."""

    t0 = time.time()
    log = log or (lambda m: None)
    loaded = load_onnx(model_path)
    in_name, want = check_samples(model_path, loaded, x)
    batch = max(1, min(batch, len(x)))
    res = EvalResult(model_path, data_name, reference or model_path, len(x), config)
    with tempfile.TemporaryDirectory(prefix="dsconv-eval-") as tmp:
        so = library or os.path.join(tmp, "model.so")
        if library is None:
            log(f"compiling {model_path} (batch {batch}) ...")
            comp = compile_model(model_path, "x86", so, config, {in_name: [batch] + want}, check=False)
            res.weight_bytes_fp32 = sum(layer.fp32_bytes for layer in comp.report.layers)
            res.weight_bytes_deployed = sum(layer.deployed_bytes for layer in comp.report.layers)
        log(f"fp32 model (ONNX Runtime) on {len(x)} samples ...")
        ref = onnx_predict(reference or model_path, x)
        out = run_library(so, x, Progress(len(x), "DSConv", progress_stream))
        if sqnr_images > 0:
            log(f"per-layer SQNR on {min(sqnr_images, len(x))} samples (probe library) ...")
            xs = x[:sqnr_images]
            res.layers = layer_sqnr(model_path, config, xs, min(batch, len(xs)), tmp, reference=reference)
            res.sqnr_images = len(xs)
    ref2, out2 = ref.reshape(len(x), -1), out.reshape(len(x), -1)
    a_ref = np.argmax(ref2, axis=1)
    res.agreement = float(np.mean(a_ref == np.argmax(out2, axis=1)))
    res.fp32_in_top5 = float(np.mean(topk_hits(out2, a_ref, 5)))
    conf = _softmax_max(ref2) >= 0.5
    res.confident_n = int(conf.sum())
    if res.confident_n:
        res.confident_agreement = float(np.mean((a_ref == np.argmax(out2, axis=1))[conf]))
    if labels is not None:
        res.fp32_top1 = float(np.mean(topk_hits(ref2, labels, 1)))
        res.dsconv_top1 = float(np.mean(topk_hits(out2, labels, 1)))
        k = min(5, ref2.shape[1])
        res.fp32_top5 = float(np.mean(topk_hits(ref2, labels, k)))
        res.dsconv_top5 = float(np.mean(topk_hits(out2, labels, k)))
    res.seconds = time.time() - t0
    return res


def format_eval(res: EvalResult) -> str:
    c = res.config
    lines = [f"model     {res.model}",
             f"data      {res.data}: {res.n} samples",
             f"scheme    {scheme_bits(c)} B={c.block} m={c.mantissa} (fit {c.fit}, first layer {c.first_layer}, "
             f"depthwise {c.depthwise}); DSConv = the compiled x86 .so, fp32 = ONNX Runtime"
             + ("" if res.reference == res.model else f" on {res.reference}")]
    if res.weight_bytes_fp32:
        lines.append(f"weights   conv weights fp32 {res.weight_bytes_fp32} B -> deployed "
                     f"{res.weight_bytes_deployed} B ({res.weight_bytes_deployed / res.weight_bytes_fp32:.3f}x)")
    if res.fp32_top1 is not None:
        lines.append(f"top-1     fp32 {100 * res.fp32_top1:.2f} %  DSConv {100 * res.dsconv_top1:.2f} %  "
                     f"(loss {100 * (res.fp32_top1 - res.dsconv_top1):+.2f} pt)")
        lines.append(f"top-5     fp32 {100 * res.fp32_top5:.2f} %  DSConv {100 * res.dsconv_top5:.2f} %")
    lines.append(f"agreement top-1 {res.agreement:.4f}; fp32 top-1 within DSConv top-5 {res.fp32_in_top5:.4f}; "
                 f"where fp32 is confident (p >= 0.5, {res.confident_n} samples) {res.confident_agreement:.4f}")
    if res.layers:
        lines.append(f"per-layer output SQNR (accumulated, {res.sqnr_images} samples):")
        for layer in res.layers:
            lines.append(f"  {layer.name[:40]:<40} {'dsconv' if layer.converted else 'fp32':<7} "
                         f"{layer.sqnr_db:7.2f} dB")
    lines.append(f"time      {res.seconds:.1f} s")
    return "\n".join(lines)
