"""Mixed precision (``--bits auto``): the exact knapsack, the byte budget as compiled, per-layer bits
through the packed format, the kernels and the numpy reference."""

import itertools
import json

import numpy as np
import pytest
from conftest import compiled_vs_reference, residual_model

from dsconv_tvm.accuracy.mixed import allocate, choose_bits
from dsconv_tvm.backends.cpu.layout import pack_weights, unpack_weights
from dsconv_tvm.cli import main as cli
from dsconv_tvm.config import DSConvConfig
from dsconv_tvm.errors import ConfigError, ModelError
from dsconv_tvm.frontend.onnx import load_onnx
from dsconv_tvm.scheme.weights import quantize_weight

pytestmark = pytest.mark.timeout(120)


def _brute(costs, errors, budget):
    best = None
    for choice in itertools.product(*[sorted(c) for c in costs]):
        cost = sum(c[k] for c, k in zip(costs, choice))
        err = sum(e[k] for e, k in zip(errors, choice))
        if cost <= budget and (best is None or err < best[0] - 1e-12):
            best = (err, choice)
    return best


def test_allocation_is_the_exact_optimum_under_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 6))
        keys = [2, 3, 4, 5, 6, 8]
        costs = [{b: int(rng.integers(1, 40)) * (1 if b <= 4 else 2) for b in keys} for _ in range(n)]
        errors = [{b: float(rng.random()) * 4.0 ** -b for b in keys} for _ in range(n)]
        budget = int(rng.integers(0, 200))
        got = allocate(costs, errors, budget)
        best = _brute(costs, errors, budget)
        if best is None:
            assert got is None
            continue
        assert sum(c[k] for c, k in zip(costs, got)) <= budget          # the budget holds, to the byte
        assert sum(e[k] for e, k in zip(errors, got)) == pytest.approx(best[0], abs=1e-12)


def test_allocation_at_a_budget_of_exactly_the_optimum_bytes():
    costs = [{4: 10, 8: 20}, {4: 7, 8: 13}]
    errors = [{4: 1.0, 8: 0.01}, {4: 0.5, 8: 0.02}]
    assert allocate(costs, errors, 33) == [8, 8]          # 20 + 13 = 33: allowed
    assert allocate(costs, errors, 32) == [8, 4]          # one byte less: the better single upgrade
    assert allocate(costs, errors, 16) is None            # below 10 + 7


@pytest.mark.parametrize("with_data", [False, True])
def test_choose_bits_respects_the_budget_as_compiled(tmp_path, with_data):
    path = residual_model(str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).random((16, 3, 20, 20)).astype(np.float32) if with_data else None
    cfg = DSConvConfig(block=8)
    for ratio in (0.28, 0.33, 0.40, 0.60):
        a = choose_bits(path, cfg, ratio, x)
        assert a.deployed_bytes <= a.budget_bytes == int(ratio * a.fp32_bytes)
        assert a.method == ("output" if with_data else "weight")
        assert set(a.layer_bits.values()) <= {2, 3, 4, 5, 6, 8}
    # the compiled model's bytes are the allocation's bytes
    from dsconv_tvm.driver.compile import compile_model
    res = compile_model(path, "x86", str(tmp_path / "m.so"), cfg.replace(layer_bits=a.layer_bits), check=False)
    assert sum(la.deployed_bytes for la in res.report.layers) == a.deployed_bytes
    assert {la.name: la.bits for la in res.report.converted} == a.layer_bits
    with pytest.raises(ConfigError, match="below the smallest"):
        choose_bits(path, cfg, 0.01, x)
    with pytest.raises(ModelError, match="no Conv node"):
        compile_model(path, "x86", str(tmp_path / "n.so"), cfg.replace(layer_bits={"nope": 8}), check=False)


def test_per_layer_bits_round_trip_through_packing_kernels_and_reference(tmp_path):
    path = residual_model(str(tmp_path / "m.onnx"))
    bits = {"block_conv1": 8, "block_conv2": 3, "down": 5, "dilated": 2}
    cfg = DSConvConfig(block=8, layer_bits=bits)
    result, worst = compiled_vs_reference(path, str(tmp_path / "m.so"), cfg)
    assert worst <= 1e-3
    loaded = load_onnx(path)
    inits = {t.name: t for t in loaded.model.graph.initializer}
    nodes = {n.name: n for n in loaded.model.graph.node}
    from onnx import numpy_helper
    for layer in result.report.converted:
        assert layer.bits == bits[layer.name] == layer.quantized.bits == layer.layer.bits
        w = numpy_helper.to_array(inits[nodes[layer.name].input[1]])
        ind = quantize_weight(w, bits[layer.name], min(8, w.shape[1]))           # independent numpy fit
        assert np.array_equal(ind.q, layer.quantized.q) and np.array_equal(ind.xi, layer.quantized.xi)
        lo, hi = -2 ** (bits[layer.name] - 1), 2 ** (bits[layer.name] - 1) - 1
        assert lo <= ind.q.min() and ind.q.max() <= hi
        packed = pack_weights(ind.q, bits[layer.name], layer.layer.block)
        assert packed.dtype == (np.uint8 if bits[layer.name] <= 4 else np.int8)
        assert np.array_equal(unpack_weights(packed, bits[layer.name], layer.layer.block, w.shape[1]), ind.q)


def test_compile_bits_auto_cli_report_and_errors(tmp_path, capsys):
    path = residual_model(str(tmp_path / "m.onnx"))
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(1).random((8, 3, 20, 20)).astype(np.float32))
    rep = tmp_path / "r.json"
    sens = tmp_path / "sens"
    assert cli.main(["compile", path, "-o", str(tmp_path / "m.so"), "--block", "8", "--bits", "auto",
                     "--weight-bytes", "0.3", "--calibration", str(calib), "--sensitivity", str(sens),
                     "--report-json", str(rep), "--no-check"]) == 0
    out = capsys.readouterr().out
    assert "chosen" in out and "bits" in out
    r = json.loads(rep.read_text())
    mp = r["mixed_precision"]
    assert sum(la["deployed_bytes"] for la in r["layers"]) == mp["deployed_bytes"] <= mp["budget_bytes"]
    assert {la["name"]: la["bits"] for la in r["layers"] if la["converted"]} == mp["layer_bits"]
    assert (tmp_path / "sens.md").exists() and (tmp_path / "sens.png").read_bytes()[:4] == b"\x89PNG"
    for argv, msg in ((["--weight-bytes", "0.3"], "needs --bits auto"),
                      (["--bits", "auto"], "needs --weight-bytes"),
                      (["--bits", "auto", "--weight-bytes", "0.01"], "below the smallest"),
                      (["--bits", "auto", "--weight-bytes", "1.5"], "--weight-bytes"),
                      (["--calibration", str(calib)], "add --bits auto")):
        assert cli.main(["compile", path, "-o", str(tmp_path / "n.so"), "--no-check", *argv]) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and err[0].startswith("dsconv-tvm compile: error:") and msg in err[0], err


@pytest.mark.parametrize("target, cheaper", [("x86", {2: 0.25, 3: 0.5, 4: 0.5, 5: 1, 6: 1, 8: 1}),
                                             ("rpi5", {2: 0.25, 3: 0.5, 4: 0.5, 5: 1, 6: 1, 8: 1}),
                                             ("jetson-orin", {2: 0.5, 3: 0.5, 4: 0.5, 5: 1, 6: 1, 8: 1})])
def test_the_knapsack_counts_each_backends_own_packed_bytes(target, cheaper):
    """CPU targets pack 2-bit weights four per byte, CUDA as nibbles: the allocation's bytes per bits
    are what each backend's packer writes (weights per byte written out here) + the fp32 scales."""
    from dsconv_tvm.accuracy.mixed import layer_bytes
    from dsconv_tvm.backends.base import backend_for
    from dsconv_tvm.scheme.geometry import ConvGeometry
    from dsconv_tvm.scheme.layer import DSConvLayer
    from dsconv_tvm.target import get_target

    backend = backend_for(get_target(target).tvm_target())
    shape = (64, 96, 3, 3)                                  # 3 blocks of 32: no padding slots
    layer = DSConvLayer((1, 96, 8, 8), 64, (3, 3), ConvGeometry((1, 1), (1, 1, 1, 1)), 4, 32, 8, True,
                        act_dtype=backend.act_dtype)
    scales = 64 * 3 * 9 * 4
    for bits, per_weight in cheaper.items():
        assert layer_bytes(backend, layer, shape, bits) == int(np.prod(shape) * per_weight) + scales
