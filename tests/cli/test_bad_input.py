"""The bad-input battery (issue 12): each class of fault run through the CLI as a user would (a
subprocess), asserting the promise: exit code 2 (130/143 when interrupted) with one line naming
the problem, no traceback, the user's files untouched, no file left behind (next to the output or
in the temporary directory).  The services (nothing hangs, nothing leaks, the board server heals)
are tested in tests/remote/test_remote.py."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent.parent
TIMEOUT = 120


def _model(path, w0=None, wf=None, var=None, shape=(1, 8, 8, 8)):
    """conv1 -> relu1 -> bn1 (kept: after a ReLU) -> pool -> fc (Gemm, kept in fp32)."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) if w0 is None else w0
    wf = rng.standard_normal((10, 16)).astype(np.float32) if wf is None else wf
    var = np.ones(16, np.float32) if var is None else var
    inits = [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(wf, "wf"),
             numpy_helper.from_array(np.ones(16, np.float32), "g"),
             numpy_helper.from_array(np.zeros(16, np.float32), "b"),
             numpy_helper.from_array(np.zeros(16, np.float32), "m"), numpy_helper.from_array(var, "v")]
    n = helper.make_node
    nodes = [n("Conv", ["input", "w0"], ["c"], pads=[1, 1, 1, 1], name="conv1"),
             n("Relu", ["c"], ["r"], name="relu1"),
             n("BatchNormalization", ["r", "g", "b", "m", "v"], ["bn"], name="bn1"),
             n("GlobalAveragePool", ["bn"], ["p"]), n("Flatten", ["p"], ["f"]),
             n("Gemm", ["f", "wf"], ["y"], transB=1, name="fc")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape[0], 10])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
    return str(path)


def _w0():
    return np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(np.float32)


def _env(tmpdir):
    env = dict(os.environ)
    env["TMPDIR"] = str(tmpdir)          # whatever the tool leaves in the temp dir is seen here
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _cli(*argv, cwd, tmpdir, timeout=TIMEOUT):
    p = subprocess.run([sys.executable, "-m", "dsconv_tvm.cli", *map(str, argv)], capture_output=True,
                       text=True, cwd=cwd, env=_env(tmpdir), timeout=timeout, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


def _one_error(err: str, verb: str) -> str:
    """The error line; asserts it is the last line, starts as promised, and no traceback."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"dsconv-tvm {verb}: error: "), err
    return last


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def work(tmp_path):
    """(work dir, private temp dir); the temp dir must be empty after each case."""
    d, t = tmp_path / "work", tmp_path / "tmp"
    d.mkdir()
    t.mkdir()
    yield d, t
    assert not list(t.iterdir()), f"left in the temp dir: {list(t.iterdir())}"


@pytest.fixture(scope="module")
def host_so(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input_so")
    model = _model(d / "ok.onnx")
    rc, _o, err = _cli("compile", model, "-o", d / "ok.so", "--no-check", cwd=d, tmpdir=d)
    assert rc == 0, err
    return d / "ok.so"


# ------------------------------------------------------------------------------------------------
# 3. no output clobbers an input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["same", "hardlink", "symlink"])
def test_compile_output_is_the_input(work, case):
    d, t = work
    model = _model(d / "m.onnx")
    before = _sha(model)
    out = {"same": d / "m.onnx", "hardlink": d / "link.so", "symlink": d / "sym.so"}[case]
    if case == "hardlink":
        os.link(model, out)
    elif case == "symlink":
        os.symlink(model, out)
    rc, _o, err = _cli("compile", model, "-o", out, cwd=d, tmpdir=t)
    assert rc == 2
    assert "it is the input" in _one_error(err, "compile")
    assert _sha(model) == before
    assert sorted(p.name for p in d.iterdir()) == sorted({"m.onnx", out.name})


@pytest.mark.parametrize("name", ["m.tar", "m.onnx.out", "m"])
def test_compile_output_must_be_a_shared_library(work, name):
    d, t = work
    model = _model(d / "m.onnx")
    rc, _o, err = _cli("compile", model, "-o", d / name, cwd=d, tmpdir=t)
    assert rc == 2 and "must end in .so" in _one_error(err, "compile")
    assert [p.name for p in d.iterdir()] == ["m.onnx"]


def test_run_output_is_its_input(work, host_so):
    d, t = work
    x = d / "x.npy"
    np.save(x, np.zeros((1, 8, 8, 8), np.float32))
    before = _sha(x)
    rc, _o, err = _cli("run", host_so, "-i", x, "-o", x, cwd=d, tmpdir=t)
    assert rc == 2 and "it is the input" in _one_error(err, "run")
    assert _sha(x) == before


def test_bundle_force_never_removes_user_files(work):
    d, t = work
    model = _model(d / "m.onnx")
    mine = d / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    rc, _o, err = _cli("compile", model, "-o", d / "m.so", "--bundle", mine, "--force", cwd=d, tmpdir=t)
    assert rc == 2 and "not a bundle written by dsconv-tvm" in _one_error(err, "compile")
    assert (mine / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in d.iterdir()) == ["m.onnx", "mine"]


# ------------------------------------------------------------------------------------------------
# 4. non-finite or absurd values, sizes over int32: one error naming the node, before TVM
# ------------------------------------------------------------------------------------------------
def _nan_conv(d):
    w = _w0()
    w[3, 2, 1, 1] = np.nan
    return _model(d / "m.onnx", w0=w)


def _inf_fc(d):
    wf = np.ones((10, 16), np.float32)
    wf[2, 3] = -np.inf
    return _model(d / "m.onnx", wf=wf)


def _nan_bn(d):
    v = np.ones(16, np.float32)
    v[5] = np.nan
    return _model(d / "m.onnx", var=v)


def _neg_bn(d):
    v = np.ones(16, np.float32)
    v[1] = -4.0
    return _model(d / "m.onnx", var=v)


def _absurd(d):
    return _model(d / "m.onnx", w0=np.full((16, 8, 3, 3), 3e37, np.float32))


def _big_input(d):
    return _model(d / "m.onnx", shape=(1, 8, 40000, 40000))


@pytest.mark.parametrize("make, needles", [
    (_nan_conv, ["node 'conv1' (Conv): weight 'w0'", "nan", "(3, 2, 1, 1)"]),
    (_inf_fc, ["node 'fc' (Gemm): weight 'wf'", "-inf"]),
    (_nan_bn, ["node 'bn1' (BatchNormalization): variance 'v'", "nan"]),
    (_neg_bn, ["node 'bn1'", "negative variance"]),
    (_absurd, ["node 'conv1'", "not a weight"]),
    (_big_input, ["input 'input'", "2^31 - 1"]),
])
def test_bad_values_are_one_error_naming_the_node(work, make, needles):
    d, t = work
    model = make(d)
    t0 = time.time()
    rc, _o, err = _cli("compile", model, "-o", d / "m.so", "--first-layer", "dsconv", cwd=d, tmpdir=t)
    line = _one_error(err, "compile")
    assert rc == 2 and all(n in line for n in needles), line
    assert "loaded" not in err                   # before any TVM work
    assert [p.name for p in d.iterdir()] == ["m.onnx"]
    assert time.time() - t0 < 60


def test_error_raised_inside_the_dsconv_pass_is_the_tools_error(work):
    """Finite weights whose KDS scales do not fit float16: the quantizer's error, raised inside
    the TVM pass, comes back as one line naming the layer (not a RuntimeError traceback)."""
    d, t = work
    model = _model(d / "m.onnx", w0=_w0() * 1e6)
    rc, _o, err = _cli("compile", model, "-o", d / "m.so", "--first-layer", "dsconv", "--scale-dtype",
                       "float16", cwd=d, tmpdir=t)
    line = _one_error(err, "compile")
    assert rc == 2 and "layer 'conv1'" in line and "float16" in line
    assert [p.name for p in d.iterdir()] == ["m.onnx"]


def test_input_shapes_over_int32(work):
    d, t = work
    model = _model(d / "m.onnx", shape=("N", 8, 8, 8))
    rc, _o, err = _cli("compile", model, "-o", d / "m.so", "--input-shapes", "input:[5000000,8,8,8]",
                       cwd=d, tmpdir=t)
    assert rc == 2 and "2^31 - 1" in _one_error(err, "compile")


# ------------------------------------------------------------------------------------------------
# 5. interrupts: 130 / 143, one line, nothing left
# ------------------------------------------------------------------------------------------------
def _interrupt(argv, d, t, sig, after: str, timeout=TIMEOUT):
    err = d.parent / f"err-{sig}.log"
    with open(err, "w") as fh:
        p = subprocess.Popen([sys.executable, "-m", "dsconv_tvm.cli", *map(str, argv)], stdout=subprocess.DEVNULL,
                             stderr=fh, cwd=d, env=_env(t), stdin=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while after not in err.read_text():
            assert p.poll() is None, err.read_text()
            assert time.time() - t0 < timeout, err.read_text()
            time.sleep(0.05)
        p.send_signal(sig)
        rc = p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
    return rc, err.read_text()


@pytest.mark.parametrize("sig, after", [(signal.SIGINT, "loaded"), (signal.SIGTERM, "compiling for")])
def test_interrupted_compile(work, sig, after):
    d, t = work
    model = _model(d / "m.onnx")
    rc, err = _interrupt(["compile", model, "-o", d / "m.so", "--first-layer", "dsconv"], d, t, sig, after)
    assert rc == 128 + sig, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert err.strip().splitlines()[-1] == f"dsconv-tvm compile: interrupted ({signal.Signals(sig).name})"
    assert [p.name for p in d.iterdir()] == ["m.onnx"]          # no .so, no temporary file


def test_interrupted_tune_keeps_valid_records(work):
    from dsconv_tvm.driver.database import check_database

    d, t = work
    model = _model(d / "m.onnx")
    rc, err = _interrupt(["tune", model, "--trials", 64, "--trials-per-iter", 2, "--work-dir", d / "db",
                          "--first-layer", "dsconv"], d, t, signal.SIGINT, "tune [")
    assert rc == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dsconv-tvm tune: interrupted (SIGINT); the records measured so far are kept")
    db = check_database(str(d / "db"))
    assert db.skipped == 0 and len(db.records) >= 1


# ------------------------------------------------------------------------------------------------
# 6. damaged libraries: exit 2, not SIGBUS
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", ["tail", "header", "zeros"])
def test_damaged_library(work, host_so, cut):
    d, t = work
    data = host_so.read_bytes()
    lib = d / "bad.so"
    lib.write_bytes({"half": data[:len(data) // 2], "tail": data[:-64], "header": data[:40], "empty": b"",
                     "zeros": data[:64] + bytes(len(data) - 64)}[cut])
    np.save(d / "x.npy", np.zeros((1, 8, 8, 8), np.float32))
    for argv in (["run", lib, "-i", d / "x.npy"], ["bench", lib, "--repeat", 1]):
        rc, _o, err = _cli(*argv, cwd=d, tmpdir=t)
        assert rc == 2, (argv, rc, err)
        assert "bad.so" in _one_error(err, argv[0])


# ------------------------------------------------------------------------------------------------
# 7. damaged tuning databases
# ------------------------------------------------------------------------------------------------
def test_damaged_tuning_db_loads_the_good_records_and_is_repaired(work):
    from dsconv_tvm.driver.database import check_database

    d, t = work
    db = d / "db"
    db.mkdir()
    # a small database: the first 4 workloads of the shipped x86-avx2 archive and their records, in
    # the JSON database format `tune` writes (a workload line each, then `[index, record]` lines)
    with zipfile.ZipFile(REPO / "schedules" / "x86-avx2" / "schedules.zip") as z:
        hashes = sorted(n[:-len(".workload.json")] for n in z.namelist() if n.endswith(".workload.json"))[:4]
        workloads = [z.read(f"{h}.workload.json").decode().strip() for h in hashes]
        records = [f"[{i}, {z.read(f'{h}.record.json').decode().strip()}]" for i, h in enumerate(hashes)]
    (db / "database_workload.json").write_text("".join(w + "\n" for w in workloads))
    rec = db / "database_tuning_record.json"
    rec.write_text("".join(r + "\n" for r in records))
    good = len(rec.read_text().splitlines())
    assert good >= 2
    text = rec.read_text().rstrip("\n")
    rec.write_text(text[:-300])                                 # a half-written last record
    model = _model(d / "m.onnx")
    rc, _o, err = _cli("compile", model, "-o", d / "m.so", "--tuning-db", db, "--no-check", cwd=d, tmpdir=t)
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: tuning database")]
    assert len(warnings) == 1 and "skipped 1 damaged line" in warnings[0]
    assert f"kept {good - 1} records" in warnings[0]
    rc, out, err = _cli("tune", "--repair-db", db, cwd=d, tmpdir=t)
    assert rc == 0 and f"{good - 1} records kept, 1 damaged line removed" in out, err
    assert check_database(str(db)).skipped == 0 and rec.read_text().endswith("\n")
    rc, _o, err = _cli("compile", model, "-o", d / "m.so", "--tuning-db", db, "--no-check", cwd=d, tmpdir=t)
    assert rc == 0 and "warning" not in err


# ------------------------------------------------------------------------------------------------
# 9. a plain install: onnxruntime is a dependency, a missing one is one line; the LICENSE ships
# ------------------------------------------------------------------------------------------------
def test_packaging_has_onnxruntime_and_license():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert any(dep.split("=")[0].split(">")[0].strip() == "onnxruntime" for dep in meta["project"]["dependencies"])
    assert "LICENSE" in meta["tool"]["setuptools"]["license-files"]
    assert "Apache License" in (REPO / "LICENSE").read_text()


@pytest.mark.parametrize("verb", ["eval", "adapt"])
def test_missing_onnxruntime_is_one_line_before_compiling(work, verb):
    d, t = work
    model = _model(d / "m.onnx")
    np.save(d / "x.npy", np.zeros((4, 8, 8, 8), np.float32))
    code = ("import sys; sys.modules['onnxruntime'] = None; from dsconv_tvm.cli.main import main; "
            "sys.exit(main(sys.argv[1:]))")
    extra = ["-o", d / "a.onnx"] if verb == "adapt" else []
    p = subprocess.run([sys.executable, "-c", code, verb, model, "--images", d, *extra], capture_output=True,
                       text=True, cwd=d, env=_env(t), timeout=TIMEOUT)
    line = _one_error(p.stderr, verb)
    assert p.returncode == 2 and "pip install onnxruntime" in line
    assert "loaded" not in p.stderr
