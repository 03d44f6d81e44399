#!/usr/bin/env python3
"""What would quantizing the depthwise convs cost?  (Input to the depthwise=keep decision.)

The compiled kernels convert only groups=1 convs.  This study simulates the alternative policy
"depthwise weights at b bits with the block along the kernel taps" (one KDS scale per channel for the
KH*KW taps, l2 fit): every depthwise weight W[c, 0, :, :] is replaced in the ONNX model by its
dequantized b-bit version (activations stay fp32 in those layers), then the model is compiled with the
usual DSConv scheme for the other convs and evaluated with `dsconv-tvm eval` against the original
fp32 model.  Bytes: b bits per depthwise weight + one float32 per channel instead of 32 bits.

Usage: python tools/depthwise_study.py [--models mobilenet_v2 efficientnet_lite0 mobilenet_small] [--dw-bits 8 4]
Writes results/depthwise_study.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from dsconv_tvm.cli import main as cli  # noqa: E402
from dsconv_tvm.scheme.weights import quantize_weight  # noqa: E402


def fake_quant_depthwise(model_path: str, out: str, bits: int) -> tuple[int, int]:
    """Write ``out``: ``model_path`` (BN folded) with every depthwise weight b-bit fake-quantized;
    returns (fp32 bytes, deployed bytes) of the depthwise weights."""
    import onnx
    from onnx import numpy_helper

    from dsconv_tvm.frontend.onnx import load_onnx

    loaded = load_onnx(model_path)
    m = loaded.model
    inits = {i.name: i for i in m.graph.initializer}
    fp32 = dep = 0
    for node in m.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type != "Conv" or group == 1:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        c, one, kh, kw = w.shape
        if one != 1:
            continue
        taps = w.reshape(c, kh * kw, 1, 1)                 # block along the taps: one scale per channel
        qw = quantize_weight(taps, bits, kh * kw, "l2")
        wq = qw.dequantize().reshape(w.shape).astype(np.float32)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(wq, node.input[1]))
        fp32 += 4 * w.size
        dep += qw.deployed_bytes()
    onnx.save(m, out)
    return fp32, dep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_lite0", "mobilenet_small"])
    ap.add_argument("--dw-bits", nargs="+", type=int, default=[8, 4])
    ap.add_argument("--limit", type=int, default=1000, help="Fashion-MNIST test images")
    ap.add_argument("--out", default=os.path.join(REPO, "results", "depthwise_study.json"))
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        if name == "mobilenet_small":
            model = os.path.join(REPO, "models", "mobilenet_small.onnx")
            data = ["--data", "fashion-mnist", "--limit", args.limit, "--batch", 100]
        else:
            from imagenet_models import ensure_model
            from photo_set import ensure_photo_set

            model = str(ensure_model(name))
            data = ["--images", ensure_photo_set("agreement"), "--crops", 4, "--seed", 0, "--batch", 10]
        for bits in args.dw_bits:
            with tempfile.TemporaryDirectory() as tmp:
                fq = os.path.join(tmp, "fq.onnx")
                dw_fp32, dw_dep = fake_quant_depthwise(model, fq, bits)
                res = os.path.join(tmp, "r.json")
                with contextlib.redirect_stdout(sys.stderr):
                    rc = cli.main(["eval", fq, "--reference", model, *map(str, data), "--sqnr-images", "0",
                                   "--json", res])
                if rc:
                    raise SystemExit(f"eval failed ({rc})")
                r = json.load(open(res))
            row = {"model": name, "dw_bits": bits, "dw_bytes_fp32": dw_fp32, "dw_bytes_quantized": dw_dep,
                   "weight_bytes_deployed_dw_keep": r["weight_bytes_deployed"],
                   "agreement": r["agreement"], "fp32_in_top5": r["fp32_in_top5"], "n": r["n"],
                   "top1": r["dsconv_top1"], "fp32_top1": r["fp32_top1"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump({"rows": rows}, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
