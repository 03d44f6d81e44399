"""Convolution geometry: stride, padding, dilation, output size, and the input windows of a tap."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, padding (top, left, bottom, right) and dilation of a 2-D convolution."""

    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)

    def out_size(self, h: int, w: int, kh: int, kw: int) -> tuple[int, int]:
        pt, pl, pb, pr = self.padding
        oh = (h + pt + pb - self.dilation[0] * (kh - 1) - 1) // self.strides[0] + 1
        ow = (w + pl + pr - self.dilation[1] * (kw - 1) - 1) // self.strides[1] + 1
        return oh, ow


def windows(a: np.ndarray, geom: ConvGeometry, oh: int, ow: int, i: int, j: int) -> np.ndarray:
    """``a[..., i*dh + p*sh, j*dw + q*sw]`` for all output pixels (p, q) of tap (i, j) of a padded
    NCHW array."""
    sh, sw = geom.strides
    dh, dw = geom.dilation
    y0, x0 = i * dh, j * dw
    return a[:, :, y0:y0 + sh * (oh - 1) + 1:sh, x0:x0 + sw * (ow - 1) + 1:sw]
