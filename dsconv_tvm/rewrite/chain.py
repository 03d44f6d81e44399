"""Fused BFP between DSConv layers: which converted layers hand their output to the next ones in
block floating point instead of float32.

A layer (the producer) whose output is the input of converted layers (the consumers) writes, in its
epilogue, the consumers' BFP input -- stored mantissas and block exponents -- and the consumers read
it instead of quantizing a float tensor in a separate pass. Conditions: the backend has such
kernels, every consumer reads the same BFP format (block, mantissa bits, signedness, slots), the
producer's output channels are a whole number of those blocks (its schedule quantizes a pixel tile
once all of a block's channels are done), and the producer is a conv (not a classifier run as a 1x1
conv). When something else uses the float output too (a pooling, the model's output, a depthwise
conv, another consumer format) the producer is not chained; when that something is only the residual
add of chained producers (a ResNet bottleneck's output, also read by the next bottleneck's residual
add), it is, and that float tensor travels channel-innermost (:func:`_chain_residual_streams`). A
residual add and the activation are in the producer's epilogue, so they are fused with the
quantization too."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class PlannedLayer:
    """One converted layer as planned by the rewrite, before its PrimFunc is made."""

    name: str
    layer: object                 # its DSConvLayer (the fused-BFP fields set by chain_layers)
    data: object                  # the Relax var of its input
    consts: list                  # its constant arguments (relax constants): its prologue's, then
    #                               the layer's own put before them once it is computed
    residual: object = None       # the Relax var of its residual input, if any
    dense: bool = False           # a classifier run as a 1x1 conv on the reshaped input
    report: object = None         # its LayerReport
    gv: object = None             # its PrimFunc's GlobalVar, once added
    outputs: list | None = None   # the Relax types of its outputs (:meth:`out_sinfo`), once added

    def out_sinfo(self, func) -> list:
        """Relax tensor types of its outputs, read from its PrimFunc ``func``: the float output
        and/or the consumers' BFP input (mantissas, exponents) in the backend's layout."""
        from tvm import relax

        layer = self.layer
        count = 1
        if layer.bfp_output is not None:
            count = int(layer.fp32_output) + 2
        bufs = list(func.params)[-count:]            # buffer-typed params: shape, dtype
        return [relax.TensorType([int(d) for d in b.shape], str(b.dtype)) for b in bufs]


@dataclasses.dataclass
class GroupedConv:
    """A grouped conv as planned: ``data`` split along the channels into ``len(groups)`` parts, one
    PlannedLayer (its ``data`` unset) on each, their outputs concatenated.  Not chained: its layers
    read and write float32."""

    data: object
    groups: list


def chain_layers(plans: list[tuple[object, PlannedLayer]], uses: dict, input_format,
                 with_fp32: bool = False) -> int:
    """Set the fused-BFP fields of the planned layers (``plans``: (output var, plan) in binding
    order; ``uses``: how often each var is used in the function; ``input_format``: a layer ->
    the BFP format it reads a fused input in, the backend's ``bfp_format``).  ``with_fp32``: chain also
    producers whose float output is used elsewhere too (they write both; off by default: measured
    slower on ResNet-50, the float output written from the channel-innermost tile is a transpose,
    e.g. 64->256 at 56x56 0.39 -> 0.77 ms, more than its consumer saves).  Returns the number of
    chained producers."""
    consumers: dict = {}
    for _, plan in plans:
        # a layer with a prologue reads the float tensor (it applies the prologue before
        # quantizing): to its producer it is a float user like any other
        if not plan.dense and not plan.layer.has_prologue:
            consumers.setdefault(plan.data, []).append(plan)
    chained = 0
    for end, plan in plans:
        readers = consumers.get(end, [])
        formats = {input_format(r.layer) for r in readers}
        if plan.dense or len(formats) != 1:
            continue
        fmt = formats.pop()
        if plan.layer.out_channels % fmt.block:
            continue
        keep_fp32 = uses.get(end, 0) > len(readers)
        if keep_fp32 and not with_fp32:
            continue
        _chain(plan, readers, fmt, keep_fp32)
        chained += 1
    return chained + _chain_residual_streams(plans, uses, consumers, input_format)


def _chain(plan: PlannedLayer, readers: list, fmt, keep_fp32: bool, nhwc: bool = False) -> None:
    plan.layer = dataclasses.replace(plan.layer, bfp_output=fmt, fp32_output=keep_fp32, fp32_nhwc=nhwc)
    plan.report.bfp = (*plan.report.bfp, ("out+fp32-nhwc" if nhwc else "out+fp32") if keep_fp32 else "out")
    for reader in readers:
        reader.layer = dataclasses.replace(reader.layer, bfp_input=True)
        reader.report.bfp = ("in", *reader.report.bfp)


def write_fp32_nhwc(plan: PlannedLayer) -> None:
    """The planned layer writes its float output channel-innermost ([N, H, W, C]; reported
    "fp32-nhwc")."""
    plan.layer = dataclasses.replace(plan.layer, fp32_nhwc=True)
    plan.report.bfp = (*plan.report.bfp, "fp32-nhwc")


def _chain_residual_streams(plans, uses: dict, consumers: dict, input_format) -> int:
    """Producers whose float output is read, besides their consumers, only as the residual of
    chained producers (a ResNet bottleneck's output: the next bottleneck's first conv and its
    residual add): chained too, the float output written channel-innermost ([N, H, W, C]) from the
    producer's tile and read so by the residual adds (their epilogue tile is channel-innermost):
    no transpose on either side.  Decided from the last layer back, repeated until nothing
    changes (a residual reader must be chained before its producer is)."""
    residual_readers: dict = {}
    for _, plan in plans:
        if plan.residual is not None:
            residual_readers.setdefault(plan.residual, []).append(plan)
    chained, before = 0, -1
    while chained != before:         # until nothing changes (a residual reader may come first)
        before = chained
        chained += _residual_pass(plans, uses, consumers, residual_readers, input_format)
    return chained


def _residual_pass(plans, uses: dict, consumers: dict, residual_readers: dict, input_format) -> int:
    chained = 0
    for end, plan in reversed(plans):
        if plan.layer.fp32_nhwc:
            continue
        readers, adds = consumers.get(end, []), residual_readers.get(end, [])
        formats = {input_format(r.layer) for r in readers}
        if plan.dense or plan.layer.bfp_output is not None or len(formats) > 1 or not adds or \
                uses.get(end, 0) != len(readers) + len(adds) or \
                any(a.layer.bfp_output is None for a in adds):
            continue
        if not readers:              # read only by residual adds (a downsample conv)
            write_fp32_nhwc(plan)
        else:
            fmt = formats.pop()
            if plan.layer.out_channels % fmt.block:
                continue
            _chain(plan, readers, fmt, True, nhwc=True)
        for add in adds:
            add.layer = dataclasses.replace(add.layer, residual_nhwc=True)
        chained += 1
    return chained
