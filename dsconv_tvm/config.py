"""The DSConv quantization scheme: one dataclass owns every knob and validates it.

Defaults (documented in README.md):

* ``bits=4``: weights are 4-bit two's complement integers, clamped to [-8, 7].
* ``block=32``: one KDS scale per output channel, per block of 32 input channels, per kernel tap.
* ``mantissa=8``: block-floating-point activations with 8-bit mantissas.
* ``unsigned_after_relu=True``: when the conv input is known to be >= 0 (it comes straight from a
  ReLU/Clip(min>=0)) the mantissa is unsigned, i.e. one more bit of precision for free.
* ``fit="l2"``: the paper's KDS fit (largest weight of a slice on the grid's end, closed-form least
  squares scale).  ``fit="mse"`` (a clipping grid search minimising ||W - xi*Q||^2) has 0.1-1 dB
  lower weight error, but on the example models at W4 B=32 m=8 it lost more top-1 (total 1.37 pt
  over the three models vs 0.92 pt for l2; MobileNet 1.06 vs 0.41): measured, so l2 is the default.
* ``scale_dtype="float32"``: dtype in which xi is stored in the .so (``float16`` halves their bytes).
* ``first_layer="keep"``: the conv fed by the raw image stays fp32 (the paper does not BFP-quantize
  the image; with 1-3 input channels a block holds <= 3 weights per scale, so nothing is saved).
* ``depthwise="keep"``: depthwise and grouped convs stay fp32 (with groups == channels each block
  is one channel: one float per weight, no compression).  They are never silently rewritten.
* ``dense="keep"``: fully connected layers (a ``matmul`` with a constant weight, ONNX Gemm/MatMul)
  stay fp32; ``"dsconv"`` runs them as 1x1 DSConv layers (same blocks and scales along the input
  features).  Opt-in: the example models' accuracy was measured with fp32 classifiers; it is what
  brings ResNet-50's deployed weights under 0.16x at B=64 (its 2M-weight classifier is 8 % of it).
* ``skip``: layer names (ONNX node names or weight initializer names) that stay fp32.
* ``layer_bits``: per-layer weight bits ``{layer name: bits}`` overriding ``bits`` for those layers
  (mixed precision: what ``--bits auto`` chooses, :mod:`dsconv_tvm.accuracy.mixed`); each layer's
  packed format follows its own bits (the backend's layout: on CPUs 2-bit weights four per byte,
  3-/4-bit two per byte, wider ones one byte each; on CUDA <= 4 bits two per byte).
* ``fuse_bfp=True``: where a DSConv layer's output is the input of DSConv layers (all of the same
  BFP format: block, mantissa, signedness, slots), the producer's epilogue writes their BFP input
  (mantissas, exponents) and they read it: no separate
  quantization pass, and the float tensor is written only when something else uses it too
  (:mod:`dsconv_tvm.rewrite.chain`).  Used where the backend says it pays (``Backend.fuses_bfp``:
  x86 kernels; not ARM, not CUDA).  The bits are the same either way.
* ``nhwc_depthwise=True``: a depthwise conv between two DSConv layers (an inverted residual block:
  expansion 1x1 -> depthwise -> projection 1x1) runs channel-innermost, the expansion writing its
  float output so and the projection quantizing it from there (:mod:`dsconv_tvm.rewrite.nhwc`;
  where the backend has such kernels, ``Backend.nhwc_depthwise``).  The integers are the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import ConfigError

BITS_RANGE = (2, 8)
MANTISSA_RANGE = (2, 8)
FITS = ("l2", "mse")
SCALE_DTYPES = ("float32", "float16")
FIRST_LAYER_POLICIES = ("keep", "dsconv")
DEPTHWISE_POLICIES = ("keep",)
DENSE_POLICIES = ("keep", "dsconv")


@dataclass(frozen=True)
class DSConvConfig:
    bits: int = 4
    block: int = 32
    mantissa: int = 8
    unsigned_after_relu: bool = True
    fit: str = "l2"
    scale_dtype: str = "float32"
    first_layer: str = "keep"
    depthwise: str = "keep"
    skip: tuple[str, ...] = field(default_factory=tuple)
    dense: str = "keep"
    layer_bits: dict[str, int] = field(default_factory=dict)
    fuse_bfp: bool = True
    nhwc_depthwise: bool = True

    def __post_init__(self):
        def _int(name, value):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")

        _int("bits", self.bits)
        _int("block", self.block)
        _int("mantissa", self.mantissa)
        if not BITS_RANGE[0] <= self.bits <= BITS_RANGE[1]:
            raise ConfigError(f"--bits {self.bits} is out of range: weight bits must be "
                              f"{BITS_RANGE[0]}..{BITS_RANGE[1]}")
        if self.block < 1:
            raise ConfigError(f"--block {self.block} is out of range: the block size must be >= 1")
        if self.block > 4096:
            raise ConfigError(f"--block {self.block} is out of range: the block size must be <= 4096")
        if not MANTISSA_RANGE[0] <= self.mantissa <= MANTISSA_RANGE[1]:
            raise ConfigError(f"--mantissa {self.mantissa} is out of range: mantissa bits must be "
                              f"{MANTISSA_RANGE[0]}..{MANTISSA_RANGE[1]}")
        for name, value, allowed in (("fit", self.fit, FITS),
                                     ("scale_dtype", self.scale_dtype, SCALE_DTYPES),
                                     ("first_layer", self.first_layer, FIRST_LAYER_POLICIES),
                                     ("depthwise", self.depthwise, DEPTHWISE_POLICIES),
                                     ("dense", self.dense, DENSE_POLICIES)):
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")
        object.__setattr__(self, "skip", tuple(self.skip))
        if not isinstance(self.layer_bits, Mapping):
            raise ConfigError(f"layer_bits must be a mapping {{layer name: bits}}, got {self.layer_bits!r}")
        for name, bits in self.layer_bits.items():
            if not isinstance(name, str):
                raise ConfigError(f"layer_bits: layer names must be strings, got {name!r}")
            _int(f"layer_bits[{name!r}]", bits)
            if not BITS_RANGE[0] <= bits <= BITS_RANGE[1]:
                raise ConfigError(f"layer_bits[{name!r}] = {bits} is out of range: weight bits must be "
                                  f"{BITS_RANGE[0]}..{BITS_RANGE[1]}")
        object.__setattr__(self, "layer_bits", dict(self.layer_bits))

    def bits_for(self, name: str) -> int:
        """The weight bits of layer ``name``: its ``layer_bits`` entry, else ``bits``."""
        return self.layer_bits.get(name, self.bits)

    @property
    def packed(self) -> bool:
        """Two weights per byte (b <= 4); otherwise one int8 per weight."""
        return self.bits <= 4

    __hash__ = None                      # layer_bits is a dict

    def replace(self, **changes) -> "DSConvConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def scheme_bits(config: DSConvConfig) -> str:
    """``W4``, or for mixed precision ``mixed W4/W8 (3 layers W8, 17 W4)``."""
    if not config.layer_bits:
        return f"W{config.bits}"
    counts: dict[int, int] = {}
    for b in config.layer_bits.values():
        counts[b] = counts.get(b, 0) + 1
    order = sorted(counts, reverse=True)
    return (f"mixed W{'/W'.join(map(str, sorted(counts)))} (" +
            ", ".join(f"{counts[b]} layers W{b}" for b in order) + "; others W" + str(config.bits) + ")")
