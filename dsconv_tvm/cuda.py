"""DSConv on NVIDIA GPUs (desktop CUDA and Jetson): kernels, schedule, pipeline, device code.

Kernel (one PrimFunc per converted layer, like the CPU one, but with its own data layout):

1. ``amax`` / ``bfp_e`` / ``bfp_s``  the BFP block exponents and scales, as on the CPU;
2. ``bfp_m4``  the mantissas, four channels per 32-bit word (byte b = channel 4k+b).  Unsigned
   mantissas (after a ReLU, 0..2^m-1) are stored as ``u - 128`` so that every byte is a signed
   int8 and the signed ``__dp4a`` applies; the ``+128 * sum(w)`` that this takes away comes back
   in ``dsconv_out`` from ``dsconv_wsum``;
3. ``dsconv_acc``  int32 block dot products.  4-bit weights are stored eight per uint32 word
   (byte b holds channel b in its low nibble and channel b+4 in its high nibble), so one word
   unpacks in registers into two int8x4 words with four logical operations each
   (``w & 0x0F0F0F0F``, sign extension ``x | ((x >> 3) & 0x01010101) * 0xF0``) and feeds two
   ``__dp4a`` (sm_61+).  8-bit weights are stored four per word.  On GPUs without dp4a (sm_53,
   Jetson Nano) the same words are multiplied byte by byte with int32 multiply-adds;
4. ``dsconv_out``  float sum over blocks and taps of acc * xi * scale; ``dsconv_epilogue`` bias/ReLU.

Device code: TVM 0.27 without a CUDA runtime at build time stores CUDA *source* in the module and
compiles it when the module is loaded, through a Python callback.  :func:`pack_imports` replaces
that source by PTX compiled here with NVRTC 11.8 (pip packages, see ``pyproject.toml`` extra
``cuda``), so the ``.so`` loads in a C++ program that has only the TVM runtime.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .kernels import bfp_stages, slot_weights
from .errors import TargetError

CUDA_BLOCKS = ("amax", "bfp_e", "bfp_s", "bfp_m4", "dsconv_acc", "dsconv_out", "dsconv_epilogue")

#: NVRTC 11.8 (the newest CUDA that still compiles for sm_53 and sm_72) from PyPI.
NVRTC_HINT = ("install the CUDA compiler packages with: pip install 'dsconv-tvm[cuda]' "
              "(NVRTC 11.8 and ptxas 11.8 wheels, about 46 MB)")


# --------------------------------------------------------------------------------------------------
# architecture
# --------------------------------------------------------------------------------------------------
def sm_version(arch: str) -> int:
    """"sm_87" -> 87."""
    m = re.fullmatch(r"sm_(\d+)[a-z]?", str(arch))
    if not m:
        raise TargetError(f"bad CUDA arch '{arch}' (expected sm_XY, e.g. sm_87)")
    return int(m.group(1))


def has_dp4a(arch: str) -> bool:
    """int8 dot product ``dp4a`` exists from sm_61 (Pascal GP10x) on; not on sm_53 (Jetson Nano)."""
    return sm_version(arch) >= 61


def target_arch(target) -> str:
    arch = str(target.attrs.get("arch", "")) if target.kind.name == "cuda" else ""
    if not arch:
        raise TargetError(f"target {target} has no CUDA arch")
    return arch


def detect_gpu_arch() -> str | None:
    """sm_XY of GPU 0 from ``nvidia-smi`` (None when there is no NVIDIA GPU/driver)."""
    env = os.environ.get("DSCONV_CUDA_ARCH")
    if env:
        sm_version(env)
        return env
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    caps = [ln.strip() for ln in out.splitlines() if re.fullmatch(r"\d+\.\d+", ln.strip())]
    if not caps:
        return None
    major, minor = caps[0].split(".")
    return f"sm_{major}{minor}"


def gpu_present() -> bool:
    """True when this process can run CUDA kernels (a GPU, its driver and TVM's CUDA runtime)."""
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001  (no libcuda, no runtime: no GPU)
        return False


# --------------------------------------------------------------------------------------------------
# weight layout
# --------------------------------------------------------------------------------------------------
def _slots(layer) -> int:
    """Channel slots per block: a multiple of 8 (4-bit: 8 per word) or 4 (8-bit: 4 per word)."""
    step = 8 if layer.packed else 4
    return -(-layer.block // step) * step


def weight_shape(layer) -> tuple[int, ...]:
    kh, kw = layer.kernel
    per_word = 8 if layer.packed else 4
    return (layer.groups, kh, kw, _slots(layer) // per_word, layer.out_channels)


def pack_weights(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """int (CO, CI, KH, KW) weights -> int32 words ``[G, KH, KW, words, CO]`` (module docstring)."""
    packed = bits <= 4
    step = 8 if packed else 4
    slots = slot_weights(q, bits, block, step)                          # G, KH, KW, Bp, CO
    g, kh, kw, bp, co = slots.shape
    slots = slots.reshape(g, kh, kw, bp // step, step, co)              # G, KH, KW, W, s, CO
    if packed:
        nib = slots & 0xF
        byte = nib[..., 0:4, :] | (nib[..., 4:8, :] << 4)                  # byte b: ch b | ch b+4
    else:
        byte = slots & 0xFF
    word = sum(byte[..., b, :].astype(np.uint64) << np.uint64(8 * b) for b in range(4))
    return np.ascontiguousarray(word.astype(np.uint32).view(np.int32))


def pack_scales(xi: np.ndarray, scale_dtype: str) -> np.ndarray:
    """KDS scales (CO, G, KH, KW) -> ``[G, KH, KW, CO]``."""
    return np.ascontiguousarray(xi.transpose(1, 2, 3, 0).astype(scale_dtype))


# --------------------------------------------------------------------------------------------------
# compute
# --------------------------------------------------------------------------------------------------
def _u32(v):
    from tvm import tirx

    return tirx.const(v, "uint32")


def _nibbles_to_int8x4(u):
    """uint32 with four 4-bit values in the low nibbles of its bytes -> four sign-extended int8."""
    from tvm import tirx

    x = u & _u32(0x0F0F0F0F)
    return tirx.reinterpret("int32", x | (((x >> _u32(3)) & _u32(0x01010101)) * _u32(0xF0)))


#: The device function the kernels call for dp4a; its definition (inline PTX ``dp4a.s32.s32``) is
#: put in front of the generated CUDA source by :func:`_postproc`.  NVRTC 11.8 declares the CUDA
#: intrinsic ``__dp4a`` but leaves it undefined (ptxas: unresolved extern ``_Z6__dp4aiii``).
DP4A_FUNC = "dsconv_dp4a"
_DP4A_DEF = """
__device__ __forceinline__ int dsconv_dp4a(int a, int b, int c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 610
  int d;
  asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#else
  for (int i = 0; i < 4; ++i) c += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24);
  return c;
#endif
}
"""


def _postproc(code, _target=None):
    """CUDA codegen post-processing: the definition of ``dsconv_dp4a`` where the code uses it."""
    if f"{DP4A_FUNC}(" in code and f"int {DP4A_FUNC}(" not in code:
        code = _DP4A_DEF + code
    return code


def register_codegen_hook() -> None:
    """Register :func:`_postproc` as TVM's ``tvm_callback_cuda_postproc`` (idempotent)."""
    import tvm_ffi

    tvm_ffi.register_global_func("tvm_callback_cuda_postproc", _postproc, override=True)


def _dot4(a, b, acc, dp4a: bool):
    """acc + sum of the four int8 x int8 byte products of the int32 words a and b
    (b None: the sum of a's four bytes)."""
    from tvm import tirx

    if dp4a:
        ones = tirx.const(0x01010101, "int32")
        return tirx.call_pure_extern("int32", DP4A_FUNC, a, ones if b is None else b, acc)
    s = acc
    for i in range(4):        # sign-extended bytes, int32 multiply-adds (no int8 dot product)
        sh = tirx.const(24 - 8 * i, "int32")
        byte = (a << sh) >> 24
        s = s + (byte if b is None else byte * ((b << sh) >> 24))
    return s


def dsconv_te(layer, dp4a: bool = True):
    """TE tensors of one DSConv layer in the CUDA layout: (inputs, output)."""
    from tvm import te, tirx

    n, c, h, w = layer.in_shape
    co = layer.out_channels
    kh, kw = layer.kernel
    sh, sw = layer.geom.strides
    dh, dw = layer.geom.dilation
    pt, pl, pb, pr = layer.geom.padding
    g = layer.groups
    _, _, oh, ow = layer.out_shape
    hp, wpd = h + pt + pb, w + pl + pr
    mwords = _slots(layer) // 4

    x = te.placeholder((n, c, h, w), "float32", name="x")
    wq = te.placeholder(weight_shape(layer), "int32", name="w_words")
    xi = te.placeholder((g, kh, kw, co), layer.scale_dtype, name="xi")
    inputs = [x, wq, xi]
    bias = None
    if layer.has_bias:
        bias = te.placeholder((co,), "float32", name="bias")
        inputs.append(bias)
    zero = tirx.const(0.0, "float32")
    bfp = bfp_stages(x, layer)
    bfp_s = bfp.bfp_s

    def _mantissa_word(nn, gg, k4, yy, xx):
        word = _u32(0)
        for b in range(4):
            qi = bfp.mantissa(nn, gg, k4 * 4 + b, yy, xx).astype("int32")
            if layer.unsigned:
                qi = qi - 128                         # 0..255 -> -128..127: a signed byte
            word = word | ((qi & 0xFF).astype("uint32") << _u32(8 * b))
        return tirx.reinterpret("int32", word)

    bfp_m4 = te.compute((n, g, mwords, hp, wpd), _mantissa_word, name="bfp_m4")

    def _weight_words(gg, i, j, kw_, o):
        """The int8x4 weight words of packed word kw_: (word for m-word 2kw_, for 2kw_+1)."""
        u = tirx.reinterpret("uint32", wq[gg, i, j, kw_, o])
        return _nibbles_to_int8x4(u), _nibbles_to_int8x4(u >> _u32(4))

    nwords = weight_shape(layer)[3]
    rk = te.reduce_axis((0, nwords), name="rk")

    def _acc(nn, gg, i, j, p, q, o):
        yy, xx = p * sh + i * dh, q * sw + j * dw
        if layer.packed:
            w0, w1 = _weight_words(gg, i, j, rk, o)
            v = _dot4(w1, bfp_m4[nn, gg, 2 * rk + 1, yy, xx],
                      _dot4(w0, bfp_m4[nn, gg, 2 * rk, yy, xx], tirx.const(0, "int32"), dp4a), dp4a)
        else:
            v = _dot4(wq[gg, i, j, rk, o], bfp_m4[nn, gg, rk, yy, xx], tirx.const(0, "int32"), dp4a)
        return te.sum(v, axis=rk)

    acc = te.compute((n, g, kh, kw, oh, ow, co), _acc, name="dsconv_acc")

    wsum = None
    if layer.unsigned:
        rs = te.reduce_axis((0, nwords), name="rs")

        def _wsum(gg, i, j, o):
            if layer.packed:
                w0, w1 = _weight_words(gg, i, j, rs, o)
                v = _dot4(w1, None, _dot4(w0, None, tirx.const(0, "int32"), dp4a), dp4a)
            else:
                v = _dot4(wq[gg, i, j, rs, o], None, tirx.const(0, "int32"), dp4a)
            return te.sum(v, axis=rs)

        wsum = te.compute((g, kh, kw, co), _wsum, name="dsconv_wsum")

    rg = te.reduce_axis((0, g), name="rg")
    ri = te.reduce_axis((0, kh), name="ri")
    rj = te.reduce_axis((0, kw), name="rj")

    def _out(nn, o, p, q):
        a = acc[nn, rg, ri, rj, p, q, o]
        if wsum is not None:
            a = a + wsum[rg, ri, rj, o] * 128          # the 128 taken off each unsigned mantissa
        return te.sum(a.astype("float32") * xi[rg, ri, rj, o].astype("float32")
                      * bfp_s[nn, rg, p * sh + ri * dh, q * sw + rj * dw], axis=[rg, ri, rj])

    out = te.compute((n, co, oh, ow), _out, name="dsconv_out")

    def _epilogue(nn, o, p, q):
        v = out[nn, o, p, q]
        if bias is not None:
            v = v + bias[o]
        if layer.activation == "relu":
            v = tirx.max(v, zero)
        return v

    return inputs, te.compute((n, co, oh, ow), _epilogue, name="dsconv_epilogue")


def dsconv_primfunc(layer, dp4a: bool = True):
    """The PrimFunc of one DSConv layer for CUDA (unscheduled; :class:`DSConvCUDA` schedules it)."""
    from tvm import te

    if layer.activation not in ("none", "relu"):
        raise ValueError(f"unsupported activation {layer.activation!r}")
    inputs, y = dsconv_te(layer, dp4a)
    func = te.create_prim_func([*inputs, y]).without_attr("global_symbol")
    attr = (f"bits={layer.bits} block={layer.block} mantissa={layer.mantissa} unsigned={int(layer.unsigned)} "
            f"in={list(layer.in_shape)} out={list(layer.out_shape)} kernel={list(layer.kernel)} "
            f"layout=cuda dp4a={int(dp4a)}")
    return func.with_attr("dsconv.layer", attr).with_attr("op_pattern", 8)


class Kernels:
    """What :class:`dsconv_tvm.transform.DSConvRewrite` needs to build layers for a CUDA arch."""

    def __init__(self, arch: str):
        self.arch = arch
        self.dp4a = has_dp4a(arch)

    def primfunc(self, layer):
        return dsconv_primfunc(layer, self.dp4a)

    @staticmethod
    def pack_weights(q, bits, block):
        return pack_weights(q, bits, block)

    @staticmethod
    def pack_scales(xi, scale_dtype):
        return pack_scales(xi, scale_dtype)


# --------------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------------
THREADS = 128


def _has_blocks(sch, names) -> bool:
    try:
        for name in names:
            sch.get_sblock(name)
    except Exception:  # noqa: BLE001
        return False
    return True


def is_dsconv_cuda(func) -> bool:
    from tvm import s_tir, tirx

    return isinstance(func, tirx.PrimFunc) and _has_blocks(s_tir.Schedule(func), CUDA_BLOCKS)


def _bind_spatial(sch, block, threads: int = THREADS) -> None:
    """Fuse the leading spatial loops of ``block`` and spread them over blocks x threads."""
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    spatial = []
    for lp, k in zip(loops, kinds):
        if k != 0:
            break
        spatial.append(lp)
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def schedule_dsconv_cuda(func, target):
    """Default schedule: one output pixel x ``VO`` output channels per thread, threads along the
    output row (coalesced mantissa reads and output writes, weights broadcast in a warp); the int32
    block dot products of each (block, tap) stay in registers, fused bias/ReLU epilogue."""
    from tvm import s_tir

    register_codegen_hook()
    sch = s_tir.Schedule(func)
    out_blk = sch.get_sblock("dsconv_out")
    acc_blk = sch.get_sblock("dsconv_acc")
    epi_blk = sch.get_sblock("dsconv_epilogue")
    n_, o_, p_, q_, rg, ri, rj = sch.get_loops(out_blk)
    co = int(sch.get(o_).extent)
    vo = next(v for v in (4, 2, 1) if co % v == 0)
    oo, oi = sch.split(o_, [None, vo])
    sch.reorder(n_, oo, p_, q_, rg, ri, rj, oi)
    spatial = sch.fuse(n_, oo, p_, q_)
    bx, tx = sch.split(spatial, [None, THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.unroll(oi)
    sch.compute_at(acc_blk, oi, preserve_unit_loops=True)
    a_k = sch.get_loops(acc_blk)[-1]
    sch.unroll(a_k)
    sch.set_scope(acc_blk, 0, "local")
    sch.set_scope(out_blk, 0, "local")
    sch.reverse_compute_at(epi_blk, tx)
    sch.decompose_reduction(acc_blk, a_k)
    sch.decompose_reduction(out_blk, rg)
    for name in ("amax", "bfp_e", "bfp_s", "bfp_m4", "dsconv_wsum"):
        if _has_blocks(sch, [name]):
            _bind_spatial(sch, sch.get_sblock(name))
    return sch


def _dlight():
    from tvm.s_tir import dlight

    class DSConvCUDA(dlight.ScheduleRule):
        """Default schedule of the CUDA DSConv PrimFuncs."""

        def is_target_available(self, target) -> bool:
            return target.kind.name == "cuda"

        def apply(self, func, target, _tunable):
            if not self.is_target_available(target) or not is_dsconv_cuda(func):
                return None
            return schedule_dsconv_cuda(func, target)

    return DSConvCUDA


def default_schedule_pass():
    """DSConv rule first, then TVM's dlight GPU rules for every other PrimFunc."""
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(_dlight()(), dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                   dl.gpu.GeneralReduction(), dl.gpu.Fallback())


def legalize_passes(target) -> list:
    """CUDA library dispatch + legalize + fusion, without TVM's dlight pass (what tuning extracts)."""
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda_pipe

    return cuda_pipe.library_dispatch_passes(target) + [
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]


def tuning_worker_init() -> None:
    """MetaSchedule builder worker initializer for CUDA targets."""
    from .tuning import cpu_intrinsics_only

    cpu_intrinsics_only()
    register_codegen_hook()


def tuning_export(arch: str, ptx_version: str | None = None):
    """MetaSchedule ``f_export``: candidates exported with PTX (the runner needs no compile callback)."""
    def export(mod) -> str:        # runs in the builder worker
        path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
        mod.export_library(path, fpack_imports=pack_imports(arch, ptx_version, check_ptxas=False))
        return path
    return export


# --------------------------------------------------------------------------------------------------
# NVRTC -> PTX
# --------------------------------------------------------------------------------------------------
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
        res = subprocess.run([ptxas, f"-arch={arch}", str(src), "-o", str(out)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise TargetError(f"ptxas rejects the PTX for {arch}: {res.stderr.strip().splitlines()[:1]}")
        return out.read_bytes()


# --------------------------------------------------------------------------------------------------
# the device code inside the exported .so
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# hooks used by targets.py / compiler.py
# --------------------------------------------------------------------------------------------------
def resolve_target_dict(spec, d: dict) -> dict:
    """The TVM target dict of a CUDA target spec; ``detect_host`` targets get the arch of this
    machine's GPU (nvidia-smi or $DSCONV_CUDA_ARCH) and the detected host CPU."""
    if not spec.detect_host:
        return d
    arch = detect_gpu_arch()
    if arch is None:
        raise TargetError(f"target '{spec.name}': no NVIDIA GPU found (nvidia-smi missing or lists none); "
                          f"set DSCONV_CUDA_ARCH=sm_XY to compile for one, or use a jetson-* target")
    from .targets import get_target

    d["arch"] = arch
    d["host"] = get_target("x86").resolved_target_dict()
    return d


def spec_arch(spec) -> str:
    return str(spec.resolved_target_dict()["arch"])


def export_options(spec) -> dict:
    """``export_library`` keyword arguments for a CUDA target: pack PTX, not CUDA source."""
    if not nvrtc_available():
        raise TargetError(f"target '{spec.name}' needs NVRTC 11.8 to put PTX into the .so; {NVRTC_HINT}")
    return {"fpack_imports": pack_imports(spec_arch(spec), (spec.cuda or {}).get("ptx_version"))}


def kernels_for(spec) -> Kernels | None:
    """The DSConv kernel family of a target: :class:`Kernels` for CUDA targets, None (CPU) else."""
    return Kernels(spec_arch(spec)) if spec.cuda is not None else None
