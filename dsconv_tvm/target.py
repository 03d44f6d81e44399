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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backends.base import REGISTRY, Backend, backend_class
from .errors import TargetError
from .fileio import atomic_path
from .host import ELF_MACHINES, HOST_FEATURE_NAMES, host_features

if TYPE_CHECKING:  # pragma: no cover
    import tvm

__all__ = ["TargetSpec", "list_targets", "get_target", "load_target_file", "targets_dir"]

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
_OPTIONAL_KEYS = {"detect_host": bool, "cuda": dict}  # cuda: see dsconv_tvm/backends/cuda/

#: The target of this machine's CPU (the host part of ``detect_host`` targets, agreement checks).
HOST_TARGET = "x86"

#: x86 features that only run if the CPU really has them (what makes a .so fail with SIGILL).
X86_ISA_FEATURES = frozenset(HOST_FEATURE_NAMES)


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
    @property
    def backend(self) -> type[Backend]:
        """The kernel backend of this target (chosen by its TVM target kind, in
        :mod:`dsconv_tvm.backends.base`)."""
        return backend_class(self.tvm_target_dict["kind"])

    def resolved_target_dict(self) -> dict[str, Any]:
        """The TVM target dict; for ``detect_host`` targets, completed from this machine now."""
        d = self.backend.resolve_target_dict(self, json.loads(json.dumps(self.tvm_target_dict)))
        if self.detect_host and isinstance(d.get("host"), dict):   # e.g. a GPU's host CPU
            d["host"] = get_target(HOST_TARGET).resolved_target_dict()
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
        kwargs = {"cc": cc} if cc is not None else {}
        kwargs.update(self.backend.export_options(self))
        with atomic_path(os.fspath(path), suffix=".tmp.so", mode=0o777) as tmp:
            executable.export_library(tmp, **kwargs)

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
            return all(host.get(p, False) for p in parts if p in X86_ISA_FEATURES)
        return True

    def runs_here(self) -> bool:
        """Whether a ``.so`` built for this target can be loaded and run on this machine."""
        if not self.runs_on_host or platform.machine().lower() not in ("x86_64", "amd64"):
            return False
        return self.backend.can_run_here(self)


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
    if tdict["kind"] in REGISTRY:
        problem = backend_class(tdict["kind"]).check_target_file(raw)
        if problem:
            raise TargetError(f"target file {p}: {problem}")
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
