"""``dsconv-tvm compile ... --bundle DIR``: a folder to copy to the board.

DIR holds everything needed to build and run the compiled model there with C++ only::

    DIR/<model>.so                     the compiled model
    DIR/lib/libtvm_runtime.so          the TVM runtime for the target's architecture
    DIR/lib/libtvm_ffi.so
    DIR/include/                       the tvm-ffi headers (tvm/ffi/*.h, dlpack/)
    DIR/DSConvTVMRuntimeConfig.cmake   the imported CMake target dsconv::tvm_runtime
    DIR/src/                           the C++ example (tools/cpp_example): CMakeLists.txt,
                                       dsconv_run.cc, toolchain files, README.md
    DIR/sample_input.npy               a sample input of the compiled shape
    DIR/README.txt                     the commands to build and run it
    DIR/bundle.json                    target, architecture, input shapes, versions
    DIR/share/licenses/                the Apache-2.0 licenses of the TVM wheels

It is written atomically: built in a temporary folder next to DIR, then renamed to DIR.  An
existing non-empty DIR is an error unless ``force``, and even then it is replaced only if it is a
bundle this tool wrote and holds nothing else: DIR/.dsconv-bundle lists the files written; a DIR
without it, or with any other file (a build folder, the user's files), is never removed.  The checks (and the
download of the target's runtime) run in :func:`prepare_bundle`, before the compile.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OutputError, check_interrupted
from ..target import get_target
from .runtime import (
    LIBRARIES,
    RuntimeDir,
    RuntimeUnavailable,
    installed_versions,
    runtime_for_target,
    write_cmake_config,
)

__all__ = ["prepare_bundle", "BundlePlan", "example_dir"]

_EXAMPLE_FILES = ("CMakeLists.txt", "dsconv_run.cc", "aarch64-toolchain.cmake",
                  "armv7-toolchain.cmake", "README.md")
_TOOLCHAIN = {"aarch64": "aarch64-toolchain.cmake", "armv7": "armv7-toolchain.cmake"}
_CROSS_PREFIX = {"aarch64": "aarch64-linux-gnu", "armv7": "arm-linux-gnueabihf"}
_QEMU = {"aarch64": "qemu-aarch64-static", "armv7": "qemu-arm-static"}


def example_dir() -> Path:
    """The C++ example's sources (``tools/cpp_example`` of the source tree)."""
    package = Path(__file__).resolve().parent.parent
    for cand in (package / "data" / "cpp_example", package.parent / "tools" / "cpp_example"):
        if (cand / "CMakeLists.txt").is_file() and (cand / "dsconv_run.cc").is_file():
            return cand
    raise OutputError("--bundle: the C++ example sources (tools/cpp_example) are not part of this "
                      "installation; install dsconv-tvm from its source tree")


@dataclass
class BundlePlan:
    directory: Path
    target: str
    force: bool
    runtime: RuntimeDir
    sources: Path

    def write(self, so_path: str, input_shapes: dict) -> Path:
        """Write the bundle for the compiled ``so_path`` (atomically); returns its path."""
        out = self.directory
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        trash = None
        try:
            self._fill(tmp, Path(so_path), input_shapes)
            os.chmod(tmp, 0o755)
            check_interrupted()
            if out.exists() and _non_empty(out):
                if not self.force:
                    raise OutputError(f"--bundle {out}: the directory is not empty "
                                      f"(use --force to replace it)")
                check_replaceable(out)
                trash = out.parent / f".{out.name}.old-{os.getpid()}"
                os.rename(out, trash)
            try:
                os.replace(tmp, out)  # replaces an empty directory too
            except OSError:
                if trash is not None:  # put the old bundle back
                    os.rename(trash, out)
                    trash = None
                raise
        except OSError as exc:
            raise OutputError(f"cannot write the bundle {out}: {exc.strerror or exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        return out

    # ---------------------------------------------------------------------------------------------
    def _fill(self, d: Path, so: Path, input_shapes: dict) -> None:
        rt = self.runtime
        shutil.copy2(so, d / so.name)
        (d / "lib").mkdir()
        for name in LIBRARIES:
            shutil.copyfile(rt.lib_dir / name, d / "lib" / name)  # follows the host's symlinks
            os.chmod(d / "lib" / name, 0o755)
        shutil.copytree(rt.include_dir, d / "include", symlinks=False,
                        ignore=shutil.ignore_patterns("tvm_ffi_python*"))
        write_cmake_config(d, rt.arch)
        lic = rt.path / "share" / "licenses"
        if lic.is_dir():
            shutil.copytree(lic, d / "share" / "licenses")
        (d / "src").mkdir()
        for name in _EXAMPLE_FILES:
            if (self.sources / name).is_file():
                shutil.copyfile(self.sources / name, d / "src" / name)
        shapes = {k: [int(v) for v in s] for k, s in input_shapes.items()}
        first = next(iter(shapes.values()))
        x = np.random.default_rng(0).random(first).astype(np.float32)
        np.save(d / "sample_input.npy", x)
        meta = {"target": self.target, "arch": rt.arch, "model": so.name, "input_shapes": shapes,
                "sample_input": "sample_input.npy (uniform [0, 1), seed 0)",
                "runtime": {"source": rt.source, "libraries": [f"lib/{n}" for n in LIBRARIES]},
                "versions": installed_versions()}
        (d / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (d / "README.txt").write_text(_readme(self.target, rt.arch, so.name, shapes,
                                              self.directory.name), encoding="utf-8")
        written = sorted(_files(d))
        (d / MARKER).write_text(json.dumps({"written_by": "dsconv-tvm compile --bundle",
                                            "files": written}, indent=1) + "\n", encoding="utf-8")


MARKER = ".dsconv-bundle"


def _files(d: Path) -> list[str]:
    """Every file and link under ``d`` (relative POSIX paths; empty directories are not files)."""
    out = []
    for root, dirs, files in os.walk(d):
        for name in files + [x for x in dirs if os.path.islink(os.path.join(root, x))]:
            out.append(Path(os.path.relpath(os.path.join(root, name), d)).as_posix())
    return out


def check_replaceable(out: Path) -> None:
    """``--force`` replaces DIR only if a previous bundle wrote it and nothing else was added."""
    marker = out / MARKER
    try:
        written = set(json.loads(marker.read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputError(f"--bundle {out}: not a bundle written by dsconv-tvm (no valid {MARKER}); "
                          f"--force replaces only such a directory: remove it yourself or choose "
                          f"another one") from None
    extra = sorted(set(_files(out)) - written - {MARKER})
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise OutputError(f"--bundle {out}: holds files the previous bundle did not write ({extra[0]}"
                          f"{more}); --force does not remove them: move them away or choose another "
                          f"directory")


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def prepare_bundle(directory: str, target: str, force: bool = False, output: str | None = None,
                   log=None) -> BundlePlan:
    """Check DIR and get the runtime of ``target`` (before compiling); raises one-line errors."""

    get_target(target)  # unknown target -> TargetError
    out = Path(directory).absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--bundle {directory}: exists and is not a directory")
    if _non_empty(out) and not force:
        raise OutputError(f"--bundle {directory}: the directory is not empty (use --force to replace it)")
    if _non_empty(out):
        check_replaceable(out)
    if not out.parent.is_dir():
        raise OutputError(f"--bundle {directory}: directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f"--bundle {directory}: directory {out.parent} is not writable")
    if output is not None and out in Path(output).absolute().parents:
        raise OutputError(f"--bundle {directory}: the .so ({output}) must not be written inside the "
                          f"bundle directory (the bundle gets a copy of it)")
    sources = example_dir()
    try:
        rt = runtime_for_target(target, log=log)
    except OSError as exc:
        raise RuntimeUnavailable(f"cannot prepare the TVM runtime for '{target}': "
                                 f"{exc.strerror or exc}") from exc
    return BundlePlan(out, target, force, rt, sources)


# -------------------------------------------------------------------------------------------------
def _readme(target: str, arch: str, so: str, shapes: dict, dirname: str) -> str:
    shape = next(iter(shapes.values()))
    batch = shape[0]
    sample = ",".join(str(s) for s in shape[1:])
    native = arch == "x86_64"
    board = {"x86_64": "an x86-64 Linux machine",
             "aarch64": "the board (64-bit Linux, e.g. 64-bit Raspberry Pi OS, glibc >= 2.28)",
             "armv7": "the board (32-bit Raspberry Pi OS, armv7l)"}.get(arch, "the board")
    lines = [
        f"dsconv-tvm bundle: {so} compiled for target '{target}' ({arch})",
        "",
        f"Input  : {', '.join(f'{k} {v}' for k, v in shapes.items())} float32 "
        f"(a .npy with k*{batch} samples of [{sample}] is run in k calls)",
        "Files  : " + so + "  lib/ (libtvm_runtime.so, libtvm_ffi.so)  include/  src/ (C++ example)",
        "         sample_input.npy  DSConvTVMRuntimeConfig.cmake  bundle.json  share/licenses/",
        "",
        f"1. Build and run on {board}",
        "   (needs cmake >= 3.16 and a C++17 compiler: sudo apt install cmake g++)",
        "",
        f"   cd {dirname}",
        "   cmake -S src -B build",
        "   cmake --build build -j4",
        f"   ./build/dsconv_run ./{so} sample_input.npy --repeat 20",
        f"   ./build/dsconv_run ./{so} my_images.npy --top-k 3 --output logits.npy",
        "",
        "   dsconv_run finds lib/ through its rpath ($ORIGIN/../lib). If you move the program, or",
        "   link your own program against lib/, set the library path:",
        "",
        f"   LD_LIBRARY_PATH=$PWD/lib ./dsconv_run ./{so} sample_input.npy",
        "",
        "   Options: --shape N,C,H,W for raw float32 input, --top-k K, --repeat N (latency = median",
        "   of N calls), --output FILE (.npy or raw float32), --threads T (or TVM_NUM_THREADS=T).",
    ]
    if not native:
        tc = _TOOLCHAIN.get(arch, "")
        lines += [
            "",
            "2. Or cross-build on a Debian/Ubuntu PC, then copy the whole folder to the board",
            f"   (needs: sudo apt install cmake g++-{_CROSS_PREFIX[arch]})",
            "",
            f"   cd {dirname}",
            f"   cmake -S src -B build-{arch} -DCMAKE_TOOLCHAIN_FILE=$PWD/src/{tc}",
            f"   cmake --build build-{arch} -j4",
            f"   scp -r ../{dirname} pi@raspberrypi.local:",
            f"   ssh pi@raspberrypi.local 'cd {dirname} && ./build-{arch}/dsconv_run ./{so} sample_input.npy'",
            "",
            "   Try it on the PC under qemu (apt install qemu-user-static; timings are meaningless):",
            "",
            f"   QEMU_LD_PREFIX=/usr/{_CROSS_PREFIX[arch]} LD_LIBRARY_PATH=$PWD/lib \\",
            f"     {_QEMU[arch]} ./build-{arch}/dsconv_run ./{so} sample_input.npy",
        ]
    lines += [
        "",
        f"{'3' if not native else '2'}. Your own C++ program: see src/dsconv_run.cc (load the .so with",
        "   tvm::ffi::Module::LoadFromFile, vm_load_executable, vm_initialization, main) and link it with",
        "",
        "   find_package(DSConvTVMRuntime CONFIG REQUIRED PATHS /path/to/this/folder",
        "                NO_DEFAULT_PATH NO_CMAKE_FIND_ROOT_PATH)",
        "   target_link_libraries(app PRIVATE dsconv::tvm_runtime)",
        "",
        "   or by hand: g++ -std=c++17 app.cc -Iinclude -Llib -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi \\",
        "               -Wl,-rpath,'$ORIGIN/lib'",
        "   (libtvm_runtime.so must stay linked although no symbol of it is used: it registers the",
        "   loader of the .so.)",
        "",
    ]
    if target.startswith("x86") and target != "x86-avx2":
        lines += [f"Note: target '{target}' may use CPU features (AVX2/AVX-512/VNNI) of the machine it was "
                  "compiled for; run it on a CPU that has them.", ""]
    return "\n".join(lines)
