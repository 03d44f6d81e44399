"""Where the TVM *runtime* (headers + ``libtvm_runtime.so`` + ``libtvm_ffi.so``) for a target lives.

A C++ program that runs a compiled ``.so`` needs only the TVM runtime, not the compiler.  This module
prepares, per target architecture, one *runtime directory* with the same layout everywhere::

    <dir>/include/                      tvm/ffi/*.h and dlpack/ (the tvm-ffi headers)
    <dir>/lib/libtvm_runtime.so         registers the Relax VM loader
    <dir>/lib/libtvm_ffi.so
    <dir>/DSConvTVMRuntimeConfig.cmake  the imported CMake target ``dsconv::tvm_runtime``
    <dir>/runtime.json                  what is in it (arch, versions, where it came from)

* host (x86-64): ``include`` and the two libraries are symbolic links into the installed
  ``apache-tvm`` / ``apache-tvm-ffi`` wheels (``tvm/lib``, ``tvm_ffi/lib``, ``tvm_ffi/include``);
* aarch64 (targets arm, rpi4, rpi5): downloaded once from PyPI with ``pip download`` (the aarch64
  wheels of the installed versions) and unpacked: only the two libraries and the headers are kept,
  not the 240 MB ``libtvm_compiler.so``;
* armv7 (rpi-armv7): there is no wheel; the user builds the runtime from the TVM source and puts it
  into ``<cache>/runtime/armv7`` (the error message says how).

The cache root is ``$DSCONV_TVM_CACHE`` or ``~/.cache/dsconv-tvm``; runtime directories are
``<cache>/runtime/<arch>`` (host: ``<cache>/runtime/x86_64-<hash of the wheel location>``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DSConvError
from ..fileio import atomic_write_text
from ..target import get_target

__all__ = ["RuntimeDir", "RuntimeUnavailable", "runtime_for_target", "runtime_for_arch", "target_arch", "cache_root",
           "CMAKE_CONFIG_NAME", "LIBRARIES"]

CMAKE_CONFIG_NAME = "DSConvTVMRuntimeConfig.cmake"
LIBRARIES = ("libtvm_runtime.so", "libtvm_ffi.so")

#: ELF machine (targets/*.json) -> architecture name used for runtime directories.
_ARCH_OF_MACHINE = {"x86-64": "x86_64", "AArch64": "aarch64", "ARM": "armv7"}
#: pip --platform tag of the wheels per downloadable architecture (the wheels are tagged
#: manylinux_2_27/2_28: "manylinux2014_aarch64" alone finds nothing).
_WHEEL_PLATFORM = {"aarch64": "manylinux_2_28_aarch64", "x86_64": "manylinux_2_28_x86_64"}
_FALLBACK_VERSIONS = {"apache-tvm": "0.27.0.post1", "apache-tvm-ffi": "0.1.14.post1"}


class RuntimeUnavailable(DSConvError):
    """The runtime for a target is not available (no wheel, download failed, ...)."""


@dataclass(frozen=True)
class RuntimeDir:
    arch: str
    path: Path
    source: str

    @property
    def include_dir(self) -> Path:
        return self.path / "include"

    @property
    def lib_dir(self) -> Path:
        return self.path / "lib"

    @property
    def cmake_dir(self) -> Path:
        return self.path

    def libraries(self) -> list[Path]:
        return [self.lib_dir / name for name in LIBRARIES]

    def info(self) -> dict:
        meta = _read_meta(self.path)
        return {"arch": self.arch, "dir": str(self.path), "include_dir": str(self.include_dir),
                "lib_dir": str(self.lib_dir), "cmake_dir": str(self.cmake_dir),
                "libraries": [str(p) for p in self.libraries()], "source": self.source,
                "versions": meta.get("versions", {})}


# --------------------------------------------------------------------------------------------------
def cache_root() -> Path:
    env = os.environ.get("DSCONV_TVM_CACHE")
    if env:
        return Path(env).expanduser().absolute()
    return Path.home() / ".cache" / "dsconv-tvm"


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64", "armv7l": "armv7"}.get(m, m)


def target_arch(target: str) -> str:
    spec = get_target(target)
    return _ARCH_OF_MACHINE[spec.elf_machine]


def installed_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist, fallback in _FALLBACK_VERSIONS.items():
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = fallback
    return out


def runtime_for_target(target: str, log=None) -> RuntimeDir:
    return runtime_for_arch(target_arch(target), target=target, log=log)


def runtime_for_arch(arch: str, target: str | None = None, log=None) -> RuntimeDir:
    """The prepared runtime directory for ``arch`` (creating / downloading it when needed)."""
    log = log or (lambda msg: None)
    if arch == host_arch():
        return _host_runtime()
    if arch in _WHEEL_PLATFORM:
        return _wheel_runtime(arch, log)
    if arch == "armv7":
        return _user_runtime(arch, target or "rpi-armv7")
    raise RuntimeUnavailable(f"no TVM runtime is known for architecture {arch}")


# --------------------------------------------------------------------------------------------------
# host: links into the installed wheels
# --------------------------------------------------------------------------------------------------
def _installed_paths() -> tuple[Path, Path, Path]:
    """(include dir, libtvm_runtime.so, libtvm_ffi.so) of the installed wheels (no ``import tvm``:
    the package locations are found without loading the 250 MB compiler library)."""
    import importlib.util

    found = {}
    for mod in ("tvm", "tvm_ffi"):
        spec = importlib.util.find_spec(mod)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeUnavailable(f"the Python package '{mod}' is not installed "
                                f"(pip install apache-tvm apache-tvm-ffi)")
        found[mod] = Path(list(spec.submodule_search_locations)[0])
    inc = found["tvm_ffi"] / "include"
    rt = found["tvm"] / "lib" / "libtvm_runtime.so"
    ffi = found["tvm_ffi"] / "lib" / "libtvm_ffi.so"
    for p in (inc / "tvm" / "ffi" / "function.h", rt, ffi):
        if not p.exists():
            raise RuntimeUnavailable(f"the installed TVM wheel has no {p}")
    return inc, rt, ffi


def _host_runtime() -> RuntimeDir:
    inc, rt, ffi = _installed_paths()
    key = hashlib.sha1(str(rt.resolve()).encode()).hexdigest()[:10]
    path = cache_root() / "runtime" / f"{host_arch()}-{key}"
    links = {"include": inc, "lib/libtvm_runtime.so": rt, "lib/libtvm_ffi.so": ffi}
    meta = {"arch": host_arch(), "source": f"installed wheels ({rt.parent.parent.parent})",
            "versions": installed_versions()}
    if not (_links_ok(path, links) and _read_meta(path) == meta
            and (path / "share" / "licenses").is_dir()):
        with cache_lock(path):
            (path / "lib").mkdir(parents=True, exist_ok=True)
            for rel, dest in links.items():
                link = path / rel
                tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                tmp.symlink_to(dest)
                os.replace(tmp, link)
            _copy_installed_licenses(path / "share" / "licenses")
            write_cmake_config(path, host_arch())
            _write_meta(path, meta)
    _ensure_cmake_config(path, host_arch())
    return RuntimeDir(host_arch(), path, meta["source"])


def _copy_installed_licenses(dest: Path) -> None:
    from importlib import metadata

    for dist in _FALLBACK_VERSIONS:
        try:
            files = metadata.distribution(dist).files or []
        except metadata.PackageNotFoundError:
            continue
        for f in files:
            name = Path(str(f)).name.upper()
            if ".dist-info" in str(f) and ("LICENSE" in name or "NOTICE" in name):
                src = Path(f.locate())
                if src.is_file():
                    out = dest / dist.replace("-", "_") / src.name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, out)


def _links_ok(path: Path, links: dict[str, Path]) -> bool:
    for rel, dest in links.items():
        p = path / rel
        if not p.is_symlink() or Path(os.readlink(p)) != dest:
            return False
    return True


# --------------------------------------------------------------------------------------------------
# aarch64: the PyPI wheels, unpacked once
# --------------------------------------------------------------------------------------------------
def _wheel_runtime(arch: str, log) -> RuntimeDir:
    path = cache_root() / "runtime" / arch
    versions = installed_versions()
    source = (f"PyPI wheels apache-tvm=={versions['apache-tvm']} apache-tvm-ffi=={versions['apache-tvm-ffi']} "
              f"({_WHEEL_PLATFORM[arch]})")
    if _complete(path, versions):
        _ensure_cmake_config(path, arch)
        return RuntimeDir(arch, path, source)
    with cache_lock(path):
        if _complete(path, versions):  # another process finished it while we waited
            return RuntimeDir(arch, path, source)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{arch}.", dir=path.parent))
        try:
            wheels = tmp / "wheels"
            log(f"downloading the {arch} TVM runtime wheels ({source}) into {path} ...")
            _pip_download(arch, versions, wheels)
            _unpack_runtime(wheels, tmp / "dir")
            write_cmake_config(tmp / "dir", arch)
            _write_meta(tmp / "dir", {"arch": arch, "source": source, "versions": versions})
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp / "dir", path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return RuntimeDir(arch, path, source)


def _complete(path: Path, versions: dict) -> bool:
    return (_read_meta(path).get("versions") == versions
            and all((path / "lib" / n).is_file() for n in LIBRARIES)
            and (path / "include" / "tvm" / "ffi" / "function.h").is_file()
            and (path / CMAKE_CONFIG_NAME).is_file())


def _pip_download(arch: str, versions: dict, dest: Path) -> None:
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--platform", _WHEEL_PLATFORM[arch],
           "--python-version", pyver, "-d", str(dest),
           f"apache-tvm=={versions['apache-tvm']}", f"apache-tvm-ffi=={versions['apache-tvm-ffi']}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise RuntimeUnavailable(f"pip did not download the {arch} TVM runtime within 900 s") from None
    except OSError as exc:
        raise RuntimeUnavailable(f"cannot run pip to download the {arch} TVM runtime: {exc}") from exc
    if proc.returncode != 0:
        lines = [l.strip() for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
        why = next((l for l in reversed(lines) if "ERROR" in l), lines[-1] if lines else "no output")
        raise RuntimeUnavailable(
            f"downloading the {arch} TVM runtime with pip failed ({why}); it needs PyPI access "
            f"(offline: put the two wheels in a folder and set PIP_NO_INDEX=1 PIP_FIND_LINKS=<folder>)")


def _unpack_runtime(wheels: Path, out: Path) -> None:
    """Only libtvm_runtime.so, libtvm_ffi.so, the tvm-ffi headers and the licenses."""
    wanted = {"tvm/lib/libtvm_runtime.so": "lib/libtvm_runtime.so",
              "tvm_ffi/lib/libtvm_ffi.so": "lib/libtvm_ffi.so"}
    got = set()
    (out / "lib").mkdir(parents=True)
    for whl in sorted(wheels.glob("*.whl")):
        dist = whl.name.split("-")[0]
        with zipfile.ZipFile(whl) as zf:
            for info in zf.infolist():
                name = info.filename
                if info.is_dir():
                    continue
                if name in wanted:
                    rel = wanted[name]
                elif name.startswith("tvm_ffi/include/") and not name.startswith("tvm_ffi/include/tvm_ffi_python"):
                    rel = "include/" + name[len("tvm_ffi/include/"):]
                elif ".dist-info/" in name and ("LICENSE" in name.upper() or "NOTICE" in name.upper()):
                    rel = f"share/licenses/{dist}/{Path(name).name}"
                else:
                    continue
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                if rel.startswith("lib/"):
                    os.chmod(target, 0o755)
                got.add(rel)
    missing = [r for r in wanted.values() if r not in got]
    if missing or not (out / "include" / "tvm" / "ffi" / "function.h").is_file():
        raise RuntimeUnavailable(f"the downloaded wheels in {wheels} lack "
                                 f"{', '.join(missing) or 'the tvm-ffi headers'}")


# --------------------------------------------------------------------------------------------------
# armv7: no wheel
# --------------------------------------------------------------------------------------------------
def _user_runtime(arch: str, target: str) -> RuntimeDir:
    """A runtime the user built from source and copied into ``<cache>/runtime/<arch>/lib``; the
    headers (architecture independent) are copied from the installed tvm-ffi wheel."""
    path = cache_root() / "runtime" / arch
    if all((path / "lib" / n).is_file() for n in LIBRARIES):
        with cache_lock(path):
            if not (path / "include" / "tvm" / "ffi" / "function.h").is_file():
                inc, _, _ = _installed_paths()
                shutil.copytree(inc, path / "include", dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("tvm_ffi_python*"))
            _ensure_cmake_config(path, arch)
            if not _read_meta(path):
                _write_meta(path, {"arch": arch, "source": "built by the user from the TVM source",
                                   "versions": installed_versions()})
        return RuntimeDir(arch, path, "built by the user from the TVM source")
    tag = "v" + installed_versions()["apache-tvm"].split(".post")[0]
    raise RuntimeUnavailable(
        f"target '{target}' ({arch}): there is no {arch} wheel of apache-tvm, so libtvm_runtime.so and "
        f"libtvm_ffi.so must be built from the TVM {tag} source (runtime target only, no LLVM): "
        f"git clone --recursive -b {tag} https://github.com/apache/tvm && cmake -S tvm -B tvm/build-{arch} "
        f"-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=armv7l "
        f"-DCMAKE_C_COMPILER=arm-linux-gnueabihf-gcc -DCMAKE_CXX_COMPILER=arm-linux-gnueabihf-g++ "
        f"-DCMAKE_BUILD_TYPE=Release -DUSE_LLVM=OFF && cmake --build tvm/build-{arch} --target tvm_runtime "
        f"-j4 (or natively on the Pi); then copy the libtvm_runtime.so and libtvm_ffi.so it produced into "
        f"{path}/lib/ and run this command again")


# --------------------------------------------------------------------------------------------------
# CMake config, metadata, locking
# --------------------------------------------------------------------------------------------------
_CMAKE_CONFIG = r"""# DSConvTVMRuntimeConfig.cmake -- generated by dsconv-tvm (dsconv_tvm/runtime.py).
# The TVM runtime for @ARCH@: headers in include/, libtvm_runtime.so + libtvm_ffi.so in lib/
# (paths relative to this file, so the directory can be moved or copied to a board).
# Use:  find_package(DSConvTVMRuntime CONFIG REQUIRED PATHS <this dir> NO_DEFAULT_PATH
#                    NO_CMAKE_FIND_ROOT_PATH)
#       target_link_libraries(app PRIVATE dsconv::tvm_runtime)
get_filename_component(_dsconv_rt_dir "${CMAKE_CURRENT_LIST_DIR}" ABSOLUTE)
set(DSConvTVMRuntime_ARCH "@ARCH@")
set(DSConvTVMRuntime_INCLUDE_DIR "${_dsconv_rt_dir}/include")
set(DSConvTVMRuntime_LIBRARY_DIR "${_dsconv_rt_dir}/lib")
foreach(_f include/tvm/ffi/function.h lib/libtvm_runtime.so lib/libtvm_ffi.so)
  if(NOT EXISTS "${_dsconv_rt_dir}/${_f}")
    set(DSConvTVMRuntime_FOUND FALSE)
    set(DSConvTVMRuntime_NOT_FOUND_MESSAGE "TVM runtime directory ${_dsconv_rt_dir} has no ${_f}")
    return()
  endif()
endforeach()
if(NOT TARGET dsconv::tvm_runtime)
  # The wheels' libraries have no SONAME: IMPORTED_NO_SONAME makes CMake link them as
  # -L<dir> -ltvm_runtime, so the program records "libtvm_runtime.so" (not an absolute path).
  add_library(dsconv::tvm_ffi_lib SHARED IMPORTED)
  set_target_properties(dsconv::tvm_ffi_lib PROPERTIES
    IMPORTED_LOCATION "${_dsconv_rt_dir}/lib/libtvm_ffi.so"
    IMPORTED_NO_SONAME TRUE
    INTERFACE_INCLUDE_DIRECTORIES "${_dsconv_rt_dir}/include")
  add_library(dsconv::tvm_runtime_lib SHARED IMPORTED)
  set_target_properties(dsconv::tvm_runtime_lib PROPERTIES
    IMPORTED_LOCATION "${_dsconv_rt_dir}/lib/libtvm_runtime.so"
    IMPORTED_NO_SONAME TRUE)
  add_library(dsconv::tvm_runtime INTERFACE IMPORTED)
  # libtvm_runtime.so registers the Relax VM loader but no symbol of it is referenced by the
  # program: --no-as-needed keeps it on toolchains that default to --as-needed.
  set_target_properties(dsconv::tvm_runtime PROPERTIES
    INTERFACE_COMPILE_FEATURES cxx_std_17
    INTERFACE_LINK_LIBRARIES "-Wl,--no-as-needed;dsconv::tvm_runtime_lib;dsconv::tvm_ffi_lib")
endif()
set(DSConvTVMRuntime_FOUND TRUE)
"""


def _ensure_cmake_config(path: Path, arch: str) -> None:
    """Rewrite the config file if it differs from this version's template."""
    try:
        current = (Path(path) / CMAKE_CONFIG_NAME).read_text(encoding="utf-8")
    except OSError:
        current = None
    if current != _CMAKE_CONFIG.replace("@ARCH@", arch):
        write_cmake_config(path, arch)


def write_cmake_config(path: Path, arch: str) -> Path:
    out = Path(path) / CMAKE_CONFIG_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(out), _CMAKE_CONFIG.replace("@ARCH@", arch))
    return out


def _read_meta(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "runtime.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_meta(path: Path, meta: dict) -> None:
    atomic_write_text(str(Path(path) / "runtime.json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def cache_lock(path: Path):
    """An exclusive lock per cache directory (parallel test runs / two compiles at once)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
