"""The DSConvRewrite Relax pass on hand-built Relax modules."""

import numpy as np
import pytest
import tvm
from tvm import relax

from dsconv_tvm.config import DSConvConfig
from dsconv_tvm.backends.cpu.layout import unpack_weights
from dsconv_tvm.rewrite.dsconv_rewrite import DSConvRewrite
from dsconv_tvm.scheme.weights import quantize_weight

rng = np.random.default_rng(0)


def const(*shape, scale=0.2):
    return relax.const((rng.standard_normal(shape) * scale).astype(np.float32))


def build(body, in_shape=(1, 16, 8, 8)):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(in_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def conv(x, w, **kw):
    return relax.op.nn.conv2d(x, w, **kw)


def run(mod, x):
    ex = tvm.compile(mod, tvm.target.Target("llvm"))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def calls(mod, op_name):
    text = mod.script(show_meta=False)
    return text.count(op_name)


def two_convs(bb, x):
    y = bb.emit(relax.op.nn.relu(conv(x, const(32, 16, 3, 3), padding=1)))
    y = bb.emit(relax.op.add(conv(y, const(32, 32, 3, 3), padding=1), const(1, 32, 1, 1)))
    return relax.op.nn.relu(y)


def test_converts_every_eligible_conv_and_fuses_bias_relu():
    mod = build(two_convs)
    p = DSConvRewrite(DSConvConfig(first_layer="dsconv", block=16))
    new = p(mod)
    assert calls(new, "R.nn.conv2d") == 0
    assert calls(new, "R.call_tir") == 2
    assert calls(new, "R.nn.relu") == 0 and calls(new, "R.add") == 0      # both absorbed
    conv0, conv1 = p.report.layers
    assert conv0.converted and conv1.converted
    assert conv0.fused == ("relu",) and conv1.fused == ("bias", "relu")
    assert not conv0.unsigned and conv1.unsigned          # input of conv1 comes from a ReLU
    assert relax.analysis.well_formed(new) is not False     # returns None or raises in 0.27


def test_first_layer_policy_keep_is_default():
    p = DSConvRewrite()
    new = p(build(two_convs))
    assert calls(new, "R.nn.conv2d") == 1
    assert not p.report.layers[0].converted and "first layer" in p.report.layers[0].reason
    assert p.report.layers[1].converted


def test_depthwise_is_kept_and_grouped_is_one_layer_a_group():
    """Depthwise stays a float conv (policy depthwise); a grouped conv becomes split, one DSConv
    layer per group (named <name>/g<i>, its slice of the bias and the ReLU absorbed), concat."""
    bias = (rng.standard_normal((1, 24, 1, 1)) * 0.2).astype(np.float32)

    def body(bb, x):
        y = bb.emit(conv(x, const(16, 1, 3, 3), padding=1, groups=16))
        y = bb.emit(relax.op.add(conv(y, const(24, 4, 3, 3), padding=1, groups=4), relax.const(bias)))
        y = bb.emit(relax.op.nn.relu(y))
        return conv(y, const(8, 24, 1, 1))
    p = DSConvRewrite(DSConvConfig(first_layer="dsconv"), layer_names=["dw", "grouped", "pw"])
    new = p(build(body))
    names = [layer.name for layer in p.report.layers]
    assert names == ["dw", "grouped/g0", "grouped/g1", "grouped/g2", "grouped/g3", "pw"]
    assert "depthwise" in p.report.layers[0].reason and not p.report.layers[0].converted
    for g, layer in enumerate(p.report.layers[1:5]):
        assert layer.converted and layer.fused == ("bias", "relu") and layer.bfp == ()
        assert layer.weight_shape == (6, 4, 3, 3) and layer.in_shape == (1, 4, 8, 8)
        np.testing.assert_array_equal(layer.bias, bias.reshape(24)[6 * g:6 * (g + 1)])
    assert calls(new, "R.nn.conv2d") == 1 and calls(new, "R.split") == 1 and calls(new, "R.concat") == 1
    assert calls(new, "R.call_tir") == 5 and calls(new, "R.add") == 0 and calls(new, "R.nn.relu") == 0


def test_skip_by_name():
    p = DSConvRewrite(DSConvConfig(first_layer="dsconv", skip=("b",)), layer_names=["a", "b"])
    new = p(build(two_convs))
    assert [layer.converted for layer in p.report.layers] == [True, False]
    assert p.report.layers[1].reason.startswith("skipped")
    assert calls(new, "R.nn.conv2d") == 1


def test_conv_with_two_users_keeps_its_output():
    """A residual: the conv output feeds both a relu and an add; nothing may be absorbed."""
    def body(bb, x):
        c = bb.emit(conv(x, const(16, 16, 3, 3), padding=1))
        r = bb.emit(relax.op.nn.relu(c))
        return relax.op.add(r, c)
    mod = build(body)
    p = DSConvRewrite(DSConvConfig(first_layer="dsconv", block=8))
    new = p(mod)
    assert p.report.layers[0].fused == ()
    assert calls(new, "R.nn.relu") == 1 and calls(new, "R.add") == 1
    x = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    ref = run(mod, x)
    out = run(new, x)
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()       # quantized, but the same graph


def test_packed_weights_are_constants_of_the_right_size():
    p = DSConvRewrite(DSConvConfig(first_layer="dsconv", block=16, bits=4))
    new = p(build(two_convs))
    consts = [c for c in _constants(new) if c.dtype == "uint8"]
    assert sorted(c.size for c in consts) == sorted([32 * 16 * 9 // 2, 32 * 32 * 9 // 2])
    layer = p.report.layers[1]
    q = unpack_weights(_reshape_packed(consts, layer), 4, 16, 32)
    assert np.array_equal(q, layer.quantized.q)


def _constants(mod):
    out = []
    def visit(e):
        if isinstance(e, tvm.ir.GenericConst):
            out.append(e.value.numpy())
    relax.analysis.post_order_visit(mod["main"], visit)
    return out


def _reshape_packed(consts, layer):
    co, ci, kh, kw = layer.weight_shape
    return next(c for c in consts if c.size == co * ci * kh * kw // 2)


def test_rewritten_module_matches_dequantized_math():
    """The pass output equals the numpy DSConv of the same weights (bit exact integers, float sum)."""
    from dsconv_tvm.scheme.geometry import ConvGeometry
    from dsconv_tvm.scheme.reference import dsconv2d
    w = (rng.standard_normal((24, 16, 3, 3)) * 0.2).astype(np.float32)
    b = (rng.standard_normal(24) * 0.1).astype(np.float32)

    def body(bb, x):
        return relax.op.add(conv(x, relax.const(w), padding=1, strides=2), relax.const(b.reshape(1, 24, 1, 1)))
    cfg = DSConvConfig(first_layer="dsconv", block=8, bits=3, mantissa=6)
    new = DSConvRewrite(cfg)(build(body))
    x = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    qw = quantize_weight(w, 3, 8, cfg.fit)
    ref = dsconv2d(x, qw.q, qw.xi, 8, 6, ConvGeometry((2, 2), (1, 1, 1, 1)), b, unsigned=False)
    np.testing.assert_allclose(run(new, x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_non_constant_weight_is_kept():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6, 6), "float32"))
    w = relax.Var("w", relax.TensorType((8, 4, 3, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(conv(x, w))
        bb.emit_func_output(out)
    p = DSConvRewrite(DSConvConfig(first_layer="dsconv"))
    p(bb.get())
    assert p.report.layers[0].reason == "weight is not a constant"


def test_pass_runs_inside_a_sequential_pipeline():
    seq = tvm.transform.Sequential([relax.transform.FoldConstant(),
                                    DSConvRewrite(DSConvConfig(block=16)),
                                    relax.transform.LegalizeOps()])
    new = seq(build(two_convs))
    assert calls(new, "R.nn.conv2d") == 0


def test_residual_add_is_fused_into_the_epilogue():
    """conv -> +bias -> +residual -> relu becomes one DSConv call; same values as numpy."""
    from dsconv_tvm.scheme.geometry import ConvGeometry
    from dsconv_tvm.scheme.reference import dsconv2d
    w = (rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32)
    b = (rng.standard_normal(16) * 0.1).astype(np.float32)

    def body(bb, x):
        c = bb.emit(relax.op.add(conv(x, relax.const(w), padding=1), relax.const(b.reshape(1, 16, 1, 1))))
        return relax.op.nn.relu(bb.emit(relax.op.add(c, x)))
    cfg = DSConvConfig(first_layer="dsconv", block=8)
    p = DSConvRewrite(cfg)
    new = p(build(body))
    assert p.report.layers[0].fused == ("bias", "residual", "relu")
    assert calls(new, "R.add") == 0 and calls(new, "R.nn.relu") == 0
    x = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    qw = quantize_weight(w, 4, 8, cfg.fit)
    ref = np.maximum(dsconv2d(x, qw.q, qw.xi, 8, 8, ConvGeometry((1, 1), (1, 1, 1, 1)), b, unsigned=False) + x, 0)
    np.testing.assert_allclose(run(new, x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_dense_layer_as_1x1_dsconv():
    """--dense dsconv: x[N, K] @ W[K, OUT] + b -> relu runs as a 1x1 DSConv on [N, K, 1, 1]."""
    from dsconv_tvm.scheme.geometry import ConvGeometry
    from dsconv_tvm.scheme.reference import dsconv2d
    wm = (rng.standard_normal((40, 12)) * 0.2).astype(np.float32)
    b = (rng.standard_normal(12) * 0.1).astype(np.float32)

    def body(bb, x):
        return relax.op.nn.relu(bb.emit(relax.op.add(relax.op.matmul(x, relax.const(wm)), relax.const(b))))
    mod = build(body, in_shape=(3, 40))
    assert DSConvRewrite(DSConvConfig(block=16)).__call__(mod).script().count("call_tir") == 0   # default: kept
    p = DSConvRewrite(DSConvConfig(block=16, dense="dsconv"))
    new = p(mod)
    assert [(l.name, l.converted, l.fused) for l in p.report.layers] == [("dense0", True, ("bias", "relu"))]
    x = rng.standard_normal((3, 40)).astype(np.float32)
    w4 = wm.T.reshape(12, 40, 1, 1)
    qw = quantize_weight(w4, 4, 16, "l2")
    ref = np.maximum(dsconv2d(x.reshape(3, 40, 1, 1), qw.q, qw.xi, 16, 8, ConvGeometry(), b, unsigned=False), 0)
    np.testing.assert_allclose(run(new, x), ref.reshape(3, 12), rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _relu6_forms():
    """Clip(0, 6) in the forms a model may bring: maximum then minimum (either argument order), clip."""
    zero, six = relax.const(np.float32(0)), relax.const(np.float32(6))
    return {
        "max-min": lambda bb, y: relax.op.minimum(bb.emit(relax.op.maximum(y, zero)), six),
        "swapped": lambda bb, y: relax.op.minimum(six, bb.emit(relax.op.maximum(zero, y))),
        "clip": lambda bb, y: relax.op.clip(y, 0.0, 6.0),
    }


@pytest.mark.parametrize("form", list(_relu6_forms()))
def test_relu6_is_absorbed_and_its_output_is_nonnegative(form):
    """conv -> +bias -> clip(0, 6) -> conv: one DSConv call each, the clip in the first one's epilogue
    (values as the float graph's clip of the reference), and the second reads unsigned mantissas."""
    from dsconv_tvm.scheme.geometry import ConvGeometry
    from dsconv_tvm.scheme.reference import dsconv2d
    w = (rng.standard_normal((16, 16, 3, 3)) * 0.5).astype(np.float32)
    b = (rng.standard_normal(16) * 0.5).astype(np.float32)
    clip = _relu6_forms()[form]

    def first(bb, x):
        return clip(bb, bb.emit(relax.op.add(conv(x, relax.const(w), padding=1), relax.const(b.reshape(1, 16, 1, 1)))))

    def body(bb, x):
        return relax.op.nn.relu(conv(bb.emit(first(bb, x)), const(16, 16, 1, 1)))
    cfg = DSConvConfig(first_layer="dsconv", block=8)
    p = DSConvRewrite(cfg)
    new = p(build(body))
    assert [(l.fused, l.activation, l.unsigned) for l in p.report.layers] == [
        (("bias", "relu6"), "relu6", False), (("relu",), "relu", True)]
    assert calls(new, "R.call_tir") == 2 and all(calls(new, op) == 0 for op in ("R.maximum", "R.minimum", "R.clip"))
    x = rng.standard_normal((1, 16, 8, 8)).astype(np.float32) * 4
    one = DSConvRewrite(cfg)(build(first))
    qw = quantize_weight(w, 4, 8, cfg.fit)
    ref = np.clip(dsconv2d(x, qw.q, qw.xi, 8, 8, ConvGeometry((1, 1), (1, 1, 1, 1)), b), 0, 6)
    assert ref.max() == 6 and ref.min() == 0                          # both bounds are reached
    np.testing.assert_allclose(run(one, x), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_maximum_with_zero_is_relu_and_other_clips_stay():
    """maximum(x, 0) alone is a relu; clip(x, 0, 1) (no such activation) is left as it is, and its
    output is still known to be >= 0."""
    def body(bb, x):
        y = bb.emit(relax.op.maximum(conv(x, const(16, 16, 3, 3), padding=1), relax.const(np.float32(0))))
        z = bb.emit(relax.op.clip(conv(y, const(16, 16, 1, 1)), 0.0, 1.0))
        return conv(z, const(16, 16, 1, 1))
    p = DSConvRewrite(DSConvConfig(first_layer="dsconv", block=8))
    new = p(build(body))
    assert [(l.fused, l.unsigned) for l in p.report.layers] == [(("relu",), False), ((), True), ((), True)]
    assert calls(new, "R.clip") == 1 and calls(new, "R.maximum") == 0
