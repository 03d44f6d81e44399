"""tools/benchmark.py and its helpers: the re-filled models, the ORT int8 variant, the peak formula,
the table / JSON / CSV writer, and a tiny end-to-end run (no timing is asserted)."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]
ort = pytest.importorskip("onnxruntime")


def _tool(name):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(REPO / "tools"))
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


bm = _tool("bench_models")
bp = _tool("bench_peak")
bench = _tool("benchmark")


def _const_of_shape(name, shape, value=0.02):
    shp = numpy_helper.from_array(np.array(shape, np.int64), name + "__SHAPE")
    node = helper.make_node("ConstantOfShape", [shp.name], [name],
                            value=numpy_helper.from_array(np.array([value], np.float32)))
    return shp, node


def _light_like_model():
    """Conv -> BN -> Relu -> Conv -> BN -> Relu -> GlobalAveragePool -> Flatten -> Gemm, opset 9, every
    weight made by ConstantOfShape = 0.02 (as the light_* models of the onnx wheel)."""
    specs = [("w1", [16, 3, 3, 3]), ("s1", [16]), ("b1", [16]), ("m1", [16]), ("v1", [16]),
             ("w2", [32, 16, 3, 3]), ("s2", [32]), ("b2", [32]), ("m2", [32]), ("v2", [32]),
             ("fw", [10, 32]), ("fb", [10])]
    inits, nodes = [], []
    for name, shape in specs:
        i, n = _const_of_shape(name, shape)
        inits.append(i)
        nodes.append(n)
    nodes += [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
              helper.make_node("BatchNormalization", ["c1", "s1", "b1", "m1", "v1"], ["n1"]),
              helper.make_node("Relu", ["n1"], ["r1"]),
              helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
              helper.make_node("BatchNormalization", ["c2", "s2", "b2", "m2", "v2"], ["n2"]),
              helper.make_node("Relu", ["n2"], ["r2"]),
              helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "light", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])


def _weights(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_refill_keeps_shapes_is_seeded_and_not_constant():
    src = _light_like_model()
    a, b, c = bm.refill_model(src, seed=0), bm.refill_model(src, seed=0), bm.refill_model(src, seed=1)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    want = {n.output[0]: tuple(numpy_helper.to_array(i)) for n in src.graph.node if n.op_type == "ConstantOfShape"
            for i in src.graph.initializer if i.name == n.input[0]}
    assert {k: v.shape for k, v in wa.items()} == want
    assert not any(n.op_type == "ConstantOfShape" for n in a.graph.node)
    assert a.opset_import[0].version == bm.OPSET
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    assert any(not np.array_equal(wa[k], wc[k]) for k in wa)
    w2 = wa["w2"]
    assert w2.std() > 0.05 and abs(w2.std() - np.sqrt(2 / (16 * 9))) < 0.2 * np.sqrt(2 / (16 * 9))


def test_refill_calibrates_batchnorm_on_the_images():
    src = _light_like_model()
    images = bm.synthetic_images(6, (3, 16, 16), seed=3)
    model = bm.refill_model(src, seed=0, calib=images)
    w = _weights(model)
    # ORT, independently: the first BN's output has per-channel mean ~ beta and std ~ gamma
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend([helper.make_tensor_value_info("n1", TensorProto.FLOAT, None)])
    sess = bm.ort_session(probe)
    n1 = np.concatenate([sess.run(None, {"x": images[i:i + 1]})[0] for i in range(len(images))])
    np.testing.assert_allclose(n1.mean(axis=(0, 2, 3)), w["b1"], atol=1e-3)
    np.testing.assert_allclose(n1.std(axis=(0, 2, 3)), w["s1"], rtol=0.02)
    # the last Gemm is rescaled to unit RMS logits (no saturated softmax)
    y = np.concatenate([bm.ort_session(model).run(None, {"x": images[i:i + 1]})[0] for i in range(len(images))])
    assert np.sqrt(np.mean(y.astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-3)


def test_light_model_of_the_onnx_wheel_is_refilled_with_its_shapes():
    path = os.path.join(bm.light_dir(), "light_squeezenet.onnx")
    src = onnx.load(path)
    model = bm.refill_model(src, seed=0)
    shapes = {n.output[0]: tuple(int(d) for d in numpy_helper.to_array(i))
              for n in src.graph.node if n.op_type == "ConstantOfShape"
              for i in src.graph.initializer if i.name == n.input[0]}
    got = {k: v.shape for k, v in _weights(model).items() if k in shapes}
    assert got == shapes and len(got) == len(shapes)
    assert all(np.unique(v).size > 1 for k, v in _weights(model).items() if k in shapes and v.size > 1)


def test_ort_int8_is_close_to_fp32(tmp_path):
    images = bm.synthetic_images(8, (3, 16, 16), seed=0)
    fp32 = str(tmp_path / "m.onnx")
    onnx.save(bm.refill_model(_light_like_model(), seed=0, calib=images), fp32)
    int8 = bm.quantize_int8(fp32, str(tmp_path / "m_int8.onnx"), images)
    q = onnx.load(int8)
    assert any(n.op_type == "DequantizeLinear" for n in q.graph.node)
    # per-channel: the conv weights' scales have one value per output channel
    scales = [numpy_helper.to_array(i) for i in q.graph.initializer if i.name.endswith("_scale")]
    assert any(s.shape == (16,) for s in scales) and any(s.shape == (32,) for s in scales)
    y32 = np.concatenate([bm.ort_session(fp32).run(None, {"x": images[i:i + 1]})[0] for i in range(8)])
    y8 = np.concatenate([bm.ort_session(int8).run(None, {"x": images[i:i + 1]})[0] for i in range(8)])
    assert np.linalg.norm(y8 - y32) / np.linalg.norm(y32) < 0.05
    assert bm.initializer_bytes(int8) < 0.4 * bm.initializer_bytes(fp32)


def _measured(isa="avx2", gmacs=230.0, clock=4e9, cores=2):
    return {"clock_hz": clock, "cores": cores, "threads": [],
            "sequences": {isa: {"gmacs": gmacs, "macs_per_cycle_per_core": gmacs * 1e9 / clock / cores,
                                "sequence": bp.SEQUENCES[isa]}}}


def test_int8_peak_is_the_measured_sequence():
    p = bp.peak_for("vnni", _measured("vnni", 1000.0, 4e9, 2))
    assert p["peak_gops"] == pytest.approx(2000.0)
    assert p["macs_per_cycle_per_core"] == pytest.approx(125.0)
    with pytest.raises(ValueError):
        bp.peak_for("vnni", _measured("avx2"))
    with pytest.raises(ValueError):
        bp.peak_for(None, _measured("avx2"))
    from dsconv_tvm.target import get_target
    assert bp.kernel_isa(get_target("x86-avx2")) == "avx2"
    assert bp.kernel_isa(get_target("x86-vnni")) == "vnni"
    assert bp.kernel_isa(get_target("x86-avx512")) == "avx512"


def _fake_results():
    def var(ms, wb, **kw):
        return {"latency": {"median_ms": ms, "min_ms": ms * 0.9, "max_ms": ms * 1.2, "times_ms": [ms]},
                "weight_bytes": wb, **kw}

    row = {"model": "net", "variants": {
        "ort_fp32": var(10.0, 4000), "ort_int8": var(5.0, 1000),
        "tvm_fp32": var(8.0, 4000, tuning={"tuned": True, "trials": 8, "seconds": 30.0, "within10_trials": 4,
                                          "within10_seconds": 12.0}),
        "dsconv_b32": var(4.0, 600, vs_ort_fp32={"argmax_agree": 0.75, "rel_l2": 0.1, "max_abs_diff": 1.0}),
        "dsconv_b64": {"error": "RuntimeError: boom"}}}
    bench.add_ratios(row, 4000)
    return {"machine": {"cpu": "cpu", "llvm_cpu": "x"}, "target": "x86-avx2", "threads": 2, "cores": [0, 1],
            "trials": 8, "no_tune": False, "warmup": 1, "repeat": 2, "number": 1, "images": 4,
            "peak": bp.peak_for("avx2", _measured()),
            "models": [row, {"model": "gone", "skipped": True}],
            "layers": [{"model": "net", "variant": "dsconv_b64", "layer": "conv", "in_shape": [1, 64, 8, 8],
                        "out_shape": [1, 64, 8, 8], "kernel": [3, 3], "strides": [1, 1], "median_ms": 0.1,
                        "int_gops": 100.0, "fraction_of_peak": 100 / 460, "goal_ge64": True}]}


def test_ratios_and_writers(tmp_path):
    results = _fake_results()
    v = results["models"][0]["variants"]
    assert v["dsconv_b32"]["ratio_to_ort_fp32"] == pytest.approx(0.4)
    assert v["dsconv_b32"]["ratio_to_ort_int8"] == pytest.approx(0.8)
    assert v["dsconv_b32"]["ratio_to_tvm_fp32"] == pytest.approx(0.5)
    assert v["dsconv_b32"]["weight_ratio_to_fp32"] == pytest.approx(0.15)
    assert "ratio_to_ort_fp32" not in v["dsconv_b64"]
    written = bench.write_outputs(results, str(tmp_path), "b")
    assert {os.path.basename(p) for p in written} >= {"b.json", "b.csv", "b.md"}
    assert json.loads((tmp_path / "b.json").read_text())["models"][0]["variants"]["ort_int8"]["weight_bytes"] == 1000
    rows = list(csv.DictReader(open(tmp_path / "b.csv")))
    assert [r["variant"] for r in rows] == list(bench.VARIANTS)
    ds = rows[3]
    assert float(ds["median_ms"]) == 4.0 and float(ds["ratio_to_ort_int8"]) == pytest.approx(0.8)
    assert float(ds["argmax_agree"]) == 0.75 and rows[4]["error"] == "RuntimeError: boom"
    assert rows[2]["within10_trials"] == "4"
    md = (tmp_path / "b.md").read_text()
    assert "| net | DSConv W4 B=32 m=8 | 4.000 (3.600-4.800) | 0.40 | 0.80 | 0.50 |" in md
    assert "failed: RuntimeError: boom" in md and "Skipped: gone" in md
    assert "| 100.0 | 21.7 | yes |" in md
    assert "int8 peak: 460 GOP/s, measured" in md
    assert "(the worst such layer) | 0.217 | NO |" in md and "| - | not measured |" in md
    if "b.png" in {os.path.basename(p) for p in written}:
        assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_end_to_end_run(tmp_path):
    """One Fashion-MNIST example, untuned, 1 layer: every variant runs, TVM fp32 equals ORT fp32,
    DSConv agrees with it, and the weight bytes follow from the compile report."""
    env = dict(os.environ, DSCONV_TVM_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "benchmark.py"), "--models", "vgg_small", "--no-tune",
           "--variants", "ort_fp32", "ort_int8", "tvm_fp32", "dsconv_b32", "--images", "4", "--warmup", "1",
           "--repeat", "2", "--number", "1", "--layers", "1", "--layer-models", "vgg_small",
           "--out-dir", str(out), "--name", "t"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((out / "t.json").read_text())
    v = data["models"][0]["variants"]
    assert set(v) == {"ort_fp32", "ort_int8", "tvm_fp32", "dsconv_b32"}
    assert all("error" not in x and x["latency"]["min_ms"] <= x["latency"]["median_ms"] <= x["latency"]["max_ms"]
               for x in v.values())
    assert v["tvm_fp32"]["vs_ort_fp32"]["argmax_agree"] == 1.0 and v["tvm_fp32"]["vs_ort_fp32"]["rel_l2"] < 1e-4
    assert v["ort_int8"]["vs_ort_fp32"]["argmax_agree"] >= 0.75
    assert v["dsconv_b32"]["vs_ort_fp32"]["argmax_agree"] >= 0.75 and v["dsconv_b32"]["vs_ort_fp32"]["rel_l2"] < 0.2
    d = v["dsconv_b32"]
    assert d["weight_bytes"] == v["tvm_fp32"]["weight_bytes"] - d["converted_fp32_bytes"] + d["converted_deployed_bytes"]
    assert d["weight_bytes"] < 0.3 * v["ort_fp32"]["weight_bytes"]
    assert len(data["layers"]) == 1 and data["layers"][0]["int_gops"] > 0
    assert data["peak"]["peak_gops"] > 0
    assert len(list(csv.DictReader(open(out / "t.csv")))) == 4
