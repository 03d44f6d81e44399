#!/usr/bin/env python3
"""Train three small CNNs on Fashion-MNIST (CPU) and export each to a single-file ONNX model (opset 18).

Models: ``resnet20`` (CIFAR-style ResNet-20), ``vgg_small`` (VGG with BN), ``mobilenet_small``
(MobileNet-v1-style depthwise-separable blocks), ``inception_small`` (GoogLeNet-style: concatenated
1x1 / 3x3 / 5x5 / pool branches, channel counts that are not multiples of 32) and ``dense_small``
(DenseNet-style concatenation of 3x3 and 5x5 conv-BN-ReLU layers, strided-conv downsampling, growth 12).
Every model except ``dense_small`` takes the raw [0, 1] image (input "input", shape (N, 1, 28, 28),
N dynamic) and normalizes it itself ((x - 0.2860) / 0.3530) before the first convolution;
``dense_small`` expects the *normalized* image as its input (the preprocessing is the user's job, as for
most models trained elsewhere).  The output is "logits" (N, 10).  BatchNormalization nodes are kept in
the ONNX files.

Usage::

    python tools/train_fashion_mnist.py [--models resnet20 vgg_small mobilenet_small]
                                        [--epochs-scale 1.0] [--out models]

Writes ``<out>/<name>.onnx`` and ``<out>/fashion_mnist_models.json`` (fp32 top-1 accuracy measured with
onnxruntime on the 10 000 test images, parameter count, file size, epochs, training time, versions).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from dsconv_tvm.accuracy.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist  # noqa: E402

MEAN, STD = 0.2860, 0.3530
SEED = 0
BATCH = 128
OPSET = 18


class Normalize(nn.Module):
    """(x - mean) / std with scalar constants, exported as ONNX Sub + Div."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - MEAN) / STD


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """ResNet basic block; option-B shortcut (1x1 conv + BN) when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.norm = Normalize()
        self.stem = conv_bn_relu(1, 16)
        layers: list[nn.Module] = []
        cin = 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                layers.append(BasicBlock(cin, width, stride if i == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(self.norm(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class VGGSmall(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.norm = Normalize()
        self.features = nn.Sequential(
            conv_bn_relu(1, 32), conv_bn_relu(32, 32), nn.MaxPool2d(2),      # 28 -> 14
            conv_bn_relu(32, 64), conv_bn_relu(64, 64), nn.MaxPool2d(2),     # 14 -> 7
            conv_bn_relu(64, 128), conv_bn_relu(128, 128), nn.MaxPool2d(2),  # 7 -> 3
        )
        self.fc = nn.Linear(128 * 3 * 3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(self.norm(x)), 1))


class MobileNetSmall(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.norm = Normalize()
        blocks: list[nn.Module] = [conv_bn_relu(1, 32)]
        cin = 32
        for cout, stride in ((64, 1), (64, 2), (128, 1), (128, 2), (128, 1)):
            blocks += [conv_bn_relu(cin, cin, 3, stride, groups=cin), conv_bn_relu(cin, cout, 1)]
            cin = cout
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.norm(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class InceptionBlock(nn.Module):
    """GoogLeNet inception module: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 max-pool -> 1x1, concatenated."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int) -> None:
        super().__init__()
        self.b1 = conv_bn_relu(cin, c1, 1)
        self.b3 = nn.Sequential(conv_bn_relu(cin, c3r, 1), conv_bn_relu(c3r, c3, 3))
        self.b5 = nn.Sequential(conv_bn_relu(cin, c5r, 1), conv_bn_relu(c5r, c5, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn_relu(cin, cp, 1))
        self.cout = c1 + c3 + c5 + cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class InceptionSmall(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.norm = Normalize()
        self.stem = nn.Sequential(conv_bn_relu(1, 24, 5), nn.MaxPool2d(2))      # 28 -> 14
        self.i1 = InceptionBlock(24, 20, 16, 28, 6, 12, 12)                     # 72 channels
        self.i2 = InceptionBlock(self.i1.cout, 24, 20, 36, 8, 16, 16)           # 92
        self.pool = nn.MaxPool2d(2)                                             # 14 -> 7
        self.i3 = InceptionBlock(self.i2.cout, 40, 24, 44, 12, 20, 16)          # 120
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.i3.cout, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.i2(self.i1(self.stem(self.norm(x))))
        x = self.i3(self.pool(x))
        return self.fc(torch.flatten(self.gap(x), 1))


class DenseStage(nn.Module):
    """DenseNet-style stage: each conv-BN-ReLU layer sees the concatenation of all earlier outputs."""

    def __init__(self, cin: int, growth: int, kernels: tuple[int, ...]) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for k in kernels:
            self.layers.append(conv_bn_relu(cin, growth, k))
            cin += growth
        self.cout = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


class DenseSmall(nn.Module):
    """Takes the normalized image ((x - 0.2860) / 0.3530): no Normalize module inside."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn_relu(1, 20, 3, stride=2)                           # 28 -> 14
        self.d1 = DenseStage(20, 12, (3, 5, 3))                                 # 56 channels
        self.t1 = conv_bn_relu(self.d1.cout, 44, 3, stride=2)                   # 14 -> 7
        self.d2 = DenseStage(44, 12, (3, 5, 3, 3))                              # 92
        self.t2 = conv_bn_relu(self.d2.cout, 100, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.t2(self.d2(self.t1(self.d1(self.stem(x)))))
        return self.fc(torch.flatten(self.gap(x), 1))


# name -> (constructor, epochs at --epochs-scale 1, peak learning rate)
MODELS: dict[str, tuple[Callable[[], nn.Module], int, float]] = {
    "resnet20": (ResNet20, 3, 3e-3),
    "vgg_small": (VGGSmall, 3, 2e-3),
    "mobilenet_small": (MobileNetSmall, 4, 3e-3),
    "inception_small": (InceptionSmall, 3, 3e-3),
    "dense_small": (DenseSmall, 3, 3e-3),
}
# models whose ONNX input is the normalized image (x - MEAN) / STD rather than x in [0, 1]
NORMALIZED_INPUT = {"dense_small"}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random crop with 2-pixel zero padding."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()  # one offset per batch: cheap on CPU
    return padded[:, :, dy:dy + 28, dx:dx + 28].contiguous()


def evaluate_torch(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            correct += int((model(torch.from_numpy(x[i:i + 1000])).argmax(1).numpy() == y[i:i + 1000]).sum())
    return correct / len(x)


def train(name: str, model: nn.Module, epochs: int, lr: float, xtr: np.ndarray, ytr: np.ndarray,
          xte: np.ndarray, yte: np.ndarray) -> float:
    """Train with AdamW + one-cycle (cosine) schedule; return the wall time in seconds."""
    gen = torch.Generator().manual_seed(SEED)
    steps_per_epoch = math.ceil(len(xtr) / BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        te = time.time()
        perm = torch.randperm(len(xt), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(xt), BATCH):
            idx = perm[i:i + BATCH]
            xb, yb = augment(xt[idx], gen), yt[idx]
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
        acc = evaluate_torch(model, xte, yte)
        print(f"[{name}] epoch {epoch + 1}/{epochs}: loss {total / n:.4f}  test acc (torch) {acc:.4f}  "
              f"{time.time() - te:.0f} s", flush=True)
    return time.time() - t0


def atomic_write_bytes(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _optimize_keep_batchnorm(model) -> None:
    """The exporter's default clean-up (constant folding, shape simplification, dead-code removal) minus
    the rules that fold BatchNormalization into Conv/Gemm: the compiler folds BN itself, exactly."""
    import onnx_ir.passes.common as common_passes
    import onnxscript.optimizer as ox_opt
    from onnxscript import rewriter
    from onnxscript.rewriter.rules import common as rules_common

    bn_rules = {id(rules_common.fuse_batchnorm_into_conv_rule), id(rules_common.fuse_batchnorm_into_gemm_rule),
                id(rules_common.fuse_batchnorm_into_conv_transpose_rule)}
    rules = [r for r in getattr(rewriter, "_DEFAULT_REWRITE_RULES", ()) if id(r) not in bn_rules]
    for _ in range(2):
        ox_opt.fold_constants(model)
        if rules:
            rewriter.RewritePass(rules)(model)
        ox_opt.remove_unused_nodes(model)
    for p in (common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
              common_passes.DeduplicateInitializersPass(), common_passes.CommonSubexpressionEliminationPass(),
              common_passes.RemoveUnusedNodesPass()):
        p(model)


def strip_export_metadata(proto) -> None:
    """Drop the exporter's per-node/-value metadata (stack traces with this machine's paths, FX names):
    the committed models hold the graph and the weights only."""
    graph = proto.graph
    for items in (graph.node, graph.initializer, graph.input, graph.output, graph.value_info):
        for item in items:
            del item.metadata_props[:]
            item.doc_string = ""
    del proto.metadata_props[:]
    proto.doc_string = ""


def export_onnx(model: nn.Module, path: str) -> None:
    """Export with the dynamo exporter (dynamic batch), keep BN nodes, write one self-contained ONNX file."""
    import onnx
    from onnxscript import ir

    model.eval()
    x = torch.rand(2, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (x,), dynamo=True, opset_version=OPSET, external_data=False,
                                optimize=False, input_names=["input"], output_names=["logits"],
                                dynamic_shapes={"x": {0: batch}}, verbose=False)
    _optimize_keep_batchnorm(program.model)
    proto = ir.serde.serialize_model(program.model)  # every initializer inline: one file
    strip_export_metadata(proto)
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise RuntimeError(f"{tensor.name} still has external data")
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_bn_onnx = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    if n_bn_onnx != n_bn:
        raise RuntimeError(f"expected {n_bn} BatchNormalization nodes in the ONNX graph, found {n_bn_onnx}")
    onnx.checker.check_model(proto, full_check=True)
    atomic_write_bytes(path, proto.SerializeToString())


def ort_check(model: nn.Module, path: str, xte: np.ndarray, yte: np.ndarray) -> tuple[float, float]:
    """Return (max |ORT - torch| on 256 test images, ORT top-1 accuracy on the whole test set)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(xte[:256])).numpy()
    diff = float(np.abs(sess.run(["logits"], {"input": xte[:256]})[0] - ref).max())
    single = sess.run(["logits"], {"input": xte[:1]})[0]  # batch 1 must work too
    assert single.shape == (1, 10), single.shape
    correct = 0
    for i in range(0, len(xte), 500):
        correct += int((sess.run(["logits"], {"input": xte[i:i + 500]})[0].argmax(1) == yte[i:i + 500]).sum())
    return diff, correct / len(xte)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every model's epoch count")
    ap.add_argument("--out", default="models", help="output directory")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # deterministic, and the build machines are shared
    os.makedirs(args.out, exist_ok=True)
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    json_path = os.path.join(args.out, "fashion_mnist_models.json")
    summary: dict = {}
    if os.path.exists(json_path):
        with open(json_path) as f:
            summary = json.load(f)
    summary.setdefault("dataset", {"name": "fashion-mnist", "classes": list(FASHION_MNIST_CLASSES),
                                   "test_images": int(len(xte))})
    summary["preprocessing"] = {"input": "float32 (N,1,28,28) in [0,1]",
                                "in_model": f"(x - {MEAN}) / {STD}"}
    summary.setdefault("models", {})

    for name in args.models:
        ctor, base_epochs, lr = MODELS[name]
        epochs = max(1, round(base_epochs * args.epochs_scale))
        torch.manual_seed(SEED)
        np.random.seed(SEED)
        model = ctor()
        params = sum(p.numel() for p in model.parameters())
        normalized = name in NORMALIZED_INPUT
        # a model that expects the normalized image is trained behind a Normalize (the augmentation pads
        # with raw zeros) and exported without it
        trained: nn.Module = nn.Sequential(Normalize(), model) if normalized else model
        print(f"[{name}] {params} parameters, {epochs} epochs, lr {lr}", flush=True)
        train_s = train(name, trained, epochs, lr, xtr, ytr, xte, yte)
        path = os.path.join(args.out, f"{name}.onnx")
        export_onnx(model, path)
        xte_in = ((xte - MEAN) / STD).astype(np.float32) if normalized else xte
        diff, acc = ort_check(model, path, xte_in, yte)
        print(f"[{name}] exported {path} ({os.path.getsize(path)} bytes); max |ort - torch| = {diff:.2e}; "
              f"ORT test top-1 = {acc:.4f}", flush=True)
        if diff > 1e-3:
            raise RuntimeError(f"{name}: onnxruntime differs from torch by {diff}")
        summary["models"][name] = {
            "file": f"{name}.onnx",
            "fp32_top1_ort": round(acc, 4),
            "max_abs_diff_ort_vs_torch": float(f"{diff:.3g}"),
            "params": int(params),
            "onnx_bytes": os.path.getsize(path),
            "opset": OPSET,
            "epochs": epochs,
            "train_seconds": round(train_s, 1),
            "batch_size": BATCH,
            "torch_version": torch.__version__,
            "seed": SEED,
            "input": (f"float32 (N,1,28,28), normalized: (x - {MEAN}) / {STD} with x in [0,1]" if normalized
                      else "float32 (N,1,28,28) in [0,1]"),
        }
        atomic_write_bytes(json_path, (json.dumps(summary, indent=2) + "\n").encode())
    print(json.dumps(summary["models"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
