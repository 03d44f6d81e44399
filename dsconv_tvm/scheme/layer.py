"""What the kernel of one converted layer is specialised on: the description the rewrite hands to a
backend (:meth:`dsconv_tvm.backends.base.Backend.primfunc`).  No layout here: each backend packs
weights and stores mantissas its own way."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .bfp import num_blocks
from .geometry import ConvGeometry

#: The activations a layer's epilogue applies, each a clamp to constant bounds [lower, upper]
#: (infinite: that side is not clamped).  Named, not free bounds: a kernel is specialised on the name.
ACTIVATIONS = {"none": (-math.inf, math.inf), "relu": (0.0, math.inf), "relu6": (0.0, 6.0)}
ACT_DTYPES = ("uint8", "int8")
#: The per-channel ops of a prologue: ``x op c[channel]`` (as ONNX BatchNormalization is decomposed)
PROLOGUE_OPS = ("subtract", "divide", "multiply", "add")


@dataclass(frozen=True)
class BFPFormat:
    """How a consumer layer reads its input in block floating point: the block size, the mantissa
    bits and whether the mantissas are unsigned (the storage type is the backend's)."""

    block: int
    mantissa: int
    unsigned: bool
    slots: int                   # channel slots per block of the stored mantissas (Bp, >= block)


@dataclass(frozen=True)
class DSConvLayer:
    """Everything the kernel of one converted layer is specialised on."""

    in_shape: tuple[int, int, int, int]        # N, C, H, W
    out_channels: int
    kernel: tuple[int, int]
    geom: ConvGeometry
    bits: int
    block: int
    mantissa: int
    unsigned: bool = False
    scale_dtype: str = "float32"
    has_bias: bool = False
    activation: str = "none"
    act_dtype: str = "uint8"                   # mantissa storage (uint8: x86, int8: ARM)
    has_residual: bool = False                 # epilogue adds a tensor of the output's shape
    # fused BFP between layers: the input arrives already quantized (mantissas and exponents written
    # by the producer's epilogue); the output is also (or only) written quantized for the
    # consumers' format
    bfp_input: bool = False
    bfp_output: BFPFormat | None = None
    fp32_output: bool = True
    # the float tensors that only residual adds of fused layers read, channel-innermost
    # ([N, H, W, C]): this layer's residual input, and its float output (with bfp_output)
    residual_nhwc: bool = False
    fp32_nhwc: bool = False
    # the float input channel-innermost ([N, H, W, C]): written so by a depthwise conv run in NHWC
    # between two DSConv layers (an inverted residual block, see rewrite/nhwc.py)
    input_nhwc: bool = False
    # a prologue on the float input before it is quantized (a pre-activation BN + ReLU absorbed
    # from the graph): per-channel ops (PROLOGUE_OPS, each with one constant [C] param after the
    # bias) applied in order, then max(., 0) with prologue_relu; in float32, as the ops it replaces
    prologue: tuple[str, ...] = ()
    prologue_relu: bool = False
    # output channels the kernel computes (0: out_channels): a backend pads them to its vector
    # lanes with zero weights; only out_channels are written
    out_slots: int = 0

    @property
    def computed_channels(self) -> int:
        return max(self.out_slots, self.out_channels)

    @property
    def has_prologue(self) -> bool:
        return bool(self.prologue) or self.prologue_relu

    @property
    def packed(self) -> bool:
        """Nibble-packed (b <= 4) in the CUDA layout; the CPU layout has its own fields per byte
        (``backends.cpu.layout.per_byte``: 2-bit weights four per byte)."""
        return self.bits <= 4

    @property
    def groups(self) -> int:
        return num_blocks(self.in_shape[1], self.block)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        n, _, h, w = self.in_shape
        oh, ow = self.geom.out_size(h, w, *self.kernel)
        return n, self.out_channels, oh, ow

    @property
    def macs(self) -> int:
        """Integer multiply-accumulates of one call (the float conv's MAC count)."""
        n, co, oh, ow = self.out_shape
        return n * co * oh * ow * self.in_shape[1] * self.kernel[0] * self.kernel[1]


def activation_for_bounds(lower: float, upper: float) -> str | None:
    """The activation that clamps to [lower, upper] (None when no activation does: not absorbed)."""
    for name, bounds in ACTIVATIONS.items():
        if bounds == (float(lower), float(upper)):
            return name
    return None
