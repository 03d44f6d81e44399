#!/usr/bin/env python3
"""Per-layer latency of the CPU DSConv kernel at 2, 4 and 8 weight bits (default schedules, this host,
batch 1, median of 7 x 20 calls), on 1x1 and 3x3 layer shapes of MobileNetV2 / EfficientNet-Lite0.

    python tools/bits_bench.py
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tvm  # noqa: E402

from dsconv_tvm.backends.cpu.kernels import dsconv_primfunc  # noqa: E402
from dsconv_tvm.backends.cpu.layout import layer_params  # noqa: E402
from dsconv_tvm.backends.cpu.schedule import schedule_dsconv_cpu  # noqa: E402
from dsconv_tvm.scheme.geometry import ConvGeometry  # noqa: E402
from dsconv_tvm.scheme.layer import DSConvLayer  # noqa: E402
from dsconv_tvm.scheme.weights import quantize_weight  # noqa: E402
from dsconv_tvm.target import get_target  # noqa: E402

t = get_target("x86").tvm_target()
NOPAD, PAD1 = (0, 0, 0, 0), (1, 1, 1, 1)
shapes = [((1, 96, 56, 56), 24, (1, 1), NOPAD), ((1, 144, 28, 28), 48, (1, 1), NOPAD),
          ((1, 480, 14, 14), 96, (1, 1), NOPAD), ((1, 192, 14, 14), 576, (1, 1), NOPAD),
          ((1, 64, 28, 28), 64, (3, 3), PAD1)]
rng = np.random.default_rng(0)
for shp, co, k, pad in shapes:
    res = {}
    for bits in (2, 4, 8):
        layer = DSConvLayer(shp, co, k, ConvGeometry((1, 1), pad), bits, 32, 8, True, "float32", True, "relu", "uint8")
        f = dsconv_primfunc(layer).with_attr("global_symbol", "main")
        ex = tvm.compile(schedule_dsconv_cpu(f, t).mod, t)
        x = np.maximum(rng.standard_normal(shp), 0).astype(np.float32)
        qw = quantize_weight(rng.standard_normal((co, shp[1], *k)).astype(np.float32), bits, 32)
        args = [tvm.runtime.tensor(a) for a in [x, *layer_params(layer, qw.q, qw.xi, np.zeros(co, np.float32))]]
        out = tvm.runtime.tensor(np.zeros(layer.out_shape, np.float32))
        fn = ex.mod.time_evaluator("main", tvm.cpu(), number=20, repeat=7)
        res[bits] = statistics.median(fn(*args, out).results) * 1e3
    print(shp, co, k, " ".join(f"W{b} {v:.3f} ms" for b, v in res.items()),
          f"W2/W4 {res[2] / res[4]:.2f} W8/W4 {res[8] / res[4]:.2f}", flush=True)
