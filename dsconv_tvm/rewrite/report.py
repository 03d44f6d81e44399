"""What the DSConv rewrite did to each conv of a model (the compile summary and ``--report-json``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..scheme.geometry import ConvGeometry
from ..scheme.layer import DSConvLayer


@dataclass
class LayerReport:
    """What happened to one conv2d of the model."""

    name: str
    converted: bool
    reason: str                       # why it was kept (empty when converted)
    weight_shape: tuple[int, ...]
    in_shape: tuple[int, ...] = ()
    fp32_bytes: int = 0
    deployed_bytes: int = 0
    sqnr_db: float = float("nan")
    unsigned: bool = False
    fused: tuple[str, ...] = ()
    geom: ConvGeometry | None = None
    quantized: object = None          # the QuantizedWeight (for references), when converted
    bias: np.ndarray | None = None
    activation: str = "none"
    func_name: str = ""               # the PrimFunc the layer calls, when converted
    layer: DSConvLayer | None = None  # what its kernel is specialised on, when converted
    bits: int = 0                     # its weight bits, when converted (mixed precision: per layer)
    bfp: tuple[str, ...] = ()         # fused BFP: "in" (reads BFP), "out" / "out+fp32" (writes it); channel-
    #                                   innermost floats: "fp32-nhwc" (writes), "in-nhwc" (reads)


@dataclass
class ConversionReport:
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def converted(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.converted]

    @property
    def kept(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.converted]
