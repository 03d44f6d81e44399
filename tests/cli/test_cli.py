"""The ``dsconv-tvm`` command line: compile / run / targets, summaries, values, exit codes, and one
clear error (exit 2, one line, no traceback, nothing half-written) for each kind of bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dsconv_tvm.cli import main as cli
from dsconv_tvm import fileio, host
from dsconv_tvm import target as T
from dsconv_tvm.config import DSConvConfig

LAYERS = ["conv1", "conv2", "conv3"]
RTOL, ATOL = 1e-5, 1e-6


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------
def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def _save(nodes, inputs, outputs, inits, path, extra_opsets=()):
    g = helper.make_graph(nodes, Path(path).stem, inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), *extra_opsets])
    onnx.save(m, str(path))
    return str(path)


def _tiny(path, shape=("N", 1, 28, 28)):
    """conv1 (3x3, no pad) -> relu -> conv2 (s2) -> BN -> relu -> conv3 (1x1, bias) -> relu -> GAP
    -> Flatten -> Gemm."""
    rng = np.random.default_rng(0)
    inits = [_init("W1", rng.standard_normal((16, 1, 3, 3)) * 0.3),
             _init("W2", rng.standard_normal((32, 16, 3, 3)) * 0.1),
             _init("g", rng.random(32) + 0.5), _init("b", rng.standard_normal(32) * 0.1),
             _init("m", rng.standard_normal(32) * 0.1), _init("v", rng.random(32) + 0.5),
             _init("W3", rng.standard_normal((32, 32, 1, 1)) * 0.2), _init("B3", rng.standard_normal(32) * 0.1),
             _init("Wf", rng.standard_normal((10, 32)) * 0.2), _init("Bf", rng.standard_normal(10) * 0.1)]
    nodes = [helper.make_node("Conv", ["input", "W1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
             helper.make_node("BatchNormalization", ["c2", "g", "b", "m", "v"], ["bn2"], name="bn2"),
             helper.make_node("Relu", ["bn2"], ["r2"]),
             helper.make_node("Conv", ["r2", "W3", "B3"], ["c3"], name="conv3"),
             helper.make_node("Relu", ["c3"], ["r3"]),
             helper.make_node("GlobalAveragePool", ["r3"], ["gp"]),
             helper.make_node("Flatten", ["gp"], ["fl"]),
             helper.make_node("Gemm", ["fl", "Wf", "Bf"], ["logits"], transB=1)]
    return _save(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
                 [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits, path)


NOCONV_W = np.random.default_rng(1).standard_normal((10, 784)).astype(np.float32) * 0.05
NOCONV_B = np.arange(10, dtype=np.float32) * 0.1


def _noconv(path):
    nodes = [helper.make_node("Flatten", ["input"], ["fl"]),
             helper.make_node("Gemm", ["fl", "Wf", "Bf"], ["logits"], transB=1)]
    return _save(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
                 [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                 [_init("Wf", NOCONV_W), _init("Bf", NOCONV_B)], path)


def _single_op(path, op, domain=""):
    node = helper.make_node(op, ["input"], ["y"], name=f"{op.lower()}_node", domain=domain)
    extra = [helper.make_opsetid(domain, 1)] if domain else []
    return _save([node], [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [], path, extra)


def _call(argv):
    """Run the CLI in-process, capturing stdout / stderr (usable outside capsys: session fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def run_cli(capsys, *argv):
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    (d / "x.onnx").write_text("this is not an onnx model\n")
    return {
        "tiny": _tiny(d / "tiny.onnx"),
        "dyn": _tiny(d / "dyn.onnx", shape=("N", 1, "H", "W")),
        "noconv": _noconv(d / "noconv.onnx"),
        "celu": _single_op(d / "celu.onnx", "Celu"),
        "custom": _single_op(d / "custom.onnx", "FancyOp", domain="com.example"),
        "text": str(d / "x.onnx"),
        "missing": str(d / "missing.onnx"),
    }


@pytest.fixture(scope="session")
def tiny_b1(models, tmp_path_factory):
    """The tiny model compiled for x86 at batch 1 (block 8), with its summary and JSON report."""
    d = tmp_path_factory.mktemp("b1")
    so, js = d / "tiny.so", d / "report.json"
    rc, out, err = _call(["compile", models["tiny"], "--target", "x86", "-o", so, "--block", "8",
                          "--report-json", js])
    assert rc == 0, err
    return {"so": str(so), "json": str(js), "out": out, "err": err, "shapes": {"input": [1, 1, 28, 28]},
            "cfg": DSConvConfig(block=8)}


@pytest.fixture(scope="session")
def tiny_b2(models, tmp_path_factory):
    """The tiny model compiled at batch 2 with non-default options (bits 3, block 4, mantissa 6)."""
    d = tmp_path_factory.mktemp("b2")
    so = d / "tiny_b2.so"
    rc, out, err = _call(["compile", models["tiny"], "-o", so, "--bits", "3", "--block", "4",
                          "--mantissa", "6", "--input-shapes", "input:[2,1,28,28]", "--no-check"])
    assert rc == 0, err
    return {"so": str(so), "shapes": {"input": [2, 1, 28, 28]},
            "cfg": DSConvConfig(bits=3, block=4, mantissa=6)}


@pytest.fixture(scope="session")
def tiny_arm(models, tmp_path_factory):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ not installed")
    d = tmp_path_factory.mktemp("arm")
    so = d / "tiny_arm.so"
    rc, out, err = _call(["compile", models["tiny"], "--target", "arm", "-o", so, "--block", "8"])
    assert rc == 0, err
    return {"so": str(so), "out": out}


def _reference(model, shapes, cfg):
    """The numpy DSConv reference of ``model`` as compiled with ``cfg`` at ``shapes``."""
    from dsconv_tvm.driver.compile import build_relax
    from dsconv_tvm.frontend.onnx import load_onnx
    from dsconv_tvm.scheme.reference import reference_model

    loaded = load_onnx(model, shapes)
    _, report = build_relax(loaded, cfg)
    return reference_model(loaded, report, cfg.mantissa, cfg.block)


def assert_matches_reference(y, ref):
    """``y`` equals the numpy DSConv reference to rtol 1e-5 / atol 1e-6, sample by sample.

    The integer block dot products are exact in both, but the float32 sum across blocks and taps
    is reassociated (and FMA-contracted) by LLVM, so a converted layer's output differs from numpy's
    by an ulp here and there.  Rarely (about 1 sample in 100-300 with this model) such an ulp lands
    on a rounding boundary of the next layer's BFP quantizer and flips one mantissa LSB, which
    moves the logits by ~1e-5.  One such sample per batch is tolerated, bounded at 1e-4 x |ref|.
    """
    assert y.shape == ref.shape and y.dtype == np.float32
    y2, r2 = y.reshape(len(y), -1), ref.reshape(len(ref), -1)
    strict = np.all(np.abs(y2 - r2) <= ATOL + RTOL * np.abs(r2), axis=1)
    if strict.all():
        return
    assert (~strict).sum() <= max(1, len(y) // 6), f"samples {np.nonzero(~strict)[0]} differ"
    np.testing.assert_allclose(y2[~strict], r2[~strict], rtol=0, atol=1e-4 * np.abs(r2).max())
    assert np.array_equal(np.argmax(y2, axis=1), np.argmax(r2, axis=1))


def _images(n, seed=0):
    return np.random.default_rng(seed).random((n, 1, 28, 28)).astype(np.float32)


def _leftovers(directory):
    """Temp files (".tmp-*", ".<name>.*.tmp.so") and other hidden files left in ``directory``."""
    return [p for p in os.listdir(directory) if p.startswith(".") or "tmp" in p]


def assert_one_line_error(rc, err, verb, *needles):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err                       # the error is the last word
    assert errors[0].startswith(f"dsconv-tvm {verb}: error: "), err
    for needle in needles:
        assert str(needle) in errors[0], (needle, errors[0])
    return errors[0]


# --------------------------------------------------------------------------------------------------
# compile: summary and report
# --------------------------------------------------------------------------------------------------
def test_compile_summary(tiny_b1):
    out = tiny_b1["out"]
    assert os.path.isfile(tiny_b1["so"]) and host.elf_machine(tiny_b1["so"]) == "x86-64"
    assert re.search(r"^target\s+x86$", out, re.M)
    assert "input [1, 1, 28, 28]" in out
    assert "W4 B=8 m=8" in out
    assert "1 BatchNormalization folded" in out
    assert "2 converted to DSConv, 1 kept in fp32" in out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  conv")}
    assert sorted(rows) == LAYERS
    assert rows["conv1"].split()[2] == "fp32" and "first layer" in rows["conv1"]
    for name in ("conv2", "conv3"):
        cols = rows[name].split()
        assert cols[2] == "dsconv"
        sqnr = float(cols[4])
        assert 10.0 < sqnr < 60.0, rows[name]
    m = re.search(r"conv weights fp32 ([\d.]+) KB -> deployed ([\d.]+) KB \(([\d.]+)x\)", out)
    assert m, out
    assert float(m.group(2)) < float(m.group(1)) and float(m.group(3)) < 0.5
    m = re.search(r"agreement fp32 \(TVM\) vs DSConv .*compiled \.so: top-1 agree ([\d.]+), "
                  r"max \|diff\| ([\d.e+-]+), rel\. L2 error ([\d.e+-]+)", out)
    assert m, out
    assert float(m.group(1)) == 1.0 and float(m.group(3)) < 0.2
    assert f"wrote     {tiny_b1['so']}" in out
    assert "Traceback" not in tiny_b1["err"] and "error" not in tiny_b1["err"]


def test_compile_report_json(tiny_b1):
    data = json.loads(Path(tiny_b1["json"]).read_text())
    assert data["target"] == "x86"
    assert data["config"]["bits"] == 4 and data["config"]["block"] == 8 and data["config"]["mantissa"] == 8
    assert data["input_shapes"] == {"input": [1, 1, 28, 28]}
    assert [l["name"] for l in data["layers"]] == LAYERS
    by = {l["name"]: l for l in data["layers"]}
    assert not by["conv1"]["converted"] and "first layer" in by["conv1"]["reason"]
    assert by["conv1"]["sqnr_db"] is None
    for name in ("conv2", "conv3"):
        assert by[name]["converted"] and by[name]["sqnr_db"] > 10
        assert by[name]["deployed_bytes"] < by[name]["fp32_bytes"]
    assert data["agreement"]["top1_agree"] == 1.0
    assert not _leftovers(os.path.dirname(tiny_b1["json"]))


def test_compile_skip_keeps_layer(models, tmp_path, capsys):
    so = tmp_path / "skip.so"
    rc, out, err = run_cli(capsys, "compile", models["tiny"], "-o", so, "--skip", "conv2", "--no-check")
    assert rc == 0, err
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  conv")}
    assert rows["conv2"].split()[2] == "fp32" and "skipped" in rows["conv2"]
    assert rows["conv3"].split()[2] == "dsconv"
    assert "1 converted to DSConv, 2 kept in fp32" in out
    assert "agreement" not in out
    assert os.path.isfile(so) and not _leftovers(tmp_path)


def test_compile_arm_cross(tiny_arm):
    assert host.elf_machine(tiny_arm["so"]) == "AArch64"
    assert re.search(r"^target\s+arm$", tiny_arm["out"], re.M)
    assert "run with a host build of the same DSConv model: top-1 agree" in tiny_arm["out"]


# --------------------------------------------------------------------------------------------------
# run: values
# --------------------------------------------------------------------------------------------------
def test_run_batched_matches_reference(models, tiny_b2, tmp_path, capsys):
    x = _images(6, seed=3)                                 # 3 x the compiled batch of 2
    np.save(tmp_path / "x.npy", x)
    rc, out, err = run_cli(capsys, "run", tiny_b2["so"], "--input", tmp_path / "x.npy",
                           "--output", tmp_path / "y.npy")
    assert rc == 0, err
    assert "[6, 10]" in out
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (6, 10) and y.dtype == np.float32
    ref = _reference(models["tiny"], tiny_b2["shapes"], tiny_b2["cfg"])(x)
    assert_matches_reference(y, ref)
    assert sorted(os.listdir(tmp_path)) == ["x.npy", "y.npy"]
    # the chunking is exact: the same library called batch by batch gives the same bits
    import tvm

    from dsconv_tvm.execute.runner import run_executable

    lib = tvm.runtime.load_module(tiny_b2["so"])
    direct = np.concatenate([run_executable(lib, [x[i:i + 2]]) for i in range(0, 6, 2)])
    np.testing.assert_array_equal(y, direct)


def test_run_single_sample_and_topk(models, tiny_b1, tmp_path, capsys):
    x = _images(1, seed=5)
    ref = _reference(models["tiny"], tiny_b1["shapes"], tiny_b1["cfg"])(x)
    np.save(tmp_path / "x.npy", x)
    rc, out, err = run_cli(capsys, "run", tiny_b1["so"], "-i", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert rc == 0, err
    assert_matches_reference(np.load(tmp_path / "y.npy"), ref)

    # a single sample without the batch axis is accepted too; top-k is printed
    np.save(tmp_path / "x3d.npy", x[0])
    rc, out, err = run_cli(capsys, "run", tiny_b1["so"], "--input", tmp_path / "x3d.npy", "--top-k", "3")
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("sample ")]
    assert len(lines) == 1
    pairs = [p.split(":") for p in lines[0].split(": ", 1)[1].split()]
    assert len(pairs) == 3
    classes, scores = [int(c) for c, _ in pairs], [float(s) for _, s in pairs]
    assert classes[0] == int(np.argmax(ref[0]))
    assert classes == [int(c) for c in np.argsort(-ref[0], kind="stable")[:3]]
    np.testing.assert_allclose(scores, ref[0][classes], atol=1e-4)


def test_run_topk_each_sample(models, tiny_b2, tmp_path, capsys):
    x = _images(4, seed=7)
    ref = _reference(models["tiny"], tiny_b2["shapes"], tiny_b2["cfg"])(x)
    np.save(tmp_path / "x.npy", x)
    rc, out, err = run_cli(capsys, "run", tiny_b2["so"], "--input", tmp_path / "x.npy")
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("sample ")]
    assert len(lines) == 4
    for n, line in enumerate(lines):
        assert line.startswith(f"sample {n}: ")
        top = line.split(": ", 1)[1].split()
        assert len(top) == 5
        assert int(top[0].split(":")[0]) == int(np.argmax(ref[n]))


def test_no_conv_model_warns_compiles_and_runs(models, tmp_path, capsys):
    so = tmp_path / "noconv.so"
    rc, out, err = run_cli(capsys, "compile", models["noconv"], "-o", so)
    assert rc == 0, err
    assert "warning" in err and "no convolution" in err and "Traceback" not in err
    assert "0 converted to DSConv, 0 kept in fp32" in out
    assert os.path.isfile(so)
    x = _images(2, seed=9)
    np.save(tmp_path / "x.npy", x)
    rc, out, err = run_cli(capsys, "run", so, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert rc == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), x.reshape(2, -1) @ NOCONV_W.T + NOCONV_B,
                               rtol=1e-4, atol=1e-5)


def test_targets_verb(capsys):
    rc, out, err = run_cli(capsys, "targets")
    assert rc == 0, err
    listed = [ln.split()[0] for ln in out.splitlines() if ln.strip()]
    assert listed == T.list_targets()
    assert "[aarch64-linux-gnu-g++]" in out and "[host g++]" in out


# --------------------------------------------------------------------------------------------------
# the console script, in a subprocess
# --------------------------------------------------------------------------------------------------
def _script():
    exe = shutil.which("dsconv-tvm", path=os.path.dirname(sys.executable)) or shutil.which("dsconv-tvm")
    return [exe] if exe else [sys.executable, "-m", "dsconv_tvm.cli"]


@pytest.mark.parametrize("verb", [None, "compile", "run", "targets"])
def test_script_help(verb):
    argv = _script() + ([verb] if verb else []) + ["--help"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: dsconv-tvm" + (f" {verb}" if verb else ""))
    expected = {None: ["compile", "run", "targets"],
                "compile": ["--target", "--output", "--bits", "--block", "--mantissa", "--input-shapes",
                            "--skip", "--report-json"],
                "run": ["--input", "--output", "--top-k"],
                "targets": []}[verb]
    for opt in expected:
        assert opt in p.stdout


def test_script_compile_and_run(models, tmp_path):
    so, x_path, y_path = tmp_path / "m.so", tmp_path / "x.npy", tmp_path / "y.npy"
    p = subprocess.run(_script() + ["compile", models["tiny"], "-o", str(so), "--block", "8",
                                    "--input-shapes", "input:[1,1,28,28]", "--no-check"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "2 converted to DSConv, 1 kept in fp32" in p.stdout
    x = _images(2, seed=11)
    np.save(x_path, x)
    p = subprocess.run(_script() + ["run", str(so), "--input", str(x_path), "--output", str(y_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    ref = _reference(models["tiny"], {"input": [1, 1, 28, 28]}, DSConvConfig(block=8))(x)
    assert_matches_reference(np.load(y_path), ref)
    # a failure in a subprocess: exit 2, one line, no traceback
    p = subprocess.run(_script() + ["run", str(so), "--input", str(tmp_path / "nope.npy")],
                       capture_output=True, text=True, timeout=120)
    assert_one_line_error(p.returncode, p.stderr, "run", "nope.npy", "no such file")


def test_script_missing_cross_compiler_on_path(models, tmp_path):
    """PATH without the cross compiler: the error names it and the package that installs it."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))
    out = tmp_path / "arm.so"
    p = subprocess.run(_script() + ["compile", models["tiny"], "--target", "arm", "-o", str(out)],
                       capture_output=True, text=True, timeout=120, env=env)
    line = assert_one_line_error(p.returncode, p.stderr, "compile", "aarch64-linux-gnu-g++",
                                 "apt-get install g++-aarch64-linux-gnu")
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "'arm'" in line
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# compile: bad input
# --------------------------------------------------------------------------------------------------
def _bad_compile(capsys, tmp_path, argv, *needles, exact_one_line=True):
    out = tmp_path / "out.so"
    rc, _, err = run_cli(capsys, "compile", *argv[:1], "-o", out, *argv[1:])
    line = assert_one_line_error(rc, err, "compile", *needles)
    if exact_one_line:
        assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    assert _leftovers(tmp_path) == []
    return line


def test_compile_text_file_named_onnx(models, tmp_path, capsys):
    _bad_compile(capsys, tmp_path, [models["text"]], "x.onnx", "not an ONNX model")


def test_compile_missing_file(models, tmp_path, capsys):
    _bad_compile(capsys, tmp_path, [models["missing"]], "missing.onnx", "no such file")


def test_compile_directory_as_model(tmp_path, capsys):
    d = tmp_path / "adir.onnx"
    d.mkdir()
    _bad_compile(capsys, tmp_path, [d], "adir.onnx", "directory")


@pytest.mark.parametrize("which,op", [("celu", "'Celu'"), ("custom", "'com.example.FancyOp'")])
def test_compile_unsupported_op(models, tmp_path, capsys, which, op):
    from tvm.relax.frontend.onnx import onnx_frontend

    assert "Celu" not in onnx_frontend._get_convert_map()
    node = "celu_node" if which == "celu" else "fancyop_node"
    _bad_compile(capsys, tmp_path, [models[which]], f"{which}.onnx", "unsupported operator", op, node)


@pytest.mark.parametrize("opt,value,text", [
    ("--bits", 1, "--bits 1 is out of range"), ("--bits", 9, "--bits 9 is out of range"),
    ("--block", 0, "--block 0 is out of range"),
    ("--mantissa", 1, "--mantissa 1 is out of range"), ("--mantissa", 9, "--mantissa 9 is out of range"),
])
def test_compile_scheme_out_of_range(models, tmp_path, capsys, opt, value, text):
    line = _bad_compile(capsys, tmp_path, [models["tiny"], opt, value], text)
    assert ("2..8" in line) or (">= 1" in line)


def test_compile_unknown_target(models, tmp_path, capsys):
    line = _bad_compile(capsys, tmp_path, [models["tiny"], "--target", "pdp11"], "unknown target 'pdp11'")
    for name in T.list_targets():
        assert name in line


def test_compile_missing_cross_compiler(models, tmp_path, capsys, monkeypatch):
    real = shutil.which
    monkeypatch.setattr(T.shutil, "which",
                        lambda cmd, *a, **k: None if "aarch64" in str(cmd) else real(cmd, *a, **k))
    _bad_compile(capsys, tmp_path, [models["tiny"], "--target", "rpi4"], "aarch64-linux-gnu-g++",
                 "'rpi4'", "g++-aarch64-linux-gnu")


def test_compile_output_dir_missing(models, tmp_path, capsys):
    out = tmp_path / "no" / "such" / "m.so"
    rc, _, err = run_cli(capsys, "compile", models["tiny"], "-o", out)
    assert_one_line_error(rc, err, "compile", str(out), "does not exist")
    assert len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_compile_output_is_directory(models, tmp_path, capsys):
    out = tmp_path / "outdir"
    out.mkdir()
    rc, _, err = run_cli(capsys, "compile", models["tiny"], "-o", out)
    assert_one_line_error(rc, err, "compile", str(out), "is a directory")
    assert os.listdir(out) == [] and os.listdir(tmp_path) == ["outdir"]


def test_compile_report_json_dir_missing(models, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "compile", models["tiny"], "-o", tmp_path / "m.so",
                         "--report-json", tmp_path / "nodir" / "r.json")
    assert_one_line_error(rc, err, "compile", "r.json", "does not exist")
    assert os.listdir(tmp_path) == []                      # checked before compiling: no .so either


@pytest.mark.parametrize("shapes,needles", [
    ("input:[1,28,28]", ["rank 4", "rank 3", "[1, 28, 28]"]),
    ("input:[1,3,28,28]", ["[1, 3, 28, 28]", "axis 1: 3 != 1"]),
    ("input:[1,1,2,2]", ["[1, 1, 2, 2]", "axis 2: 2 != 28"]),
    ("image:[1,1,28,28]", ["'image'", "input"]),
    ("input:[1,0,28,28]", ["positive", "[1, 0, 28, 28]"]),
    ("input=1x1x28x28", ["input=1x1x28x28", "is not of the form"]),
])
def test_compile_input_shape_mismatch(models, tmp_path, capsys, shapes, needles):
    _bad_compile(capsys, tmp_path, [models["tiny"], "--input-shapes", shapes], *needles)


@pytest.mark.parametrize("shape", ["[1,1,2,2]", "[1,1,1,1]"])
def test_compile_spatial_too_small(models, tmp_path, capsys, shape):
    """Symbolic H, W given too small for conv1 (3x3, no padding): named layer, no traceback."""
    _bad_compile(capsys, tmp_path, [models["dyn"], "--input-shapes", f"input:{shape}"],
                 "dyn.onnx", "conv1", exact_one_line=False)   # progress lines precede the error


def test_compile_symbolic_dim_needs_shapes(models, tmp_path, capsys):
    _bad_compile(capsys, tmp_path, [models["dyn"]], "dyn.onnx", "symbolic dimension 'H'", "--input-shapes")


def test_compile_bad_option_syntax_exits_2(models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["compile", models["tiny"], "-o", str(tmp_path / "m.so"), "--bits", "four"])
    assert exc.value.code == 2
    assert "--bits" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["compile", models["tiny"]])                     # -o is required
    assert exc.value.code == 2
    assert os.listdir(tmp_path) == []


def test_no_verb_exits_nonzero(capsys):
    assert cli.main([]) == 2
    assert "compile" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# run: bad input
# --------------------------------------------------------------------------------------------------
def _bad_run(capsys, tmp_path, so, x, *needles, output=True):
    x_path = tmp_path / "x.npy"
    if x is not None:
        np.save(x_path, x)
    y_path = tmp_path / "y.npy"
    argv = ["run", so, "--input", x_path] + (["--output", y_path] if output else [])
    rc, out, err = run_cli(capsys, *argv)
    line = assert_one_line_error(rc, err, "run", *needles)
    assert len(err.strip().splitlines()) == 1, err
    assert not y_path.exists() and _leftovers(tmp_path) == []
    assert "sample" not in out
    return line


def test_run_batch_not_multiple(tiny_b2, tmp_path, capsys):
    _bad_run(capsys, tmp_path, tiny_b2["so"], _images(3), "x.npy", "[3, 1, 28, 28]", "[2, 1, 28, 28]",
             "multiple of 2")


def test_run_wrong_sample_shape(tiny_b1, tmp_path, capsys):
    _bad_run(capsys, tmp_path, tiny_b1["so"], np.zeros((2, 3, 28, 28), np.float32), "[2, 3, 28, 28]",
             "[1, 1, 28, 28]")


def test_run_nan_input(tiny_b1, tmp_path, capsys):
    x = _images(2)
    x[1, 0, 4, 7] = np.nan
    _bad_run(capsys, tmp_path, tiny_b1["so"], x, "x.npy", "nan", "(1, 0, 4, 7)", "finite")


def test_run_inf_input_no_output(tiny_b1, tmp_path, capsys):
    x = _images(1)
    x[0, 0, 0, 0] = np.inf
    _bad_run(capsys, tmp_path, tiny_b1["so"], x, "inf", output=False)


def test_run_aarch64_library(tiny_arm, tmp_path, capsys):
    line = _bad_run(capsys, tmp_path, tiny_arm["so"], _images(1), "tiny_arm.so", "AArch64",
                    "executes libraries built for this host")
    assert "x86-64" in line


def test_run_missing_input(tiny_b1, tmp_path, capsys):
    _bad_run(capsys, tmp_path, tiny_b1["so"], None, "x.npy", "no such file")


def test_run_input_not_npy(tiny_b1, tmp_path, capsys):
    (tmp_path / "x.npy").write_text("1 2 3\n")
    _bad_run(capsys, tmp_path, tiny_b1["so"], None, "x.npy", "not a .npy file")


def test_run_library_missing_or_not_so(models, tmp_path, capsys):
    np.save(tmp_path / "x.npy", _images(1))
    rc, _, err = run_cli(capsys, "run", tmp_path / "none.so", "--input", tmp_path / "x.npy")
    assert_one_line_error(rc, err, "run", "none.so", "no such file")
    rc, _, err = run_cli(capsys, "run", models["tiny"], "--input", tmp_path / "x.npy")
    assert_one_line_error(rc, err, "run", "tiny.onnx", "not a compiled .so")


def test_run_output_dir_missing(tiny_b1, tmp_path, capsys):
    np.save(tmp_path / "x.npy", _images(1))
    out = tmp_path / "nodir" / "y.npy"
    rc, _, err = run_cli(capsys, "run", tiny_b1["so"], "--input", tmp_path / "x.npy", "--output", out)
    assert_one_line_error(rc, err, "run", str(out), "does not exist")
    assert sorted(os.listdir(tmp_path)) == ["x.npy"]


def test_run_output_is_directory(tiny_b1, tmp_path, capsys):
    np.save(tmp_path / "x.npy", _images(1))
    out = tmp_path / "ydir"
    out.mkdir()
    rc, _, err = run_cli(capsys, "run", tiny_b1["so"], "--input", tmp_path / "x.npy", "--output", out)
    assert_one_line_error(rc, err, "run", str(out), "is a directory")
    assert sorted(os.listdir(tmp_path)) == ["x.npy", "ydir"] and os.listdir(out) == []


def test_compile_failure_while_writing_leaves_old_output(models, tmp_path, capsys, monkeypatch):
    """A failure after the temporary .so was written: the temp file is removed and an existing
    output is left untouched (write to a temp file, then rename)."""
    out = tmp_path / "m.so"
    out.write_bytes(b"previous build")

    def fail(path, mode):
        assert Path(path).stat().st_size > 0 and Path(path).name.startswith(".m.so.")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio, "_chmod_like_new_file", fail)
    rc, _, err = run_cli(capsys, "compile", models["tiny"], "-o", out, "--no-check")
    assert_one_line_error(rc, err, "compile", str(out), "No space left on device")
    assert out.read_bytes() == b"previous build"
    assert sorted(os.listdir(tmp_path)) == ["m.so"]
