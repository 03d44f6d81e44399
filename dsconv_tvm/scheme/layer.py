"""What the kernel of one converted layer is specialised on: the description the rewrite hands to a
backend (:meth:`dsconv_tvm.backends.base.Backend.primfunc`).  No layout here: each backend packs
weights and stores mantissas its own way."""

from __future__ import annotations

from dataclasses import dataclass

from .bfp import num_blocks
from .geometry import ConvGeometry

ACTIVATIONS = ("none", "relu")
ACT_DTYPES = ("uint8", "int8")


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
