"""The CUDA DSConv kernel as TE (desktop GPUs and Jetson): its data layout and one PrimFunc per layer.

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
4. ``dsconv_out``  float sum over blocks and taps of acc * xi * scale; ``dsconv_epilogue`` bias/ReLU
   (both shared with the CPU kernel, :mod:`dsconv_tvm.backends.common`).

The schedule is in :mod:`.schedule`, the device code (PTX in the ``.so``) in :mod:`.ptx`.
"""

from __future__ import annotations

import numpy as np

from ..common import bfp_stages, block_scaled_sum, epilogue, layer_primfunc, slot_weights
from .codegen import DP4A_FUNC


def slots(layer) -> int:
    """Channel slots per block: a multiple of 8 (4-bit: 8 per word) or 4 (8-bit: 4 per word)."""
    step = 8 if layer.packed else 4
    return -(-layer.block // step) * step


def weight_shape(layer) -> tuple[int, ...]:
    kh, kw = layer.kernel
    per_word = 8 if layer.packed else 4
    return (layer.groups, kh, kw, slots(layer) // per_word, layer.out_channels)


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


def _u32(v):
    from tvm import tirx

    return tirx.const(v, "uint32")


def _nibbles_to_int8x4(u):
    """uint32 with four 4-bit values in the low nibbles of its bytes -> four sign-extended int8."""
    from tvm import tirx

    x = u & _u32(0x0F0F0F0F)
    return tirx.reinterpret("int32", x | (((x >> _u32(3)) & _u32(0x01010101)) * _u32(0xF0)))


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

    if layer.has_prologue:              # CUDABackend.fuses_prologue is off: the rewrite never asks
        raise ValueError("the CUDA kernels apply no prologue to their input")
    n, c, h, w = layer.in_shape
    co = layer.out_channels
    kh, kw = layer.kernel
    sh, sw = layer.geom.strides
    dh, dw = layer.geom.dilation
    pt, pl, pb, pr = layer.geom.padding
    g = layer.groups
    _, _, oh, ow = layer.out_shape
    hp, wpd = h + pt + pb, w + pl + pr
    mwords = slots(layer) // 4

    x = te.placeholder((n, c, h, w), "float32", name="x")
    wq = te.placeholder(weight_shape(layer), "int32", name="w_words")
    xi = te.placeholder((g, kh, kw, co), layer.scale_dtype, name="xi")
    inputs = [x, wq, xi]
    bias = None
    if layer.has_bias:
        bias = te.placeholder((co,), "float32", name="bias")
        inputs.append(bias)
    bfp = bfp_stages(x, layer)

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

    def _block_int(nn, gg, i, j, p, q, o):
        a = acc[nn, gg, i, j, p, q, o]
        if wsum is not None:
            a = a + wsum[gg, i, j, o] * 128          # the 128 taken off each unsigned mantissa
        return a

    out = block_scaled_sum(layer, _block_int, xi, bfp.bfp_s)
    return inputs, epilogue(layer, out, bias)


def dsconv_primfunc(layer, dp4a: bool = True):
    """The PrimFunc of one DSConv layer for CUDA (unscheduled; :mod:`.schedule` schedules it)."""
    inputs, y = dsconv_te(layer, dp4a)
    attr = (f"bits={layer.bits} block={layer.block} mantissa={layer.mantissa} unsigned={int(layer.unsigned)} "
            f"in={list(layer.in_shape)} out={list(layer.out_shape)} kernel={list(layer.kernel)} "
            f"layout=cuda dp4a={int(dp4a)}")
    return layer_primfunc([*inputs, y], attr)
