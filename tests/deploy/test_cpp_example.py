"""The C++ example (tools/cpp_example), ``dsconv-tvm runtime-info`` and ``compile --bundle``.

* x86: the example is built with CMake against the ``runtime-info`` paths and runs a compiled
  ``.so`` with only the TVM runtime; its output equals the Python run of the same ``.so``.
* aarch64: the example is cross-built (toolchain file) against the aarch64 runtime (downloaded
  once from PyPI by dsconv_tvm.deploy.runtime) and runs the ``--target arm`` ``.so`` under qemu-user.
* ``--bundle``: the folder's content, ELF machines, building + running from inside the bundle, and
  the refusal to write into a non-empty folder.
* ``runtime-info --target rpi-armv7``: exit 2 with the explanation.
"""

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
from dsconv_tvm.host import elf_machine

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "tools" / "cpp_example"
SHAPE = [2, 1, 28, 28]              # compiled input shape (batch 2)
A64_SYSROOT = "/usr/aarch64-linux-gnu"

_missing = [t for t in ("cmake", "g++") if shutil.which(t) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"C++ example tests need {' and '.join(_missing)} "
                                                       f"(apt-get install cmake g++)")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def _cli_ok(*argv: str) -> str:
    rc, out, err = _cli(*argv)
    assert rc == 0, f"dsconv-tvm {' '.join(argv)} -> {rc}\n{out}\n{err}"
    return out


def _run(cmd, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc


def _run_ok(cmd, **kw) -> subprocess.CompletedProcess:
    proc = _run(cmd, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _cmake_build(src: Path, build: Path, *defs: str) -> Path:
    _run_ok(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", *defs])
    _run_ok(["cmake", "--build", build, "-j2"])
    exe = build / "dsconv_run"
    assert exe.is_file()
    return exe


def _top1(stdout: str) -> list[int]:
    rows = re.findall(r"^sample (\d+): (\d+):", stdout, re.M)
    assert rows, stdout
    assert [int(r[0]) for r in rows] == list(range(len(rows)))
    return [int(r[1]) for r in rows]


def _predict(so: Path, x: np.ndarray) -> np.ndarray:
    from dsconv_tvm.execute.runner import predict

    return predict(str(so), x)


def _tiny_onnx(path: Path) -> Path:
    """conv -> relu -> conv (s2) -> relu -> GlobalAveragePool -> Flatten -> Gemm, input [N,1,28,28]."""
    rng = np.random.default_rng(0)

    def init(name, arr):
        return numpy_helper.from_array(np.asarray(arr, np.float32), name)

    inits = [init("W1", rng.standard_normal((8, 1, 3, 3)) * 0.3), init("B1", rng.standard_normal(8) * 0.1),
             init("W2", rng.standard_normal((16, 8, 3, 3)) * 0.15), init("B2", rng.standard_normal(16) * 0.1),
             init("Wf", rng.standard_normal((10, 16)) * 0.3), init("Bf", rng.standard_normal(10) * 0.1)]
    nodes = [helper.make_node("Conv", ["input", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2],
                              name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["gp"]),
             helper.make_node("Flatten", ["gp"], ["fl"]),
             helper.make_node("Gemm", ["fl", "Wf", "Bf"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _compile(model: Path, target: str, out: Path, *extra: str) -> Path:
    _cli_ok("compile", str(model), "--target", target, "--input-shapes", f"input:{SHAPE}".replace(" ", ""),
            "-o", str(out), *extra)
    assert out.is_file()
    return out


# --------------------------------------------------------------------------------------------------
# fixtures (module scope: every model is compiled and every program built once)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cpp_example")


@pytest.fixture(scope="module")
def model(work) -> Path:
    return _tiny_onnx(work / "tiny.onnx")


@pytest.fixture(scope="module")
def x4(work) -> Path:
    path = work / "x4.npy"
    np.save(path, np.random.default_rng(1).random([4, *SHAPE[1:]]).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def x86_so(model, work) -> Path:
    return _compile(model, "x86", work / "tiny_x86.so")


@pytest.fixture(scope="module")
def x86_exe(work) -> Path:
    cmake_dir = _cli_ok("runtime-info", "--cmake-dir").strip()
    return _cmake_build(EXAMPLE, work / "build-x86", f"-DDSCONV_TVM_RUNTIME_DIR={cmake_dir}")


# --------------------------------------------------------------------------------------------------
# runtime-info
# --------------------------------------------------------------------------------------------------
def test_runtime_info_host_paths():
    inc = Path(_cli_ok("runtime-info", "--include-dir").strip())
    lib = Path(_cli_ok("runtime-info", "--lib-dir").strip())
    cmake_dir = Path(_cli_ok("runtime-info", "--cmake-dir").strip())
    info = json.loads(_cli_ok("runtime-info", "--json"))
    assert (inc / "tvm" / "ffi" / "function.h").is_file() and (inc / "dlpack" / "dlpack.h").is_file()
    for name in ("libtvm_runtime.so", "libtvm_ffi.so"):
        assert elf_machine(str(lib / name)) == "x86-64"
    assert (cmake_dir / "DSConvTVMRuntimeConfig.cmake").is_file()
    assert info["arch"] == "x86_64" and Path(info["lib_dir"]) == lib and Path(info["include_dir"]) == inc
    # the links point into the installed wheels
    import tvm_ffi
    assert (lib / "libtvm_ffi.so").resolve() == (Path(tvm_ffi.__file__).parent / "lib" / "libtvm_ffi.so").resolve()


def test_runtime_info_armv7_explains(tmp_path):
    env = {**os.environ, "DSCONV_TVM_CACHE": str(tmp_path / "cache")}
    proc = _run([sys.executable, "-m", "dsconv_tvm.cli", "runtime-info", "--target", "rpi-armv7"], env=env,
                timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsconv-tvm runtime-info: error: "), proc.stderr
    msg = lines[0]
    for part in ("no armv7 wheel", "source", "cmake", "--target tvm_runtime", "arm-linux-gnueabihf-g++",
                 "libtvm_ffi.so", str(tmp_path / "cache" / "runtime" / "armv7")):
        assert part in msg, part
    assert "Traceback" not in proc.stderr


def test_runtime_info_unknown_target():
    rc, out, err = _cli("runtime-info", "--target", "nonesuch")
    assert rc == 2 and "unknown target 'nonesuch'" in err and out == ""


# --------------------------------------------------------------------------------------------------
# 1. x86: C++ == Python, bit for bit
# --------------------------------------------------------------------------------------------------
def test_x86_cpp_matches_python(x86_exe, x86_so, x4, work):
    out = work / "out_x86.npy"
    proc = _run_ok([x86_exe, x86_so, x4, "--output", out, "--repeat", "5", "--top-k", "3"])
    y_cpp = np.load(out)
    y_py = _predict(x86_so, np.load(x4))
    assert y_cpp.dtype == np.float32 and y_cpp.shape == y_py.shape == (4, 10)
    np.testing.assert_allclose(y_cpp, y_py, rtol=0, atol=1e-6)
    assert np.array_equal(y_cpp, y_py), "the same code on the same machine should be bitwise equal"
    assert _top1(proc.stdout) == [int(i) for i in np.argmax(y_py, axis=1)]
    assert re.search(r"^latency: median [0-9.]+ ms.* over 5 runs \(batch 2\)$", proc.stdout, re.M), proc.stdout
    assert "ran 4 samples in 2 calls of main (batch 2)" in proc.stdout


def test_x86_cpp_raw_input_and_output(x86_exe, x86_so, x4, work):
    x = np.load(x4)
    raw_in, raw_out = work / "x4.f32", work / "out.f32"
    x.tofile(raw_in)
    _run_ok([x86_exe, x86_so, raw_in, "--shape", "4,1,28,28", "--output", raw_out, "--repeat", "0"])
    y = np.fromfile(raw_out, dtype="<f4").reshape(4, 10)
    np.testing.assert_array_equal(y, _predict(x86_so, x))
    # without --shape: whole samples of the compiled sample shape
    proc = _run_ok([x86_exe, x86_so, raw_in, "--repeat", "0", "--top-k", "1"])
    assert len(_top1(proc.stdout)) == 4


@pytest.mark.parametrize("case", ["not_npy", "truncated", "float64", "bad_batch", "missing", "nan",
                                  "raw_bad_shape", "model_not_elf", "arm_model"])
def test_x86_cpp_bad_input(case, x86_exe, x86_so, x4, work, tmp_path):
    x = np.load(x4)
    model, inp, expect = x86_so, tmp_path / "in.npy", None
    if case == "not_npy":
        inp.write_text("hello"); expect = "not a .npy file"
    elif case == "truncated":
        inp.write_bytes(x4.read_bytes()[:-10]); expect = "truncated"
    elif case == "float64":
        np.save(inp, x.astype(np.float64)); expect = "dtype '<f8' is not supported"
    elif case == "bad_batch":
        np.save(inp, x[:3]); expect = "multiple of 2"
    elif case == "missing":
        inp = tmp_path / "nope.npy"; expect = "cannot open"
    elif case == "nan":
        x = x.copy(); x[1, 0, 2, 2] = np.nan; np.save(inp, x); expect = "NaN"
    elif case == "raw_bad_shape":
        inp = tmp_path / "in.f32"; x.tofile(inp)
        proc = _run([x86_exe, model, inp, "--shape", "4,1,28,27"])
        assert proc.returncode == 2 and "--shape [4,1,28,27] needs" in proc.stderr
        return
    elif case == "model_not_elf":
        model = x4; inp = x4; expect = "not a shared library"
    elif case == "arm_model":
        model = tmp_path / "fake_arm.so"
        head = bytearray(b"\x7fELF\x02\x01\x01" + bytes(13)); head[18:20] = (0xB7).to_bytes(2, "little")
        model.write_bytes(bytes(head) + bytes(100)); inp = x4; expect = "is an AArch64 library"
    proc = _run([x86_exe, model, inp, "--repeat", "0"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsconv_run: error: ") and expect in lines[0], proc.stderr
    assert "sample 0" not in proc.stdout


# --------------------------------------------------------------------------------------------------
# 2. aarch64: cross-built, run under qemu-user
# --------------------------------------------------------------------------------------------------
def _need_cross():
    missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64-static") if shutil.which(t) is None]
    if missing or not Path(A64_SYSROOT, "lib", "libstdc++.so.6").exists():
        pytest.skip(f"aarch64 test needs {', '.join(missing) or A64_SYSROOT + '/lib/libstdc++.so.6'} "
                    f"(apt-get install g++-aarch64-linux-gnu qemu-user-static)")


@pytest.fixture(scope="module")
def arm_bundle(model, work) -> Path:
    """compile --target arm --bundle (fetches the aarch64 runtime from PyPI once)."""
    _need_cross()
    _compile(model, "arm", work / "tiny_arm.so", "--bundle", str(work / "bundle_arm"))
    return work / "bundle_arm"


def test_aarch64_cross_build_under_qemu(arm_bundle, x86_so, x4, work):
    _need_cross()
    cmake_dir = _cli_ok("runtime-info", "--target", "arm", "--cmake-dir").strip()
    lib_dir = _cli_ok("runtime-info", "--target", "arm", "--lib-dir").strip()
    for name in ("libtvm_runtime.so", "libtvm_ffi.so"):
        assert elf_machine(str(Path(lib_dir) / name)) == "AArch64"
    exe = _cmake_build(EXAMPLE, work / "build-a64", f"-DCMAKE_TOOLCHAIN_FILE={EXAMPLE / 'aarch64-toolchain.cmake'}",
                       f"-DDSCONV_TVM_RUNTIME_DIR={cmake_dir}")
    assert elf_machine(str(exe)) == "AArch64"
    so = work / "tiny_arm.so"
    assert elf_machine(str(so)) == "AArch64"
    out = work / "out_a64.npy"
    env = {**os.environ, "QEMU_LD_PREFIX": A64_SYSROOT, "LD_LIBRARY_PATH": lib_dir}
    proc = _run_ok(["qemu-aarch64-static", exe, so, x4, "--output", out, "--repeat", "2"], env=env)
    y_arm = np.load(out)
    y_x86 = _predict(x86_so, np.load(x4))
    assert y_arm.shape == y_x86.shape
    scale = float(np.max(np.abs(y_x86)))
    assert np.max(np.abs(y_arm - y_x86)) <= 1e-4 * scale, (y_arm, y_x86)
    assert np.array_equal(np.argmax(y_arm, axis=1), np.argmax(y_x86, axis=1))
    assert _top1(proc.stdout) == [int(i) for i in np.argmax(y_x86, axis=1)]


# --------------------------------------------------------------------------------------------------
# 3. --bundle
# --------------------------------------------------------------------------------------------------
_BUNDLE_FILES = ["lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "include/tvm/ffi/function.h",
                 "include/dlpack/dlpack.h", "DSConvTVMRuntimeConfig.cmake", "src/CMakeLists.txt",
                 "src/dsconv_run.cc", "src/aarch64-toolchain.cmake", "README.txt", "sample_input.npy",
                 "bundle.json"]


def _check_bundle(d: Path, so_name: str, machine: str):
    for rel in [so_name, *_BUNDLE_FILES]:
        assert (d / rel).is_file(), rel
        assert not (d / rel).is_symlink(), rel
    for rel in (so_name, "lib/libtvm_runtime.so", "lib/libtvm_ffi.so"):
        assert elf_machine(str(d / rel)) == machine, rel
    x = np.load(d / "sample_input.npy")
    assert x.dtype == np.float32 and list(x.shape) == SHAPE
    meta = json.loads((d / "bundle.json").read_text())
    assert meta["model"] == so_name and meta["input_shapes"] == {"input": SHAPE}
    readme = (d / "README.txt").read_text()
    assert "cmake -S src -B build" in readme and f"./build/dsconv_run ./{so_name} sample_input.npy" in readme
    assert "LD_LIBRARY_PATH" in readme
    assert not list(d.parent.glob(f".{d.name}.*")), "temporary folders left behind"


def test_bundle_x86_builds_and_runs_inside(model, work):
    from dsconv_tvm.target import get_target

    d = work / "bundle_x86"
    _compile(model, "x86", work / "tiny_x86_b.so", "--bundle", str(d))
    _check_bundle(d, "tiny_x86_b.so", get_target("x86").elf_machine)
    # build from inside the bundle: src/CMakeLists.txt finds the runtime in .. by itself
    exe = _cmake_build(d / "src", d / "build")
    out = d / "out.npy"
    proc = _run_ok([exe, "./tiny_x86_b.so", "sample_input.npy", "--output", out, "--repeat", "1"], cwd=d,
                   env={k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"})
    ref = _predict(d / "tiny_x86_b.so", np.load(d / "sample_input.npy"))
    np.testing.assert_array_equal(np.load(out), ref)
    assert _top1(proc.stdout) == [int(i) for i in np.argmax(ref, axis=1)]
    # the program uses the bundle's own copies of the libraries (rpath $ORIGIN/../lib)
    ldd = _run(["ldd", exe], env={**os.environ, "LD_LIBRARY_PATH": ""})
    if ldd.returncode == 0:
        assert "not found" not in ldd.stdout


def test_bundle_arm_content(arm_bundle):
    from dsconv_tvm.target import get_target

    _check_bundle(arm_bundle, "tiny_arm.so", get_target("arm").elf_machine)
    readme = (arm_bundle / "README.txt").read_text()
    assert "aarch64-toolchain.cmake" in readme and "qemu-aarch64-static" in readme


def test_bundle_into_non_empty_dir_fails(model, work, tmp_path):
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    so = tmp_path / "m.so"
    rc, out, err = _cli("compile", str(model), "--target", "x86", "-o", str(so), "--bundle", str(d))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsconv-tvm compile: error: ") and "not empty" in lines[0]
    assert "--force" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"], "nothing else written (no .so, no temp dir)"
    assert [p.name for p in d.iterdir()] == ["keep.txt"] and (d / "keep.txt").read_text() == "mine"
    # --force does not remove what a bundle did not write: the user's folder is left as it is
    rc, out, err = _cli("compile", str(model), "--target", "x86", "-o", str(so), "--bundle", str(d), "--force")
    assert rc == 2 and "not a bundle written by dsconv-tvm" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in d.iterdir()] == ["keep.txt"] and (d / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    # a bundle of its own is replaced by --force
    b = tmp_path / "b2"
    _compile(model, "x86", so, "--bundle", str(b))
    assert (b / ".dsconv-bundle").is_file()
    _compile(model, "x86", so, "--bundle", str(b), "--force")
    assert (b / "m.so").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b2", "bundle", "m.so"]
    # ... but not once the user has put a file of theirs into it (a build folder)
    (b / "build").mkdir()
    (b / "build" / "dsconv_run").write_text("user's build")
    rc, out, err = _cli("compile", str(model), "--target", "x86", "-o", str(so), "--bundle", str(b), "--force")
    assert rc == 2 and "build/dsconv_run" in err
    assert (b / "build" / "dsconv_run").read_text() == "user's build" and (b / "m.so").is_file()


def test_bundle_bad_places(model, tmp_path, monkeypatch):
    monkeypatch.setenv("DSCONV_TVM_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = _cli("compile", str(model), "-o", str(tmp_path / "a.so"), "--bundle", str(f))
    assert rc == 2 and "not a directory" in err
    rc, _, err = _cli("compile", str(model), "-o", str(tmp_path / "a.so"), "--bundle", str(tmp_path / "no" / "b"))
    assert rc == 2 and "does not exist" in err
    rc, _, err = _cli("compile", str(model), "-o", str(tmp_path / "b" / "a.so"), "--bundle", str(tmp_path / "b"))
    assert rc == 2 and "inside the bundle" in err
    rc, _, err = _cli("compile", str(model), "--target", "rpi-armv7", "-o", str(tmp_path / "a.so"),
                      "--bundle", str(tmp_path / "c"))
    assert rc == 2 and "no armv7 wheel" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
