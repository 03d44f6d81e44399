"""Targets as data: the JSON files, host detection, cross export, ELF checks, error paths."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dsconv_tvm import host
from dsconv_tvm import target as T
from dsconv_tvm.errors import DSConvError, OutputError, TargetError

REQUIRED = ["x86", "x86-avx2", "x86-avx512", "x86-vnni", "arm", "rpi4", "rpi5", "rpi-armv7"]
EXPECTED_ELF = {
    "x86": "x86-64",
    "x86-avx2": "x86-64",
    "x86-avx512": "x86-64",
    "x86-vnni": "x86-64",
    "arm": "AArch64",
    "rpi4": "AArch64",
    "rpi5": "AArch64",
    "rpi-armv7": "ARM",
}

N, C, H, W, K = 1, 4, 8, 8, 8


# --------------------------------------------------------------------------------------------------
# data files
# --------------------------------------------------------------------------------------------------
def test_import_is_lazy():
    code = "import sys, dsconv_tvm.target as t; t.list_targets(); print('tvm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_required_targets_present():
    names = T.list_targets()
    assert names == sorted(names)
    for n in REQUIRED:
        assert n in names


@pytest.mark.parametrize("name", REQUIRED)
def test_target_file_loads(name):
    spec = T.get_target(name)
    assert spec.name == name
    assert spec.description
    assert spec.elf_machine == EXPECTED_ELF[name]
    assert spec.tvm_target_dict["kind"] == "llvm"
    if not spec.detect_host:
        assert isinstance(spec.tvm_target_dict["num-cores"], int)
    if spec.cross_compiler is None:
        assert spec.debian_package is None and spec.runs_on_host
    else:
        assert spec.debian_package and not spec.runs_on_host
    assert all(isinstance(f, str) for f in spec.features)


def test_every_json_file_loads():
    files = sorted(T.targets_dir().glob("*.json"))
    assert len(files) >= len(REQUIRED)
    for p in files:
        assert T.load_target_file(p).name == p.stem


def test_feature_table():
    assert T.get_target("x86").detect_host
    assert T.get_target("x86-vnni").has_feature("vnni")
    assert T.get_target("x86-avx512").has_feature("avx512")
    assert not T.get_target("x86-avx512").has_feature("vnni")
    assert not T.get_target("x86-avx2").has_feature("avx512f")
    assert T.get_target("rpi5").has_feature("dotprod")
    for n in ("arm", "rpi4", "rpi-armv7"):
        assert T.get_target(n).has_feature("neon")
        assert not T.get_target(n).has_feature("dotprod")
    d = T.get_target("rpi-armv7").tvm_target_dict
    assert d["mtriple"] == "armv7l-linux-gnueabihf" and d["mfloat-abi"] == "hard"


def test_unknown_target_lists_known():
    with pytest.raises(TargetError) as ei:
        T.get_target("foo")
    msg = str(ei.value)
    assert "unknown target 'foo'" in msg
    assert "known targets: " + ", ".join(T.list_targets()) in msg
    assert isinstance(ei.value, DSConvError) and "\n" not in msg


def test_bad_target_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text(json.dumps({"name": "broken", "description": "x"}))
    with pytest.raises(TargetError, match=r"broken\.json.*missing key.*tvm_target"):
        T.load_target_file(p)
    p.write_text("{not json")
    with pytest.raises(TargetError, match=r"broken\.json.*not valid JSON"):
        T.load_target_file(p)


# --------------------------------------------------------------------------------------------------
# host detection
# --------------------------------------------------------------------------------------------------
def test_host_target_uses_host_cpu():
    from tvm.target import codegen

    t = T.get_target("x86").tvm_target()
    assert str(t.kind.name) == "llvm"
    assert str(t.attrs["mcpu"]) == str(codegen.llvm_get_system_cpu())
    assert int(t.attrs["num-cores"]) == os.cpu_count()
    feats = host.host_features()
    assert set(feats) == set(host.HOST_FEATURE_NAMES)
    mattr = [str(a) for a in t.attrs.get("mattr", [])]
    for f, present in feats.items():
        if present:
            assert "+" + f in mattr
            assert codegen.llvm_cpu_has_features([f], t)


# --------------------------------------------------------------------------------------------------
# compile + export per target
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conv_mod():
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((N, C, H, W), "float32"))
    w = relax.Var("w", relax.TensorType((K, C, 3, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=1, padding=1))
            z = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(z)
    return bb.get()


def _conv_relu_ref(xs, ws):
    xp = np.pad(xs, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))
    return np.maximum(np.einsum("nchwij,kcij->nkhw", win, ws), 0)


@pytest.mark.parametrize("name", REQUIRED)
def test_compile_export_elf(name, conv_mod, tmp_path):
    import tvm
    from tvm import relax

    spec = T.get_target(name)
    if spec.cross_compiler and shutil.which(spec.cross_compiler) is None:
        pytest.skip(
            f"cross compiler {spec.cross_compiler} missing "
            f"(apt-get install {spec.debian_package}, or run tools/install_system_deps.sh)"
        )
    ex = tvm.compile(conv_mod, spec.tvm_target())
    so = tmp_path / f"conv_{name}.so"
    spec.export_library(ex, str(so))
    assert so.is_file()
    assert host.elf_machine(str(so)) == spec.elf_machine == EXPECTED_ELF[name]
    assert [p.name for p in tmp_path.iterdir()] == [so.name]  # no temp file left

    if not spec.runs_here():  # e.g. AVX-512 targets on an AVX2-only host: compile + export only
        return
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(so)), dev)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((N, C, H, W)).astype("float32")
    ws = rng.standard_normal((K, C, 3, 3)).astype("float32")
    out = vm["main"](tvm.runtime.tensor(xs, dev), tvm.runtime.tensor(ws, dev)).numpy()
    np.testing.assert_allclose(out, _conv_relu_ref(xs, ws), rtol=1e-4, atol=1e-4)


def test_elf_machine_rejects_non_elf(tmp_path):
    p = tmp_path / "x.so"
    p.write_bytes(b"not an elf file at all")
    with pytest.raises(ValueError):
        host.elf_machine(str(p))
    p.write_bytes(b"\x7fELF")
    with pytest.raises(ValueError):
        host.elf_machine(str(p))


# --------------------------------------------------------------------------------------------------
# error paths
# --------------------------------------------------------------------------------------------------
def test_missing_cross_compiler_names_package(tmp_path):
    spec = dataclasses.replace(T.get_target("rpi4"), cross_compiler="no-such-g++")
    with pytest.raises(TargetError) as ei:
        spec.check_toolchain()
    msg = str(ei.value)
    assert "'no-such-g++'" in msg and "'rpi4'" in msg
    assert "apt-get install g++-aarch64-linux-gnu" in msg

    class Boom:  # never reached: the toolchain check comes first
        def export_library(self, *a, **k):
            raise AssertionError("export_library called")

    with pytest.raises(TargetError):
        spec.export_library(Boom(), str(tmp_path / "a.so"))
    assert list(tmp_path.iterdir()) == []


def test_missing_host_compiler(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(T.shutil, "which", lambda *a, **k: None)
    with pytest.raises(TargetError, match=r"apt-get install g\+\+"):
        T.get_target("x86").check_toolchain()


def test_cross_toolchain_found():
    spec = T.get_target("rpi4")
    if shutil.which(spec.cross_compiler) is None:
        pytest.skip(f"{spec.cross_compiler} not installed")
    assert os.path.basename(spec.check_toolchain()) == spec.cross_compiler
    assert T.get_target("x86").check_toolchain() is None


class _FakeExecutable:
    """Stands in for a tvm.compile result: writes bytes to the given path (or fails)."""

    def __init__(self, fail=False):
        self.fail = fail
        self.calls = []

    def export_library(self, path, **kwargs):
        self.calls.append((path, kwargs))
        with open(path, "wb") as fh:
            fh.write(b"\x7fELF partial")
        if self.fail:
            raise RuntimeError("link failed")


def test_export_to_missing_directory(tmp_path):
    spec = T.get_target("x86")
    target = tmp_path / "no-such-dir" / "m.so"
    with pytest.raises(OutputError) as ei:
        spec.export_library(_FakeExecutable(), str(target))
    assert str(target) in str(ei.value)
    assert list(tmp_path.iterdir()) == []


def test_export_over_directory_cleans_temp(tmp_path):
    spec = T.get_target("x86")
    (tmp_path / "m.so").mkdir()  # rename onto a directory fails
    fake = _FakeExecutable()
    with pytest.raises(OutputError, match="m.so"):
        spec.export_library(fake, str(tmp_path / "m.so"))
    assert [p.name for p in tmp_path.iterdir()] == ["m.so"]
    tmp_used = fake.calls[0][0]
    assert os.path.dirname(tmp_used) == str(tmp_path) and tmp_used.endswith(".so")


def test_export_failure_cleans_temp(tmp_path):
    spec = T.get_target("rpi4")
    if shutil.which(spec.cross_compiler) is None:
        pytest.skip(f"{spec.cross_compiler} not installed")
    fake = _FakeExecutable(fail=True)
    with pytest.raises(RuntimeError, match="link failed"):
        spec.export_library(fake, str(tmp_path / "m.so"))
    assert list(tmp_path.iterdir()) == []
    assert fake.calls[0][1]["cc"].endswith("aarch64-linux-gnu-g++")


def test_export_replaces_existing(tmp_path):
    out = tmp_path / "m.so"
    out.write_bytes(b"old")
    T.get_target("x86").export_library(_FakeExecutable(), str(out))
    assert out.read_bytes() == b"\x7fELF partial"
    assert [p.name for p in tmp_path.iterdir()] == ["m.so"]
    assert os.stat(out).st_mode & 0o777 != 0o600  # not mkstemp's private mode
