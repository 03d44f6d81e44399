"""Models and inputs for ``tools/benchmark.py``.

* ``light_*`` architectures from the ``onnx`` wheel (``onnx/backend/test/data/light/``): every weight
  there is the constant 0.02 (made at run time by ``ConstantOfShape`` nodes), which makes any
  quantizer degenerate.  :func:`refill_model` turns every such constant into an initializer of the
  same shape filled with seeded random values: He-normal conv / Gemm weights (std sqrt(2/fan_in)),
  small biases, BN scale ~ U(0.5, 1.5), BN shift ~ N(0, 0.1); then, on 8 calibration images, layer
  by layer in graph order with ONNX Runtime, BN running mean / variance are set to the statistics the
  layer's input really has (every BN normalizes as a trained one would), and in models without BN
  each Conv / Gemm is rescaled to unit output RMS (also the last Gemm of BN models: unsaturated
  softmax).  The model is
  then converted to opset 13 (per-channel QDQ needs it; the TVM frontend accepts it).
* MobileNetV2 with real ImageNet weights from ``tools/imagenet_models.py`` when that module exists.
* The Fashion-MNIST example models of ``models/`` (inputs: the first Fashion-MNIST test images).

Prepared files are cached under ``~/.cache/dsconv-tvm/bench/`` (``runtime.cache_root()``).
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

LIGHT = {  # benchmark name -> file in the onnx wheel
    "resnet50": "light_resnet50.onnx",
    "vgg19": "light_vgg19.onnx",
    "googlenet": "light_inception_v1.onnx",
    "densenet121": "light_densenet121.onnx",
    "alexnet": "light_bvlc_alexnet.onnx",
    # architectures no schedule was tuned or shipped for, and no default tile was measured on
    # (the "unseen model" check of the benchmark)
    "inception_v2": "light_inception_v2.onnx",
    "squeezenet": "light_squeezenet.onnx",
    "zfnet512": "light_zfnet512.onnx",
    "shufflenet": "light_shufflenet.onnx",
}
EXAMPLES = ("resnet20", "vgg_small", "mobilenet_small")
IMAGENET = ("mobilenet_v2",)
ALL_MODELS = (*LIGHT, *IMAGENET, *EXAMPLES)
OPSET = 13
REFILL_VERSION = 2          # bump when refill_model changes: invalidates the cache


@dataclass
class BenchModel:
    name: str
    path: str                 # fp32 ONNX model
    images: np.ndarray        # (N, C, H, W) float32: calibration images = benchmark inputs
    source: str               # what the weights are


def subplot_grid(n: int, width: float, height: float):
    """A headless (Agg) figure of n panels, at most three a row, each width x height inches: (fig, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows_n = -(-n // cols)
    return plt.subplots(rows_n, cols, figsize=(width * cols, height * rows_n), squeeze=False)


def bench_cache() -> str:
    from dsconv_tvm.deploy.runtime import cache_root

    path = os.path.join(str(cache_root()), "bench")
    os.makedirs(path, exist_ok=True)
    return path


def light_dir() -> str:
    import onnx

    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def synthetic_images(n: int, shape=(3, 224, 224), seed: int = 0) -> np.ndarray:
    """Seeded image-like inputs: smooth random colour fields plus noise in [0, 1], normalized with
    the ImageNet mean / std (what the light_* models and torchvision models expect)."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    low = rng.random((n, c, 8, 8)).astype(np.float32)
    up = np.repeat(np.repeat(low, -(-h // 8), axis=2), -(-w // 8), axis=3)[:, :, :h, :w]
    img = np.clip(0.8 * up + 0.2 * rng.random((n, c, h, w)), 0, 1).astype(np.float32)
    if c == 3:
        mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
        std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
        img = (img - mean) / std
    return np.ascontiguousarray(img, np.float32)


# ------------------------------------------------------------------------------------------------
# re-filling the light_* models
# ------------------------------------------------------------------------------------------------
def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            out.setdefault(name, []).append((node, i))
    return out


def constants_to_initializers(model) -> None:
    """Replace every ``ConstantOfShape`` whose shape is an initializer by an initializer holding the
    same values; drop the shape tensors and initializers listed as graph inputs (IR v3 style)."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new, remove = [], []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            continue
        shape = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
        value = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"),
                     np.zeros(1, np.float32))
        new.append(numpy_helper.from_array(np.full(tuple(shape), value.reshape(-1)[0], value.dtype),
                                           node.output[0]))
        remove.append(node)
    for node in remove:
        graph.node.remove(node)
    graph.initializer.extend(new)
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    names = {i.name for i in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in names and i.name in used]
    del graph.input[:]
    graph.input.extend(real_inputs)
    model.ir_version = max(model.ir_version, 7)     # IR >= 4: initializers need not be inputs


def _role(name: str, consumers: dict) -> tuple[str, int]:
    """(op type, input index) of the op that reads the initializer (through Unsqueeze / Reshape)."""
    seen = 0
    while seen < 4:
        users = consumers.get(name, [])
        if not users:
            return "", -1
        node, idx = users[0]
        if node.op_type in ("Unsqueeze", "Reshape", "Squeeze") and idx == 0:
            name, seen = node.output[0], seen + 1
            continue
        return node.op_type, idx
    return "", -1


def _random_value(shape, role, rng, node_attrs) -> np.ndarray | None:
    op, idx = role
    shape = tuple(int(d) for d in shape)
    size = int(np.prod(shape)) if shape else 1
    if op == "Conv" and idx == 1:
        fan_in = int(np.prod(shape[1:]))
        return rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))
    if op == "Gemm" and idx == 1:
        fan_in = shape[1] if node_attrs.get("transB", 0) else shape[0]
        return rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))
    if op in ("Conv", "Gemm") and idx == 2:
        return 0.05 * rng.standard_normal(shape)
    if op == "BatchNormalization":
        return {1: lambda: rng.uniform(0.5, 1.5, shape), 2: lambda: 0.1 * rng.standard_normal(shape),
                3: lambda: np.zeros(shape), 4: lambda: np.ones(shape)}[idx]()
    if op == "Mul" and size > 1:          # per-channel scale layers (Caffe2 "Scale" after BN)
        return rng.uniform(0.8, 1.2, shape)
    if op == "Add" and size > 1:
        return 0.1 * rng.standard_normal(shape)
    return None


def refill_model(model, seed: int = 0, calib: np.ndarray | None = None):
    """The model with seeded random weights of the same shapes (see the module docstring); BN
    statistics from ``calib`` images when given.  Returns a new ModelProto."""
    import copy

    import onnx
    from onnx import helper, numpy_helper

    model = copy.deepcopy(model)
    constants_to_initializers(model)
    graph = model.graph
    consumers = _consumers(graph)
    rng = np.random.default_rng(seed)
    by_name = {i.name: i for i in graph.initializer}
    for init in sorted(graph.initializer, key=lambda i: i.name):   # order-independent seeding
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind != "f":
            continue
        role = _role(init.name, consumers)
        users = consumers.get(init.name, [])
        attrs = {a.name: helper.get_attribute_value(a) for a in users[0][0].attribute} if users else {}
        val = _random_value(arr.shape, role, rng, attrs)
        if val is not None:
            by_name[init.name].CopyFrom(numpy_helper.from_array(val.astype(arr.dtype), init.name))
    model = onnx.version_converter.convert_version(model, OPSET)
    if calib is not None:
        calibrate(model, calib)
    onnx.checker.check_model(model)
    return model


def ort_session(model, threads: int = 2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _probe(model, tensor: str, images: np.ndarray) -> np.ndarray:
    """The values of ``tensor`` on every image (ORT, batch 1)."""
    import onnx

    inits = {i.name for i in model.graph.initializer}
    input_name = next(i.name for i in model.graph.input if i.name not in inits)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend([onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)])
    sess = ort_session(probe)
    return np.concatenate([sess.run(None, {input_name: images[i:i + 1]})[0] for i in range(len(images))])


def calibrate(model, images: np.ndarray, eps_floor: float = 1e-3) -> None:
    """Make the random network behave like a trained one on ``images`` (in place, in graph order,
    each step seeing the earlier ones): every BatchNormalization's running mean / variance become the
    per-channel mean / variance of its input; in a model without BN every Conv / Gemm, and in a model
    with BN the last Gemm, is rescaled (weight and bias) so that its output has unit RMS -- otherwise
    activations (and logits) drift by orders of magnitude over tens of layers and the softmax saturates."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    has_bn = any(n.op_type == "BatchNormalization" for n in graph.node)
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            x = _probe(model, node.input[0], images)
            axes = (0, *range(2, x.ndim))
            for idx, val in ((3, x.mean(axis=axes)), (4, x.var(axis=axes) + eps_floor)):
                name = node.input[idx]
                inits[name].CopyFrom(numpy_helper.from_array(val.astype(np.float32), name))
        elif node.op_type in ("Conv", "Gemm") and (not has_bn or (gemms and node is gemms[-1])):
            y = _probe(model, node.output[0], images)
            rms = float(np.sqrt(np.mean(y.astype(np.float64) ** 2)))
            if rms <= 0 or not np.isfinite(rms):
                continue
            for name in node.input[1:3]:
                if name in inits:
                    arr = numpy_helper.to_array(inits[name])
                    inits[name].CopyFrom(numpy_helper.from_array((arr / rms).astype(arr.dtype), name))


# ------------------------------------------------------------------------------------------------
# ORT int8
# ------------------------------------------------------------------------------------------------
def quantize_int8(fp32_path: str, out_path: str, images: np.ndarray) -> str:
    """ONNX Runtime static int8 quantization: QDQ format, per-channel weights (s8), u8 activations
    calibrated (min-max) on ``images``.  Written atomically; returns ``out_path``."""
    import tempfile

    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(fp32_path)
    inits = {i.name for i in model.graph.initializer}
    name = next(i.name for i in model.graph.input if i.name not in inits)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: images[i:i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(fp32_path, pre, skip_symbolic_shape=True)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        tmp_out = out_path + ".tmp.onnx"
        quantize_static(pre, tmp_out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        os.replace(tmp_out, out_path)
    return out_path


def initializer_bytes(path: str) -> int:
    """Bytes of every initializer of an ONNX model (what the deployed model stores as weights)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    return int(sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer))


# ------------------------------------------------------------------------------------------------
# the benchmark's model list
# ------------------------------------------------------------------------------------------------
def _save(model, path: str) -> None:
    import onnx

    tmp = path + ".tmp"
    onnx.save(model, tmp)
    os.replace(tmp, path)


def prepare_light(name: str, n_images: int, seed: int = 0, log=print) -> BenchModel:
    import onnx

    images = synthetic_images(n_images, seed=seed)
    path = os.path.join(bench_cache(), f"{name}_refill_s{seed}_v{REFILL_VERSION}.onnx")
    if not os.path.exists(path):
        log(f"{name}: re-filling {LIGHT[name]} with seeded random weights (calibrated on 8 images), "
            f"opset {OPSET}")
        src = onnx.load(os.path.join(light_dir(), LIGHT[name]))
        # BN statistics always from the same 8 images, so the model does not depend on --images
        _save(refill_model(src, seed, synthetic_images(8, seed=seed + 1000)), path)
    return BenchModel(name, path, images, f"{LIGHT[name]} architecture, seeded He-normal weights")


def prepare_imagenet(name: str, n_images: int, seed: int = 0, log=print) -> BenchModel | None:
    try:
        sys.path.insert(0, os.path.join(REPO, "tools"))
        import imagenet_models  # noqa: F401  (written by another issue; optional)
    except ImportError:
        log(f"{name}: skipped (tools/imagenet_models.py is not in this checkout)")
        return None
    try:
        path = str(imagenet_models.ensure_model(name))
    except Exception as exc:  # noqa: BLE001  (missing weight package, ...: skip with the reason)
        log(f"{name}: skipped ({type(exc).__name__}: {exc})")
        return None
    images = None
    getter = getattr(imagenet_models, "calibration_images", None)
    if getter is not None:
        try:
            images = np.asarray(getter(n_images), np.float32)
        except Exception:  # noqa: BLE001
            images = None
    if images is None or len(images) < n_images:
        images = synthetic_images(n_images, seed=seed)
    return BenchModel(name, path, np.ascontiguousarray(images[:n_images]), "real ImageNet weights")


def prepare_example(name: str, n_images: int) -> BenchModel:
    from dsconv_tvm.accuracy.datasets import load_fashion_mnist

    path = os.path.join(REPO, "models", f"{name}.onnx")
    try:
        x, _ = load_fashion_mnist("test")
        images = x[:n_images]
        what = "Fashion-MNIST test images"
    except Exception:  # noqa: BLE001  (dataset not installed: image-like noise)
        images = np.random.default_rng(0).random((n_images, 1, 28, 28)).astype(np.float32)
        what = "random images (Fashion-MNIST not installed)"
    return BenchModel(name, path, np.ascontiguousarray(images), f"trained on Fashion-MNIST; inputs: {what}")


def prepare(name: str, n_images: int, seed: int = 0, log=print) -> BenchModel | None:
    if name in LIGHT:
        return prepare_light(name, n_images, seed, log)
    if name in IMAGENET:
        return prepare_imagenet(name, n_images, seed, log)
    if name in EXAMPLES:
        return prepare_example(name, n_images)
    if os.path.isfile(name):
        loaded = _input_shape(name)
        return BenchModel(os.path.splitext(os.path.basename(name))[0], name,
                          synthetic_images(n_images, tuple(loaded[1:]), seed), "user model")
    raise SystemExit(f"unknown model {name!r}; known: {', '.join(ALL_MODELS)} (or an .onnx path)")


def _input_shape(path: str) -> list[int]:
    from dsconv_tvm.frontend.onnx import load_onnx

    loaded = load_onnx(path)
    return list(next(iter(loaded.input_shapes.values())))


def example_paths() -> list[str]:
    return sorted(glob.glob(os.path.join(REPO, "models", "*.onnx")))
