"""CUDA code generation hooks: the ``dsconv_dp4a`` device function the kernels call, put in front
of TVM's generated CUDA source by TVM's post-processing callback."""

from __future__ import annotations

#: The device function the kernels call for dp4a; its definition (inline PTX ``dp4a.s32.s32``) is
#: put in front of the generated CUDA source by :func:`postproc`.  NVRTC 11.8 declares the CUDA
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


def postproc(code, _target=None):
    """CUDA codegen post-processing: the definition of ``dsconv_dp4a`` where the code uses it."""
    if f"{DP4A_FUNC}(" in code and f"int {DP4A_FUNC}(" not in code:
        code = _DP4A_DEF + code
    return code


def register_codegen_hook() -> None:
    """Register :func:`postproc` as TVM's ``tvm_callback_cuda_postproc`` (idempotent)."""
    import tvm_ffi

    tvm_ffi.register_global_func("tvm_callback_cuda_postproc", postproc, override=True)
