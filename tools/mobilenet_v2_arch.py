"""MobileNetV2 (Sandler et al., 2018; width 1.0, 224x224) as an ONNX graph built with
``onnx.helper``, weights seeded at random and calibrated like the benchmark's ``light_*`` models
(``bench_models.refill_model``: He-normal convs, BN statistics measured on 8 synthetic images).

For instruction counts and speed only: the shapes and operators are MobileNetV2's (3x3 stem, 17
inverted-residual blocks with expansion 6, ReLU6 = Clip(0, 6), depthwise 3x3, 1x1 conv to 1280,
global pooling, 1000-way Gemm), the weights are not trained.  Used by ``tools/arm_count.py`` when
``tools/imagenet_models.py`` cannot make the real one (it needs torch).  Cached under
``<cache>/bench/mobilenet_v2_arch_s<seed>.onnx``.
"""

from __future__ import annotations

import os

import numpy as np

# (expansion t, output channels c, repeats n, first stride s)
BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
          (6, 160, 3, 2), (6, 320, 1, 1)]


def build_graph():
    """The untrained graph (every weight zero; BN identity)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    counter = [0]

    def name(prefix):
        counter[0] += 1
        return f"{prefix}_{counter[0]}"

    def const(arr, prefix):
        n = name(prefix)
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), n))
        return n

    relu6_min = const(np.array(0.0), "clip_min")
    relu6_max = const(np.array(6.0), "clip_max")

    def conv_bn(x, cin, cout, k, stride, groups=1, relu=True):
        w = const(np.zeros((cout, cin // groups, k, k)), "conv_w")
        y = name("conv")
        nodes.append(helper.make_node("Conv", [x, w], [y], kernel_shape=[k, k], strides=[stride, stride],
                                      pads=[k // 2] * 4, group=groups))
        bn = [const(np.ones(cout), "bn_scale"), const(np.zeros(cout), "bn_bias"),
              const(np.zeros(cout), "bn_mean"), const(np.ones(cout), "bn_var")]
        z = name("bn")
        nodes.append(helper.make_node("BatchNormalization", [y, *bn], [z], epsilon=1e-5))
        if not relu:
            return z
        r = name("relu6")
        nodes.append(helper.make_node("Clip", [z, relu6_min, relu6_max], [r]))
        return r

    x = "input"
    x = conv_bn(x, 3, 32, 3, 2)
    cin = 32
    for t, c, n, s in BLOCKS:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            y = x
            if t != 1:
                y = conv_bn(y, cin, hidden, 1, 1)
            y = conv_bn(y, hidden, hidden, 3, stride, groups=hidden)
            y = conv_bn(y, hidden, c, 1, 1, relu=False)
            if stride == 1 and cin == c:
                a = name("add")
                nodes.append(helper.make_node("Add", [x, y], [a]))
                y = a
            x, cin = y, c
    x = conv_bn(x, cin, 1280, 1, 1)
    p = name("pool")
    nodes.append(helper.make_node("GlobalAveragePool", [x], [p]))
    f = name("flatten")
    nodes.append(helper.make_node("Flatten", [p], [f], axis=1))
    w = const(np.zeros((1000, 1280)), "fc_w")
    b = const(np.zeros(1000), "fc_b")
    nodes.append(helper.make_node("Gemm", [f, w, b], ["logits"], transB=1))
    for node in nodes:
        node.name = node.output[0]
    graph = helper.make_graph(nodes, "mobilenet_v2",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def ensure(seed: int = 0, log=print) -> str:
    """Path of the seeded, calibrated model (built once, cached)."""
    import bench_models

    path = os.path.join(bench_models.bench_cache(), f"mobilenet_v2_arch_s{seed}.onnx")
    if not os.path.exists(path):
        log(f"mobilenet_v2: building the architecture with seeded random weights (seed {seed}), "
            f"BN calibrated on 8 synthetic images")
        model = bench_models.refill_model(build_graph(), seed, bench_models.synthetic_images(8, seed=seed + 1000))
        bench_models._save(model, path)
    return path
