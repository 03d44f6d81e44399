"""``power(x, c)`` with c a multiple of 1/4 (LRN's x^0.75) is written with square roots: the same
values as ONNX Runtime within float32 rounding, and no ``power`` left to compile to ``powf``.
(``onnx.reference``'s LRN does not follow the spec's window: ONNX Runtime does, and is the reference.)"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dsconv_tvm.frontend.onnx import load_onnx, to_relax


def _model(path, exponent):
    """x -> LRN(size 5, beta 0.75) -> Pow(|.| + 0.1, exponent)."""
    e = numpy_helper.from_array(np.array(exponent, np.float32), "e")
    eps = numpy_helper.from_array(np.array(0.1, np.float32), "eps")
    nodes = [helper.make_node("LRN", ["x"], ["l"], size=5, alpha=1e-2, beta=0.75, bias=1.0),
             helper.make_node("Abs", ["l"], ["a"]), helper.make_node("Add", ["a", "eps"], ["p"]),
             helper.make_node("Pow", ["p", "e"], ["y"])]
    g = helper.make_graph(nodes, "pow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], [e, eps])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


@pytest.mark.parametrize("exponent,left", [(0.5, 0), (-0.75, 0), (1.5, 0), (0.25, 0), (2.0, 1), (0.3, 1)])
def test_power_written_with_square_roots(tmp_path, exponent, left):
    import tvm
    from tvm import relax

    path = _model(tmp_path / "pow.onnx", exponent)
    mod = to_relax(load_onnx(path))
    # the LRN's ^0.75 is always rewritten; the Pow only when its exponent is a multiple of 1/4
    assert mod.script().count("R.power(") == left
    x = np.random.default_rng(0).standard_normal((1, 8, 6, 6)).astype(np.float32) * 4
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # float32 rounding apart: a few ulps of powf / of the window sum's order
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
