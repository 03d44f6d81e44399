"""Mixed precision: per-layer weight bits chosen by sensitivity under a byte budget.

1. **Candidates.**  Every converted layer can take ``bits`` in :data:`CANDIDATE_BITS`; its deployed
   bytes at ``b`` bits are computed with the packer itself (:func:`layer_bytes`), so the budget is
   checked on the bytes the ``.so`` will hold, in the target backend's own format (CPU: 2-bit weights
   four per byte, 3-bit ones nibbles like 4-bit ones, 5/6-bit ones bytes like 8-bit ones; CUDA: 2/3-bit
   ones nibbles too), so a width that costs as much as a wider one is never chosen.
2. **Sensitivity** ``s[layer, b]``: with calibration inputs, the relative error of the model output
   (ONNX Runtime on the BN-folded model) when only that layer's weights are quantized at ``b`` bits
   (``||y_b - y||^2 / ||y||^2`` summed over the samples); without data, the relative weight error
   ``||W - W_b||^2 / ||W||^2`` (the data-free fallback).
3. **Allocation**: minimise ``sum_layers s[layer, b_layer]`` subject to
   ``sum deployed bytes <= budget`` -- a multiple-choice knapsack, solved exactly by dynamic
   programming over the Pareto frontier of (bytes, error) partial solutions (no byte rounding).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import numpy as np

from ..backends.base import backend_for, deployed_bytes
from ..config import DSConvConfig
from ..driver.compile import build_relax, rewrite_dsconv
from ..errors import ConfigError, DataError, ModelError
from ..frontend.onnx import load_onnx
from ..scheme.metrics import sqnr_db
from ..scheme.weights import quantize_weight
from ..target import get_target
from .probes import ort_session

CANDIDATE_BITS = (2, 3, 4, 5, 6, 8)
SENSITIVITY_SAMPLES = 256          # calibration samples used for the sensitivity (the first ones)


@dataclass
class LayerChoice:
    """One converted layer: its weight, its fixed bytes-free facts, and per bits its cost and error."""

    name: str
    weight_shape: tuple[int, ...]
    block: int
    fp32_bytes: int
    bytes: dict[int, int] = field(default_factory=dict)         # bits -> deployed bytes
    sensitivity: dict[int, float] = field(default_factory=dict)  # bits -> relative output error
    weight_sqnr_db: dict[int, float] = field(default_factory=dict)


@dataclass
class Allocation:
    """The chosen bits per layer and what they cost."""

    layer_bits: dict[str, int]
    budget_bytes: int
    deployed_bytes: int            # converted layers at their bits + every kept conv at fp32
    fp32_bytes: int                # every conv weight (converted or kept) at fp32
    fixed_bytes: int               # the kept convs (fp32), which the allocation cannot change
    predicted_error: float         # sum of the chosen layers' sensitivities
    method: str                    # "output" (calibration data) or "weight" (data-free)
    samples: int
    layers: list[LayerChoice]

    @property
    def ratio(self) -> float:
        return self.deployed_bytes / self.fp32_bytes if self.fp32_bytes else float("nan")

    def to_dict(self) -> dict:
        return {"layer_bits": dict(self.layer_bits), "budget_bytes": self.budget_bytes,
                "deployed_bytes": self.deployed_bytes, "fp32_bytes": self.fp32_bytes,
                "fixed_bytes": self.fixed_bytes, "ratio": self.ratio,
                "predicted_error": self.predicted_error, "method": self.method, "samples": self.samples,
                "layers": [{"name": c.name, "weight_shape": list(c.weight_shape), "block": c.block,
                            "fp32_bytes": c.fp32_bytes, "bits": self.layer_bits.get(c.name),
                            "bytes": {str(b): v for b, v in c.bytes.items()},
                            "sensitivity": {str(b): v for b, v in c.sensitivity.items()},
                            "weight_sqnr_db": {str(b): v for b, v in c.weight_sqnr_db.items()}}
                           for c in self.layers]}


def allocate(costs: list[dict[int, int]], errors: list[dict[int, float]], budget: int) -> list[int] | None:
    """Exact multiple-choice knapsack: one option per layer (``costs[i][b]`` bytes, ``errors[i][b]``),
    minimising the total error with total bytes <= ``budget``.  Returns the chosen key per layer, or
    None when even the cheapest choice exceeds the budget.

    Dynamic programming over the Pareto frontier of partial solutions (bytes, error): a partial
    solution that costs more *and* errs more than another can never be part of the optimum, so
    only the frontier is kept (bytes are integers, compared exactly).  Ties in error go to fewer bytes.
    """
    if sum(min(c.values()) for c in costs) > budget:
        return None
    # remaining minimum cost after layer i, to prune partial solutions that cannot fit
    rest = [0] * (len(costs) + 1)
    for i in range(len(costs) - 1, -1, -1):
        rest[i] = rest[i + 1] + min(costs[i].values())
    frontier: list[tuple[int, float, tuple]] = [(0, 0.0, ())]
    for i, (cost, err) in enumerate(zip(costs, errors)):
        cand = [(b0 + cost[k], e0 + err[k], (*path, k)) for b0, e0, path in frontier for k in cost
                if b0 + cost[k] + rest[i + 1] <= budget]
        cand.sort(key=lambda t: (t[0], t[1]))
        frontier, best = [], math.inf
        for item in cand:
            if item[1] < best:           # strictly better error than every cheaper solution
                frontier.append(item)
                best = item[1]
    _, _, path = min(frontier, key=lambda t: (t[1], t[0]))
    return list(path)


def layer_bytes(backend, layer, weight_shape, bits: int) -> int:
    """Deployed bytes of one converted layer (its ``DSConvLayer``) at ``bits``: the packed weights and
    the scales, as the target's backend lays them out (the same call the rewrite makes)."""
    co, ci, kh, kw = weight_shape
    g = -(-ci // layer.block)
    lay = dataclasses.replace(layer, bits=bits, has_bias=False)
    return deployed_bytes(backend.layer_params(lay, np.zeros(weight_shape, np.int8),
                                               np.zeros((co, g, kh, kw), np.float32), None))


def _candidates(layers, backend, bits_options) -> list[LayerChoice]:
    out = []
    for rep in layers:
        c = LayerChoice(rep.name, tuple(rep.weight_shape), rep.layer.block, int(rep.fp32_bytes))
        for b in bits_options:
            c.bytes[b] = layer_bytes(backend, rep.layer, rep.weight_shape, b)
        out.append(c)
    return out


def _conv_weights(model) -> dict[str, str]:
    """Conv node name -> its weight initializer name."""
    return {n.name: n.input[1] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1}


def _weights_as_inputs(model, names: list[str]):
    """A copy of ``model`` whose initializers ``names`` are graph inputs (fed at run time)."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep, moved = [], []
    for t in m.graph.initializer:
        (moved if t.name in names else keep).append(t)
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    for t in moved:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def output_sensitivity(loaded, choices: list[LayerChoice], config, x: np.ndarray, log=None,
                       batch: int = 64) -> None:
    """Fill ``choice.sensitivity[b]``: relative error of the model's first output when only that
    layer's weights are quantized at ``b`` bits (ONNX Runtime, BN-folded model, calibration ``x``)."""
    from onnx import numpy_helper

    model = loaded.model
    wnames = _conv_weights(model)
    inits = {t.name: t for t in model.graph.initializer}
    names = [wnames[c.name] for c in choices]
    if len(set(names)) != len(names):
        raise ModelError("mixed precision: two converted convs share one weight tensor; give --bits N")
    weights = {n: numpy_helper.to_array(inits[n]).astype(np.float32) for n in names}
    sess = ort_session(_weights_as_inputs(model, names).SerializeToString())
    in_name = next(i.name for i in sess.get_inputs() if i.name not in weights)

    def run(feed_w):
        outs = []
        for i in range(0, len(x), batch):
            outs.append(sess.run(None, {in_name: x[i:i + batch], **feed_w})[0])
        return np.concatenate(outs).astype(np.float64)

    ref = run(weights)
    energy = float((ref ** 2).sum()) or 1.0
    for i, c in enumerate(choices):
        n = wnames[c.name]
        w = weights[n]
        for b in sorted(c.bytes):
            wq = quantize_weight(w, b, c.block, config.fit, config.scale_dtype).dequantize()
            c.weight_sqnr_db[b] = sqnr_db(w, wq)
            out = run({**weights, n: wq.astype(np.float32)})
            c.sensitivity[b] = float(((out - ref) ** 2).sum()) / energy
        if log:
            log(f"sensitivity {i + 1}/{len(choices)} {c.name}: " +
                " ".join(f"W{b} {_db(c.sensitivity[b]):.1f} dB"
                         for b in sorted(c.sensitivity)))


def weight_sensitivity(loaded, choices: list[LayerChoice], config) -> None:
    """Data-free fallback: ``sensitivity[b]`` = the layer's relative weight error at ``b`` bits."""
    from onnx import numpy_helper

    wnames = _conv_weights(loaded.model)
    inits = {t.name: t for t in loaded.model.graph.initializer}
    for c in choices:
        w = numpy_helper.to_array(inits[wnames[c.name]]).astype(np.float32)
        for b in sorted(c.bytes):
            wq = quantize_weight(w, b, c.block, config.fit, config.scale_dtype).dequantize()
            c.weight_sqnr_db[b] = sqnr_db(w, wq)
            c.sensitivity[b] = 10 ** (-c.weight_sqnr_db[b] / 10)


def _db(sensitivity: float) -> float:
    """A sensitivity (relative error energy) as an SQNR in dB, floored at 300 dB for plots and logs."""
    return 10 * math.log10(1 / max(sensitivity, 1e-30))


def choose_bits(model_path: str, config: DSConvConfig, weight_bytes: float,
                calibration: np.ndarray | None = None, target: str = "x86", input_shapes: dict | None = None,
                bits_options=CANDIDATE_BITS, log=None) -> Allocation:
    """Per-layer bits maximising accuracy (minimising the summed sensitivity) with the deployed conv
    weight bytes (as ``target``'s backend packs them) <= ``weight_bytes`` x their fp32 bytes.
    ``calibration``: unlabelled model inputs (the first :data:`SENSITIVITY_SAMPLES` are used); None =
    the data-free fallback.  Use the result as ``config.replace(layer_bits=allocation.layer_bits)``."""
    if isinstance(weight_bytes, bool) or not isinstance(weight_bytes, (int, float)) \
            or not 0 < weight_bytes <= 1:
        raise ConfigError(f"--weight-bytes {weight_bytes!r}: a fraction of the fp32 conv weight bytes in (0, 1]")
    bad = [b for b in bits_options if not 2 <= b <= 8]
    if bad or not bits_options:
        raise ConfigError(f"mixed precision: candidate bits {list(bits_options)} must be in 2..8")
    spec = get_target(target)
    loaded = load_onnx(model_path, input_shapes)
    fp32_mod, _ = build_relax(loaded, None)
    base = config.replace(layer_bits={})
    _, report = rewrite_dsconv(fp32_mod, loaded, base, spec)
    backend = backend_for(spec.tvm_target())
    convs = _conv_weights(loaded.model)
    free = [la for la in report.converted if la.name in convs]        # dense layers keep config.bits
    choices = _candidates(free, backend, sorted(set(bits_options)))
    chosen_names = {c.name for c in choices}
    fp32_total = sum(la.fp32_bytes for la in report.layers)
    fixed = sum(la.deployed_bytes for la in report.layers if la.name not in chosen_names)
    budget = int(math.floor(weight_bytes * fp32_total))
    if calibration is not None:
        x = np.ascontiguousarray(calibration[:SENSITIVITY_SAMPLES])
        output_sensitivity(loaded, choices, base, x, log)
        method, samples = "output", len(x)
    else:
        weight_sensitivity(loaded, choices, base)
        method, samples = "weight", 0
    path = allocate([c.bytes for c in choices], [c.sensitivity for c in choices], budget - fixed)
    if path is None:
        least = fixed + sum(min(c.bytes.values()) for c in choices)
        raise ConfigError(f"--weight-bytes {weight_bytes}: the budget ({budget} bytes) is below the smallest "
                          f"this model can deploy ({least} bytes = {least / fp32_total:.4f} of fp32, "
                          f"{fixed} bytes of them in layers kept in fp32); raise --weight-bytes")
    layer_bits = {c.name: int(b) for c, b in zip(choices, path)}
    deployed = fixed + sum(c.bytes[b] for c, b in zip(choices, path))
    return Allocation(layer_bits, budget, deployed, fp32_total, fixed,
                      float(sum(c.sensitivity[b] for c, b in zip(choices, path))), method, samples, choices)


def check_budget(report, allocation: Allocation) -> int:
    """The deployed conv weight bytes of a compiled model's report; raises if they exceed the budget
    the allocation was made for (they never should: the allocation counts the same packed bytes)."""
    deployed = sum(la.deployed_bytes for la in report.layers)
    if deployed > allocation.budget_bytes:
        raise RuntimeError(f"mixed precision: the compiled model deploys {deployed} conv weight bytes, over "
                           f"the budget of {allocation.budget_bytes} (internal error)")
    return deployed


def adapted_layer_bits(model_path: str) -> dict[str, int] | None:
    """The per-layer bits an ``adapt --bits auto`` model was adapted for (its metadata), else None."""
    import onnx

    try:
        model = onnx.load(model_path, load_external_data=False)
    except Exception:  # noqa: BLE001  (load_onnx reports unreadable models)
        return None
    for prop in model.metadata_props:
        if prop.key == "dsconv_tvm.adapted":
            bits = json.loads(prop.value).get("layer_bits")
            return {str(k): int(v) for k, v in bits.items()} if bits else None
    return None


def format_allocation(a: Allocation) -> str:
    """The sensitivity table: per layer the output SQNR (dB) at every bits, the chosen bits, bytes."""
    bits = sorted({b for c in a.layers for b in c.bytes})
    what = ("model-output SQNR (dB) with only this layer quantized" if a.method == "output"
            else "weight SQNR (dB) (data-free)")
    lines = [f"mixed precision: {what}; {a.samples} calibration samples" if a.samples else
             f"mixed precision: {what}",
             f"{'layer':32s} {'weights':>18s} " + " ".join(f"{'W' + str(b):>6s}" for b in bits) +
             f" {'chosen':>6s} {'bytes':>9s}"]
    for c in a.layers:
        db = [10 * math.log10(1 / c.sensitivity[b]) if c.sensitivity[b] > 0 else math.inf for b in bits]
        chosen = a.layer_bits[c.name]
        lines.append(f"{c.name[:32]:32s} {'x'.join(map(str, c.weight_shape)):>18s} " +
                     " ".join(f"{d:6.1f}" for d in db) + f" {'W' + str(chosen):>6s} {c.bytes[chosen]:9d}")
    lines.append(f"deployed conv weight bytes {a.deployed_bytes} <= budget {a.budget_bytes} "
                 f"({a.ratio:.4f} of fp32 {a.fp32_bytes}; {a.fixed_bytes} bytes of kept fp32 convs)")
    return "\n".join(lines)


def plot_allocation(a: Allocation, path: str) -> None:
    """PNG: per layer, the sensitivity (dB) at each bits (lines) and the chosen bits (markers)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise DataError("--sensitivity writes a PNG with matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = sorted({b for c in a.layers for b in c.bytes})
    xs = np.arange(len(a.layers))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(xs) + 2), 4.5))
    for b in bits:
        ax.plot(xs, [_db(c.sensitivity[b]) for c in a.layers], marker=".",
                label=f"W{b}")
    ax.scatter(xs, [_db(c.sensitivity[a.layer_bits[c.name]]) for c in a.layers],
               s=90, facecolors="none", edgecolors="k", label="chosen", zorder=5)
    for x, c in zip(xs, a.layers):
        b = a.layer_bits[c.name]
        ax.annotate(str(b), (x, _db(c.sensitivity[b])),
                    textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
    ax.set_xticks(xs)
    ax.set_xticklabels([c.name for c in a.layers], rotation=90, fontsize=6)
    ax.set_ylabel("model-output SQNR, only this layer quantized (dB)" if a.method == "output"
                  else "weight SQNR (dB)")
    ax.set_title(f"per-layer sensitivity and chosen bits: {a.deployed_bytes} B "
                 f"({a.ratio:.3f} of fp32) <= budget {a.budget_bytes} B", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=len(bits) + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
