"""NVRTC 11.8 (pip packages, extra ``cuda``) through ctypes: CUDA C source -> PTX, and ptxas 11.8 as a
check of the PTX for an arch."""

from __future__ import annotations

import ctypes
import functools
import re
import subprocess
import tempfile
from pathlib import Path

from ...errors import TargetError
from .arch import sm_version

#: NVRTC 11.8 (the newest CUDA that still compiles for sm_53 and sm_72) from PyPI.
NVRTC_HINT = ("install the CUDA compiler packages with: pip install 'dsconv-tvm[cuda]' "
              "(NVRTC 11.8 and ptxas 11.8 wheels, about 46 MB)")


def _package_dir(name: str) -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(f"nvidia.{name}")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=1)
def _nvrtc():
    d = _package_dir("cuda_nvrtc")
    libs = sorted((d / "lib").glob("libnvrtc.so.*")) if d else []
    if not libs:
        raise TargetError(f"NVRTC 11.8 not found; {NVRTC_HINT}")
    lib = ctypes.CDLL(str(libs[0]))
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def nvrtc_available() -> bool:
    try:
        _nvrtc()
        return True
    except (TargetError, OSError):
        return False


def nvrtc_version() -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


def _include_dirs() -> list[str]:
    dirs = []
    for name in ("cuda_runtime", "cuda_cccl"):
        d = _package_dir(name)
        if d and (d / "include").is_dir():
            dirs.append(str(d / "include"))
    return dirs


def compile_ptx(source: str, arch: str, name: str = "dsconv.cu") -> str:
    """CUDA C source -> PTX for ``arch`` with NVRTC (``.target sm_XY``)."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()

    def check(status, what):
        if status != 0:
            raise TargetError(f"NVRTC {what} failed: {lib.nvrtcGetErrorString(status).decode()}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
          "create program")
    try:
        opts = [f"--gpu-architecture=compute_{sm_version(arch)}", "--std=c++17", "-default-device",
                "--use_fast_math"] + [f"-I{d}" for d in _include_dirs()]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        status = lib.nvrtcCompileProgram(prog, len(opts), arr)
        if status != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            lines = [ln for ln in log.value.decode(errors="replace").splitlines() if "error" in ln]
            raise TargetError(f"NVRTC could not compile the CUDA kernels for {arch}: "
                              f"{lines[0].strip() if lines else lib.nvrtcGetErrorString(status).decode()}")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "PTX size")
        buf = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetPTX(prog, buf), "PTX")
        return buf.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def set_ptx_version(ptx: str, version: str | None) -> str:
    """Lower the PTX ISA ``.version`` line to what the board's driver accepts (e.g. JetPack 4.6 /
    CUDA 10.2: 6.5); left alone when ``version`` is None or not lower."""
    if not version:
        return ptx
    m = re.search(r"^\.version (\d+)\.(\d+)", ptx, re.M)
    if m is None:
        raise TargetError("NVRTC output has no .version line")
    have = (int(m.group(1)), int(m.group(2)))
    want = tuple(int(v) for v in version.split("."))
    if want >= have:
        return ptx
    return ptx[:m.start()] + f".version {version}" + ptx[m.end():]


def ptxas_path() -> str | None:
    d = _package_dir("cuda_nvcc")
    p = d / "bin" / "ptxas" if d else None
    return str(p) if p and p.is_file() else None


def assemble(ptx: str, arch: str) -> bytes:
    """ptxas 11.8 -> cubin: checks that the PTX (with its .version) is valid for ``arch``."""
    ptxas = ptxas_path()
    if ptxas is None:
        raise TargetError(f"ptxas 11.8 not found; {NVRTC_HINT}")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        src.write_text(ptx)
        try:
            res = subprocess.run([ptxas, f"-arch={arch}", str(src), "-o", str(out)],
                                 capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise TargetError(f"ptxas did not finish within 300 s for {arch}") from None
        if res.returncode != 0:
            raise TargetError(f"ptxas rejects the PTX for {arch}: {res.stderr.strip().splitlines()[:1]}")
        return out.read_bytes()
