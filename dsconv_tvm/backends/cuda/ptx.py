"""The device code inside an exported ``.so``: TVM 0.27 without a CUDA runtime at build time stores
CUDA *source* in the module and compiles it when the module is loaded, through a Python callback.
:func:`pack_imports` replaces that source by PTX compiled here with NVRTC, so the ``.so`` loads in a
C++ program that has only the TVM runtime; :func:`device_code` reads it back from a file."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from ...errors import TargetError
from .nvrtc import assemble, compile_ptx, ptxas_path, set_ptx_version


def _read_u64(buf: bytes, pos: int) -> tuple[int, int]:
    return struct.unpack_from("<Q", buf, pos)[0], pos + 8


def _read_str(buf: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = _read_u64(buf, pos)
    return buf[pos:pos + n], pos + n


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def _split_payload(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """A serialized CUDA module -> (fmt, function table bytes, code).  The code is the last field
    ([u64 size][bytes]): the only place whose u64 equals the number of bytes after it."""
    fmt, pos = _read_str(payload, 0)
    for start in range(len(payload) - 8, pos - 1, -1):
        if struct.unpack_from("<Q", payload, start)[0] == len(payload) - start - 8:
            return fmt, payload[pos:start], payload[start + 8:]
    raise TargetError("cannot find the code in the CUDA device module (TVM format changed?)")


def _patch_cuda_module(payload: bytes, compile_fn) -> bytes:
    """One serialized CUDA module with fmt "cuda" (source) -> fmt "ptx"."""
    fmt, table, code = _split_payload(payload)
    if fmt != b"cuda":
        return payload                      # already ptx/cubin
    ptx = compile_fn(code.decode()).encode()
    return _u64(3) + b"ptx" + table + _u64(len(ptx)) + ptx


def patch_library_blob(blob: bytes, compile_fn) -> tuple[bytes, int]:
    """The packed import tree of a module (``__tvm_ffi__library_bin``) with every CUDA module's
    source replaced by PTX; returns (new blob, number of CUDA modules patched)."""
    total, pos = _read_u64(blob, 0)
    if total + 8 != len(blob):
        raise TargetError("unexpected layout of the packed device modules (TVM format changed?)")
    nrow, pos = _read_u64(blob, pos)
    pos += 8 * nrow
    nchild, pos = _read_u64(blob, pos)
    pos += 8 * nchild
    head, parts, patched = blob[8:pos], [], 0
    while pos < len(blob):
        key, pos = _read_str(blob, pos)
        parts.append(_u64(len(key)) + key)
        if key == b"_lib":
            continue
        payload, pos = _read_str(blob, pos)
        if key == b"cuda":
            payload = _patch_cuda_module(payload, compile_fn)
            patched += 1
        parts.append(_u64(len(payload)) + payload)
    body = head + b"".join(parts)
    return _u64(len(body)) + body, patched


def pack_imports(arch: str, ptx_version: str | None = None, check_ptxas: bool = True):
    """An ``fpack_imports`` for ``export_library``: TVM's C packing of the imported modules, with
    the CUDA source compiled to PTX for ``arch`` (and assembled once by ptxas 11.8 as a check)."""

    def compile_fn(source: str) -> str:
        ptx = set_ptx_version(compile_ptx(source, arch), ptx_version)
        if check_ptxas and ptxas_path() is not None:
            assemble(ptx, arch)
        return ptx

    def fpack(mod, is_system_lib, prefix, workspace_dir):
        from tvm.runtime import _ffi_api

        csrc = _ffi_api.ModulePackImportsToC(mod, is_system_lib, prefix)
        m = re.search(r"(\w+)\[(\d+)\] = \{(.*?)\};", csrc, re.S)
        if m is None:
            raise TargetError("unexpected C packing of the device modules (TVM format changed?)")
        blob = bytes(int(h, 16) for h in re.findall(r"0x([0-9a-fA-F]{2})", m.group(3)))
        new, patched = patch_library_blob(blob, compile_fn)
        if patched == 0:
            raise TargetError("the compiled model has no CUDA device module")
        rows = ",\n".join(",".join(f"0x{b:02x}" for b in new[i:i + 20]) for i in range(0, len(new), 20))
        csrc = csrc[:m.start()] + f"{m.group(1)}[{len(new)}] = {{\n{rows}\n}};" + csrc[m.end():]
        path = os.path.join(workspace_dir, f"{prefix}devc.c")
        Path(path).write_text(csrc)
        return path

    return fpack


def device_code(path: str) -> list[tuple[str, bytes]]:
    """(fmt, code) of every CUDA module packed in an exported ``.so``, read from the file (no
    loading, so it works for a foreign architecture and without a GPU)."""
    data = Path(path).read_bytes()
    found = []
    for m in re.finditer(rb"\x04\x00\x00\x00\x00\x00\x00\x00cuda", data):
        try:
            size, pos = _read_u64(data, m.end())
            payload = data[pos:pos + size]
            if len(payload) != size or _read_str(payload, 0)[0] not in (b"ptx", b"cuda", b"cubin", b"fatbin"):
                continue
            fmt, _, code = _split_payload(payload)
        except (struct.error, TargetError):
            continue
        found.append((fmt.decode(), code))
    return found
