"""Inverted residual blocks channel-innermost: expansion DSConv -> depthwise fp32 conv -> projection
DSConv (MobileNetV2) with the float tensors between them in [N, H, W, C].

The projection quantizes its float input per pixel and block of channels, channel-innermost: from
an NCHW tensor that is a gather of channels H x W floats apart; here the expansion writes its float
output channel-innermost from its epilogue tile (``DSConvLayer.fp32_nhwc``), the depthwise conv
(with its bias add and clamp) runs on that layout (the backend's
``Backend.depthwise_nhwc_primfunc``), and the projection reads it so (``DSConvLayer.input_nhwc``):
contiguous vectors everywhere.  Where it applies: the depthwise conv's input is a DSConv layer's
float output read by nothing else, and its output is read only by DSConv layers as their input
(not as a residual, not with a prologue, not a classifier); elsewhere the depthwise conv stays as
the graph has it (NCHW).  The integers are the same; the depthwise sum runs in another order."""

from __future__ import annotations

import dataclasses

from .chain import PlannedLayer, write_fp32_nhwc


@dataclasses.dataclass
class PlannedDepthwise:
    """A depthwise conv (with the bias add and clamps it absorbs) that may run channel-innermost."""

    name: str
    data: object                  # the Relax var of its input
    w: object                     # the OIHW weight (C, 1, KH, KW), numpy
    bias: object                  # [C] numpy, or None
    in_shape: tuple
    kernel: tuple
    geom: object
    activation: str
    absorbed: list                # the vars of the conv and the ops it absorbs, but the last
    report: object                # its LayerReport (kept fp32)
    consts: list = dataclasses.field(default_factory=list)
    gv: object = None
    outputs: list | None = None


def chain_depthwise(plans: dict, dropped: set, uses: dict) -> int:
    """Decide which planned depthwise convs (values of ``plans``: output var -> plan) run
    channel-innermost and set their neighbours' layout flags; the others are taken out of
    ``plans`` and their absorbed vars out of ``dropped`` (the graph keeps them as they are).
    ``uses``: how often each var is used.  Returns the number chained."""
    readers: dict = {}
    for plan in plans.values():
        if isinstance(plan, PlannedLayer):
            readers.setdefault(plan.data, []).append(plan)
    chained = 0
    for end, dw in list(plans.items()):
        if not isinstance(dw, PlannedDepthwise):
            continue
        producer = plans.get(dw.data)
        consumers = readers.get(end, [])
        if isinstance(producer, PlannedLayer) and not producer.dense and uses.get(dw.data, 0) == 1 and \
                producer.layer.bfp_output is None and not producer.layer.fp32_nhwc and consumers and \
                uses.get(end, 0) == len(consumers) and \
                not any(c.dense or c.layer.has_prologue or c.layer.bfp_input for c in consumers):
            write_fp32_nhwc(producer)
            for c in consumers:
                c.layer = dataclasses.replace(c.layer, input_nhwc=True)
                c.report.bfp = ("in-nhwc", *c.report.bfp)
            dw.report.reason += "; run channel-innermost (NHWC) between DSConv layers"
            chained += 1
            continue
        del plans[end]
        dropped.difference_update(dw.absorbed)
    return chained
