"""Compilation targets, described as data.

Each target is one JSON file in the ``targets/`` directory (one file per target, the file stem is the
target name).  A file gives the TVM target dict, the cross compiler that links the ``.so`` and the
Debian package that installs it, the ELF machine of the result, and the CPU features the kernels may
use.  The ``x86`` target has ``"detect_host": true``: its TVM target is built from the host CPU at
run time (``mcpu`` from LLVM's host CPU name, ``num-cores`` from :func:`os.cpu_count`, ``mattr``
from the detected AVX2 / AVX-512 / VNNI flags).

``import tvm`` is done lazily inside the functions that need it, so importing this module is cheap.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import OutputError, TargetError

if TYPE_CHECKING:  # pragma: no cover
    import tvm

__all__ = [
    "TargetSpec",
    "list_targets",
    "get_target",
    "load_target_file",
    "targets_dir",
    "host_features",
    "elf_machine",
    "HOST_FEATURE_NAMES",
    "ELF_MACHINES",
]

#: x86 features probed on the host (LLVM feature names).
HOST_FEATURE_NAMES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vnni", "avxvnni")

#: e_machine values this project produces -> the names used in the target files.
ELF_MACHINES = {0x3E: "x86-64", 0xB7: "AArch64", 0x28: "ARM"}

#: Short feature names accepted by :meth:`TargetSpec.has_feature`, expanded to LLVM feature names.
FEATURE_ALIASES = {
    "vnni": ("avx512vnni",),
    "avx512": ("avx512f", "avx512bw"),
}

_REQUIRED_KEYS = {
    "name": str,
    "description": str,
    "tvm_target": dict,
    "cross_compiler": (str, type(None)),
    "debian_package": (str, type(None)),
    "elf_machine": str,
    "runs_on_host": bool,
    "features": list,
}
_OPTIONAL_KEYS = {"detect_host": bool, "cuda": dict}  # cuda: see dsconv_tvm/cuda.py

# x86 features that only run if the CPU really has them (what makes a .so fail with SIGILL).
_X86_ISA_FEATURES = frozenset(HOST_FEATURE_NAMES)


# --------------------------------------------------------------------------------------------------
# targets directory
# --------------------------------------------------------------------------------------------------
def targets_dir() -> Path:
    """The directory holding the target JSON files.

    Installed wheel: ``dsconv_tvm/targets`` (pyproject maps the top-level ``targets/`` there; the
    ``dsconv_tvm/data/targets`` layout is accepted too).  Source checkout / editable install: the
    repository's top-level ``targets/``.
    """
    here = Path(__file__).parent
    for cand in (here / "targets", here / "data" / "targets"):
        if cand.is_dir():
            return cand
    return Path(__file__).resolve().parent.parent / "targets"


# --------------------------------------------------------------------------------------------------
# TargetSpec
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetSpec:
    """One compilation target (the content of one ``targets/<name>.json``)."""

    name: str
    description: str
    tvm_target_dict: dict = field(hash=False)
    cross_compiler: str | None
    debian_package: str | None
    elf_machine: str
    runs_on_host: bool
    features: tuple[str, ...]
    detect_host: bool = False
    cuda: dict | None = field(default=None, hash=False)   # CUDA targets: {"ptx_version": ...}

    # ---- TVM target ------------------------------------------------------------------------------
    def resolved_target_dict(self) -> dict[str, Any]:
        """The TVM target dict; for ``detect_host`` targets, built from the host CPU now."""
        d = json.loads(json.dumps(self.tvm_target_dict))  # deep copy
        if self.cuda is not None:                          # GPU arch (+ host CPU) detection
            from .cuda import resolve_target_dict
            return resolve_target_dict(self, d)
        if not self.detect_host:
            return d
        from tvm.target import codegen

        cpu = str(codegen.llvm_get_system_cpu())
        d["kind"] = d.get("kind", "llvm")
        d["mcpu"] = cpu
        d["num-cores"] = os.cpu_count() or 1
        host = host_features()
        implied = _mcpu_features(cpu, d.get("mtriple"))
        mattr = [a for a in d.get("mattr", []) if a.lstrip("+-") not in HOST_FEATURE_NAMES]
        for feat in HOST_FEATURE_NAMES:
            if feat not in self.features:
                continue
            if host.get(feat, False):
                mattr.append("+" + feat)
            elif implied.get(feat, False):
                # the CPU model implies it but this CPU (or VM) does not expose it
                mattr.append("-" + feat)
        if mattr:
            d["mattr"] = mattr
        else:
            d.pop("mattr", None)
        return d

    def tvm_target(self) -> "tvm.target.Target":
        """The ``tvm.target.Target`` (host detection for ``detect_host`` targets)."""
        import tvm

        d = self.resolved_target_dict()
        try:
            return tvm.target.Target(d)
        except Exception as exc:  # TVM raises its own error types
            raise TargetError(
                f"target '{self.name}': TVM rejects target {json.dumps(d)}: "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}"
            ) from exc

    # ---- toolchain -------------------------------------------------------------------------------
    def check_toolchain(self) -> str | None:
        """Path of the cross compiler; ``None`` for host targets (after checking a host g++/gcc)."""
        if self.cross_compiler is None:
            env_cc = os.environ.get("CXX") or os.environ.get("CC")
            if env_cc:
                if shutil.which(env_cc.split()[0]) is None:
                    raise TargetError(
                        f"C++ compiler '{env_cc}' (from $CXX/$CC) for target '{self.name}' not found"
                    )
                return None
            if shutil.which("g++") is None and shutil.which("gcc") is None:
                raise TargetError(
                    f"host C++ compiler (g++ or gcc) for target '{self.name}' not found; "
                    f"install it with: apt-get install {self.debian_package or 'g++'}"
                )
            return None
        path = shutil.which(self.cross_compiler)
        if path is None:
            hint = (
                f"; install it with: apt-get install {self.debian_package}"
                if self.debian_package
                else ""
            )
            raise TargetError(
                f"cross compiler '{self.cross_compiler}' for target '{self.name}' not found{hint}"
            )
        return path

    # ---- export ----------------------------------------------------------------------------------
    def export_library(self, executable, path: str) -> None:
        """Link ``executable`` (a ``tvm.compile`` result) into the shared library ``path``.

        The library is written to a temporary file in the same directory, then renamed over
        ``path`` (atomic: a reader never sees a half-written ``.so``).  The temporary file is
        removed on any failure.
        """
        cc = self.check_toolchain()
        out = Path(os.fspath(path))
        parent = out.parent if str(out.parent) else Path(".")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp.so", dir=parent)
            os.close(fd)
        except OSError as exc:
            raise OutputError(f"cannot write '{out}': {exc.strerror or exc}") from exc
        try:
            kwargs = {"cc": cc} if cc is not None else {}
            if self.cuda is not None:          # PTX instead of CUDA source in the .so
                from .cuda import export_options
                kwargs.update(export_options(self))
            executable.export_library(tmp, **kwargs)
            _chmod_like_new_file(tmp, 0o755)
            os.replace(tmp, out)
        except OSError as exc:
            _unlink_quiet(tmp)
            raise OutputError(f"cannot write '{out}': {exc.strerror or exc}") from exc
        except BaseException:
            _unlink_quiet(tmp)
            raise

    # ---- features --------------------------------------------------------------------------------
    def has_feature(self, f: str) -> bool:
        """Whether kernels for this target may use feature ``f`` ("avx2", "vnni", "neon", ...).

        For ``detect_host`` targets a feature counts only if the host CPU has it.
        """
        parts = FEATURE_ALIASES.get(f, (f,))
        if not all(p in self.features for p in parts):
            return False
        if self.detect_host:
            host = host_features()
            return all(host.get(p, False) for p in parts if p in _X86_ISA_FEATURES)
        return True

    def runs_here(self) -> bool:
        """Whether a ``.so`` built for this target can be loaded and run on this machine."""
        if self.cuda is not None:
            from .cuda import gpu_present
            return self.runs_on_host and host_machine() == "x86-64" and gpu_present()
        if not self.runs_on_host or platform.machine().lower() not in ("x86_64", "amd64"):
            return False
        if self.detect_host:
            return True
        host = host_features()
        return all(host.get(f, False) for f in self.features if f in _X86_ISA_FEATURES)


def _chmod_like_new_file(path: str, mode: int) -> None:
    """mkstemp creates 0600; give the library the usual permissions (mode & ~umask)."""
    umask = None
    try:  # Linux >= 4.7; avoids the racy os.umask() read-and-restore
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
                    break
    except (OSError, ValueError):
        pass
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    os.chmod(path, mode & ~umask)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def load_target_file(path: str | os.PathLike) -> TargetSpec:
    """Load and validate one target JSON file."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TargetError(f"cannot read target file {p}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise TargetError(f"target file {p} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise TargetError(f"target file {p}: expected a JSON object")

    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:
        raise TargetError(f"target file {p}: missing key(s) {', '.join(missing)}")
    unknown = sorted(set(raw) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    if unknown:
        raise TargetError(f"target file {p}: unknown key(s) {', '.join(unknown)}")
    for key, typ in {**_REQUIRED_KEYS, **_OPTIONAL_KEYS}.items():
        if key in raw and not isinstance(raw[key], typ):
            raise TargetError(f"target file {p}: key '{key}' has the wrong type")

    name = raw["name"]
    if name != p.stem:
        raise TargetError(f"target file {p}: name '{name}' does not match the file name")
    tdict = raw["tvm_target"]
    if not isinstance(tdict.get("kind"), str):
        raise TargetError(f"target file {p}: tvm_target needs a 'kind'")
    detect_host = raw.get("detect_host", False)
    if tdict["kind"] == "llvm" and not detect_host and not isinstance(tdict.get("num-cores"), int):
        raise TargetError(f"target file {p}: llvm tvm_target needs an integer 'num-cores'")
    if (tdict["kind"] == "cuda") != isinstance(raw.get("cuda"), dict):
        raise TargetError(f"target file {p}: a cuda tvm_target and the 'cuda' key go together")
    if raw["elf_machine"] not in ELF_MACHINES.values():
        raise TargetError(
            f"target file {p}: elf_machine must be one of {', '.join(ELF_MACHINES.values())}"
        )
    if not all(isinstance(f, str) for f in raw["features"]):
        raise TargetError(f"target file {p}: features must be a list of strings")
    if (raw["cross_compiler"] is None) != (raw["debian_package"] is None):
        raise TargetError(
            f"target file {p}: cross_compiler and debian_package must both be set or both be null"
        )

    return TargetSpec(
        name=name,
        description=raw["description"],
        tvm_target_dict=tdict,
        cross_compiler=raw["cross_compiler"],
        debian_package=raw["debian_package"],
        elf_machine=raw["elf_machine"],
        runs_on_host=raw["runs_on_host"],
        features=tuple(raw["features"]),
        detect_host=detect_host,
        cuda=raw.get("cuda"),
    )


@functools.lru_cache(maxsize=None)
def _load_all(directory: str) -> dict[str, TargetSpec]:
    d = Path(directory)
    if not d.is_dir():
        raise TargetError(f"targets directory {d} not found")
    return {p.stem: load_target_file(p) for p in sorted(d.glob("*.json"))}


def _all_targets() -> dict[str, TargetSpec]:
    return _load_all(str(targets_dir()))


def list_targets() -> list[str]:
    """Names of all known targets, sorted."""
    return sorted(_all_targets())


def get_target(name: str) -> TargetSpec:
    """The target called ``name``; unknown names raise :class:`TargetError` listing the known ones."""
    targets = _all_targets()
    try:
        return targets[name]
    except (KeyError, TypeError):
        raise TargetError(
            f"unknown target '{name}'; known targets: {', '.join(sorted(targets))}"
        ) from None


# --------------------------------------------------------------------------------------------------
# host CPU
# --------------------------------------------------------------------------------------------------
def _mcpu_features(cpu: str, mtriple: str | None = None) -> dict[str, bool]:
    """Features LLVM's CPU model ``cpu`` implies (no host probing)."""
    import tvm
    from tvm.target import codegen

    d: dict[str, Any] = {"kind": "llvm", "mcpu": cpu}
    if mtriple:
        d["mtriple"] = mtriple
    try:
        t = tvm.target.Target(d)
        return {f: bool(codegen.llvm_cpu_has_features([f], t)) for f in HOST_FEATURE_NAMES}
    except Exception:
        return {f: False for f in HOST_FEATURE_NAMES}


@functools.lru_cache(maxsize=1)
def _host_features_cached() -> tuple[tuple[str, bool], ...]:
    import tvm  # noqa: F401  (registers the global functions)

    feats: dict[str, bool] = {}
    try:
        import tvm_ffi

        get = tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures", allow_missing=True)
        if get is not None:
            # LLVM's sys::getHostCPUFeatures(): what the running CPU (as seen through CPUID /
            # the VM) really has, e.g. avxvnni on a CPU whose model name LLVM does not know.
            host = {str(k): bool(v) for k, v in dict(get()).items()}
            feats = {f: host.get(f, False) for f in HOST_FEATURE_NAMES}
    except Exception:
        feats = {}
    if not feats:
        from tvm.target import codegen

        feats = _mcpu_features(str(codegen.llvm_get_system_cpu()))
    return tuple(feats.items())


def host_features() -> dict[str, bool]:
    """avx2, fma, avx512f, avx512bw, avx512vnni, avxvnni of the host CPU, via TVM's LLVM.

    On a non-x86 host all are False.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return {f: False for f in HOST_FEATURE_NAMES}
    return dict(_host_features_cached())


# --------------------------------------------------------------------------------------------------
# ELF
# --------------------------------------------------------------------------------------------------
def host_machine() -> str:
    """This machine in :func:`elf_machine`'s words ("x86-64", "AArch64", "ARM")."""
    return {"x86_64": "x86-64", "amd64": "x86-64", "aarch64": "AArch64", "arm64": "AArch64",
            "armv7l": "ARM"}.get(platform.machine().lower(), platform.machine())


def library_machine(path: str) -> str:
    """The ELF machine of a compiled library; a ModelError if it is missing or not ELF."""
    from .errors import ModelError

    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such file")
    try:
        return elf_machine(path)
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path}: not a compiled .so ({exc})") from exc


def elf_machine(path: str) -> str:
    """The machine of an ELF file: "x86-64", "AArch64", "ARM" (others: "EM_0x<hex>").

    Raises ValueError if ``path`` is not an ELF file.
    """
    with open(path, "rb") as fh:
        head = fh.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    data = head[5]  # EI_DATA: 1 = little endian, 2 = big endian
    if data == 1:
        order = "little"
    elif data == 2:
        order = "big"
    else:
        raise ValueError(f"{path}: bad ELF data encoding {data}")
    machine = int.from_bytes(head[18:20], order)
    return ELF_MACHINES.get(machine, f"EM_0x{machine:x}")
