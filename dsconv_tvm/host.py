"""This machine and the machine of a compiled library: the host CPU's x86 features (through TVM's
LLVM), its architecture, and the ELF machine of a ``.so``."""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

from .errors import ModelError

#: x86 features probed on the host (LLVM feature names).
HOST_FEATURE_NAMES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vnni", "avxvnni")

#: e_machine values this project produces -> the names used in the target files.
ELF_MACHINES = {0x3E: "x86-64", 0xB7: "AArch64", 0x28: "ARM"}


# --------------------------------------------------------------------------------------------------
def mcpu_features(cpu: str, mtriple: str | None = None) -> dict[str, bool]:
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

        feats = mcpu_features(str(codegen.llvm_get_system_cpu()))
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
    """The ELF machine of a compiled library; a ModelError if it is missing, not ELF, or damaged
    (see :func:`check_elf`)."""
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such file")
    try:
        check_elf(path)
        return elf_machine(path)
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path}: not a compiled .so ({exc})") from exc


def check_library(path: str) -> None:
    """A ModelError unless ``path`` is a complete ELF shared library: to be called before the
    library is mapped (``dlopen`` of a truncated file dies of SIGBUS when a page past its end is
    touched).  Loading a library runs its code: load only libraries you trust."""
    library_machine(path)


def check_elf(path: str) -> None:
    """Raise ValueError unless ``path`` is a consistent ELF shared object: the header, and every
    program header, loadable segment, section header and section inside the file."""
    import struct

    with open(path, "rb") as fh:
        data = fh.read()
    size = len(data)
    if size < 52 or data[:4] != b"\x7fELF":
        raise ValueError("not an ELF file" if data[:4] != b"\x7fELF" else f"truncated ELF header ({size} bytes)")
    cls, enc = data[4], data[5]
    if cls not in (1, 2) or enc not in (1, 2):
        raise ValueError(f"bad ELF class/encoding {cls}/{enc}")
    o = "<" if enc == 1 else ">"
    if cls == 2:
        if size < 64:
            raise ValueError(f"truncated ELF header ({size} bytes)")
        (e_type, _m, _v, _entry, phoff, shoff, _f, _eh, phentsize, phnum, shentsize,
         shnum, _shstrndx) = struct.unpack_from(o + "HHIQQQIHHHHHH", data, 16)
        ph_fmt, sh_fmt = o + "IIQQQQQQ", o + "IIQQQQIIQQ"
    else:
        (e_type, _m, _v, _entry, phoff, shoff, _f, _eh, phentsize, phnum, shentsize,
         shnum, _shstrndx) = struct.unpack_from(o + "HHIIIIIHHHHHH", data, 16)
        ph_fmt, sh_fmt = o + "IIIIIIII", o + "IIIIIIIIII"
    if e_type != 3:
        raise ValueError(f"ELF type {e_type}, not a shared library (ET_DYN)")
    if phnum == 0:
        raise ValueError("no program headers (not a loadable library)")
    for what, off, num, entsize, fmt in (("program", phoff, phnum, phentsize, ph_fmt),
                                         ("section", shoff, shnum, shentsize, sh_fmt)):
        if num and (entsize < struct.calcsize(fmt) or off + num * entsize > size):
            raise ValueError(f"damaged or truncated: its {what} headers (offset {off}, {num} x "
                             f"{entsize} bytes) end past the end of the {size}-byte file")
    for i in range(phnum):
        f = struct.unpack_from(ph_fmt, data, phoff + i * phentsize)
        p_type, p_offset, p_filesz = (f[0], f[2], f[5]) if cls == 2 else (f[0], f[1], f[4])
        if p_type == 1 and p_offset + p_filesz > size:                     # PT_LOAD
            raise ValueError(f"damaged or truncated: segment {i} (bytes {p_offset}..{p_offset + p_filesz}) "
                             f"ends past the end of the {size}-byte file")
    for i in range(shnum):
        f = struct.unpack_from(sh_fmt, data, shoff + i * shentsize)
        sh_type, sh_offset, sh_size = (f[1], f[4], f[5]) if cls == 2 else (f[1], f[4], f[5])
        if sh_type != 8 and sh_type != 0 and sh_offset + sh_size > size:   # not NOBITS / NULL
            raise ValueError(f"damaged or truncated: section {i} (bytes {sh_offset}..{sh_offset + sh_size}) "
                             f"ends past the end of the {size}-byte file")


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
