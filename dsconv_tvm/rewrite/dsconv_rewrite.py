"""The Relax pass that rewrites conv2d into DSConv: ``DSConvRewrite(config)``.

It is an ordinary ``tvm.transform.Pass`` (a module pass) and can sit in any Relax pipeline after
the model is imported and constants are folded.  For every ``R.nn.conv2d`` with a constant weight
(NCHW / OIHW, static shapes, float32, not depthwise) it

* quantizes the weight (VQK + KDS, :mod:`dsconv_tvm.scheme.weights`) and packs it in the target
  backend's layout (two 4-bit values a byte),
* absorbs a following per-channel bias ``add`` and an activation (relu, relu6: a clamp to constant
  bounds, e.g. ONNX Relu or Clip(0, 6), which the frontend imports as maximum/minimum) when the conv
  output has no other user,
* absorbs a residual ``add`` where the backend's kernels fuse it, and a pre-activation before the conv
  (per-channel BN ops and / or ReLU: :mod:`.prologue`) where they apply it to their input,
* emits one ``R.call_tir`` to the backend's DSConv PrimFunc (:mod:`dsconv_tvm.backends`) that quantizes the input
  to block floating point at run time, does the int32 block dot products and the float scaling.

A grouped conv (1 < groups < channels) becomes split, one DSConv layer per group (``<name>/g0``, ...:
its weights, input channels, bias slice, activation; float32 in and out, no residual), concat.

A depthwise conv stays fp32; between two DSConv layers (an inverted residual block) it runs
channel-innermost with its bias add and clamp, as the backend's own kernel (:mod:`.nhwc`).

Convs it does not convert stay as they are and are listed, with the reason, in ``pass.report``.
The mantissa of a layer's input is unsigned when the input is provably >= 0 (it comes from a
ReLU or a Clip with a lower bound >= 0, possibly through pooling/reshapes) and
``config.unsigned_after_relu`` is set.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from ..backends.base import Backend, backend_for, deployed_bytes
from ..config import DSConvConfig
from ..errors import DSConvError
from ..scheme.geometry import ConvGeometry
from ..scheme.layer import DSConvLayer, activation_for_bounds
from ..scheme.metrics import sqnr_db
from ..scheme.weights import quantize_weight
from .chain import GroupedConv, PlannedLayer, chain_layers
from .facts import clamps_of, is_call, nonneg_vars
from .nhwc import PlannedDepthwise, chain_depthwise
from .prologue import const_value, match_prologue, single_user, static_shape
from .report import ConversionReport, LayerReport


def _padding4(pad) -> tuple[int, int, int, int]:
    p = [int(v) for v in pad]
    if len(p) == 1:
        p = p * 4
    elif len(p) == 2:
        p = [p[0], p[1], p[0], p[1]]
    return p[0], p[1], p[2], p[3]


@tvm.transform.module_pass(opt_level=0, name="DSConvRewrite")
class DSConvRewrite:
    """Rewrite every eligible constant-weight conv2d of every Relax function into DSConv.

    ``layer_names`` optionally names the conv2d calls in binding order (the ONNX frontend passes
    the ONNX node names); otherwise they are called ``conv0``, ``conv1``, ...  ``backend`` (from
    :func:`dsconv_tvm.backends.base.backend_for`) makes the layers' kernels.  After the pass has
    run, ``self.report`` is a :class:`ConversionReport`.
    """

    def __init__(self, config: DSConvConfig | None = None, layer_names: list[str] | None = None,
                 backend: Backend | None = None):
        self.config = config or DSConvConfig()
        # the kernels (PrimFunc, weight layout, mantissa storage) of the target; default: the CPU
        # kernels of a generic x86 target
        self.backend = backend if backend is not None else backend_for(tvm.target.Target("llvm"))
        self.layer_names = list(layer_names) if layer_names else None
        self.report = ConversionReport()

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        self.report = ConversionReport()
        # an error of ours raised in here reaches the caller through TVM's FFI as a plain error:
        # keep it, so that :func:`dsconv_tvm.driver.compile.rewrite_dsconv` can raise it as it was
        self.error = None
        try:
            bb = relax.BlockBuilder(mod)
            for gv, func in list(mod.functions_items()):
                if isinstance(func, relax.Function):
                    bb.update_func(gv, self._rewrite_function(bb, func, mod))
            return bb.get()
        except DSConvError as exc:
            self.error = exc
            raise

    # -- analysis ---------------------------------------------------------------------------
    def _rewrite_function(self, bb: relax.BlockBuilder, func: relax.Function, mod) -> relax.Function:
        bindings, uses, users, order = {}, {}, {}, []

        def counter(user):
            def count(expr):
                if isinstance(expr, relax.Var):
                    uses[expr] = uses.get(expr, 0) + 1
                    if user is not None:
                        users.setdefault(expr, []).append(user)
            return count

        for block in func.body.blocks:
            for binding in block.bindings:
                if isinstance(binding, relax.VarBinding):
                    bindings[binding.var] = binding.value
                    order.append(binding.var)
                    relax.analysis.post_order_visit(binding.value, counter(binding.var))
        relax.analysis.post_order_visit(func.body.body, counter(None))
        clamps = clamps_of(bindings, mod)
        nonneg = nonneg_vars(bindings, clamps)

        plans = {}            # final var of a chain -> new expression
        dropped = set()       # intermediate vars absorbed into a chain
        conv_index = 0
        claimed = {"vars": set(), "keep": set()}   # vars taken by chains; residual inputs
        dense_index = 0
        for var in order:
            value = bindings[var]
            dense = self.config.dense == "dsconv" and is_call(value, "relax.matmul")
            if dense:
                name, first = f"dense{dense_index}", False
                dense_index += 1
            elif is_call(value, "relax.nn.conv2d"):
                name = (self.layer_names[conv_index] if self.layer_names and conv_index < len(self.layer_names)
                        else f"conv{conv_index}")
                first = conv_index == 0
                conv_index += 1
            else:
                continue
            plan = self._plan_conv(bb, name, var, value, bindings, uses, users, (nonneg, clamps), first, claimed,
                                   dense)
            if plan is None:
                continue
            end_var, new_expr, absorbed, residual = plan
            plans[end_var] = new_expr
            dropped.update(absorbed)
            if not isinstance(new_expr, PlannedDepthwise):      # (a candidate only: chain_depthwise)
                claimed["vars"].update([*absorbed, end_var])
            if residual is not None:            # must stay bound: no later chain may absorb it
                claimed["keep"].add(residual)

        if not plans:
            return func
        if self.config.fuse_bfp and self.backend.fuses_bfp:     # grouped convs: float in, float out
            chain_layers([(v, p) for v, p in plans.items() if isinstance(p, PlannedLayer)], uses,
                         self.backend.bfp_format)
        chain_depthwise(plans, dropped, uses)
        for plan in (g for p in plans.values() for g in (p.groups if isinstance(p, GroupedConv) else [p])):
            if isinstance(plan, PlannedDepthwise):
                plan.consts = [relax.const(a) for a in self.backend.depthwise_nhwc_params(plan.w, plan.bias)]
                prim = self.backend.depthwise_nhwc_primfunc(plan.in_shape, plan.kernel, plan.geom,
                                                            plan.bias is not None, plan.activation)
                plan.gv = bb.add_func(prim, f"depthwise_conv_nhwc_{_ident(plan.name)}")
                plan.outputs = [relax.TensorType([int(d) for d in list(prim.params)[-1].shape], "float32")]
                continue
            self._constants(plan)
            prim = self.backend.primfunc(plan.layer)
            plan.gv = bb.add_func(prim, f"dsconv_{_ident(plan.name)}")
            plan.outputs = plan.out_sinfo(prim)
            plan.report.func_name = plan.gv.name_hint
        mutator = _Replace(plans, dropped)
        return mutator.visit_expr(func)

    def _plan_conv(self, bb, name, var, call, bindings, uses, users, facts, first, claimed, dense=False):
        """Plan one conv2d (or, ``dense``, one matmul ``x[N, K] @ W[K, OUT]`` run as a 1x1 conv on
        ``x`` reshaped to ``[N, K, 1, 1]``) and the ops it absorbs; ``facts``: the function's
        non-negative vars and clamps (:func:`.facts.nonneg_vars`, :func:`.facts.clamps_of`)."""
        cfg = self.config
        nonneg, clamps = facts
        attrs = call.attrs
        data, weight = call.args[0], call.args[1]
        w = const_value(weight, bindings)
        in_shape = static_shape(data)
        if dense:
            if w is None or w.ndim != 2 or in_shape is None or len(in_shape) != 2 or in_shape[1] != w.shape[0]:
                return None                 # not a plain fully connected layer: left as it is
            w = np.ascontiguousarray(w.T.reshape(w.shape[1], w.shape[0], 1, 1))
            in_shape = (in_shape[0], in_shape[1], 1, 1)
        wshape = tuple(w.shape) if w is not None else tuple(static_shape(weight) or ())

        def keep(reason):
            self.report.layers.append(LayerReport(name, False, reason, wshape, in_shape or (),
                                                  fp32_bytes=4 * int(np.prod(wshape or (0,))),
                                                  deployed_bytes=4 * int(np.prod(wshape or (0,)))))
            return None

        groups = 1 if dense else int(attrs.groups)
        if name in cfg.skip:
            return keep("skipped by --skip")
        if w is None:
            return keep("weight is not a constant")
        if not dense and (attrs.data_layout, attrs.kernel_layout) != ("NCHW", "OIHW") or \
                not dense and (attrs.out_layout and attrs.out_layout != "NCHW"):
            return keep(f"layout {attrs.data_layout}/{attrs.kernel_layout} (only NCHW/OIHW)")
        if in_shape is None or len(in_shape) != 4:
            return keep("input shape is not static 4-D")
        depthwise = groups != 1 and groups == in_shape[1]
        if depthwise:
            keep(f"depthwise conv (groups={groups}); policy depthwise={cfg.depthwise}")
            # it stays fp32; between two DSConv layers it may run channel-innermost (rewrite/nhwc.py)
            if not (cfg.nhwc_depthwise and self.backend.nhwc_depthwise and w.shape[:2] == (groups, 1)
                    and str(data.ty.dtype) == "float32" and w.dtype == np.float32):
                return None
        # else one DSConv layer per group (Relax's conv2d checks the channels divide by the groups)
        if str(data.ty.dtype) != "float32" or w.dtype != np.float32:
            return keep(f"dtype {data.ty.dtype} (only float32)")
        if first and cfg.first_layer == "keep" and not depthwise:
            return keep("first layer (input image); policy first_layer=keep")

        # absorb bias add and the activation when this conv feeds only them
        end, absorbed, fused = var, [], []
        bias = None
        co = int(w.shape[0])

        def next_op(v):          # the op the chain may absorb after v (None: the chain ends at v)
            n = single_user(v, uses, users)
            if n is None or n in claimed["vars"] or v in claimed["keep"]:
                return None
            return n

        nxt = next_op(end)
        if nxt is not None and is_call(bindings[nxt], "relax.add"):
            a, b = bindings[nxt].args
            other = b if a.same_as(end) else a
            bval = const_value(other, bindings)
            if bval is not None and bval.size == co and bval.ndim >= 1 and \
                    static_shape(nxt) == static_shape(end) and \
                    (bval.ndim == 1 or bval.shape[-2:] == (1, 1) or dense) and bval.ndim <= 4:
                bias = bval.reshape(co).astype(np.float32)
                absorbed.append(end)
                end = nxt
                fused.append("bias")
                nxt = next_op(end)
        # a residual add (another tensor of the output's shape, computed before this conv's user)
        residual = None
        if nxt is not None and self.backend.fuses_residual and not dense and groups == 1 and \
                is_call(bindings[nxt], "relax.add"):
            a, b = bindings[nxt].args
            other = b if a.same_as(end) else a
            if isinstance(other, relax.Var) and not other.same_as(end) and \
                    const_value(other, bindings) is None and \
                    static_shape(other) == static_shape(end) == static_shape(nxt) and \
                    str(other.ty.dtype) == "float32":
                residual = other
                absorbed.append(end)
                end = nxt
                fused.append("residual")
                nxt = next_op(end)
        # the activation: the clamps that follow (relu6: maximum(., 0) then minimum(., 6)) while
        # together they are one of the kernels' activations
        activation, lower, upper = "none", -math.inf, math.inf
        while nxt is not None and nxt in clamps and clamps[nxt][0].same_as(end):
            lo, hi = max(lower, clamps[nxt][1]), min(upper, clamps[nxt][2])
            named = activation_for_bounds(lo, hi)
            if named is None:
                break
            absorbed.append(end)
            end, activation, lower, upper = nxt, named, lo, hi
            nxt = next_op(end)
        if activation != "none":
            fused.append(activation)

        if dense:
            geom = ConvGeometry()
        else:
            strides = tuple(int(s) for s in attrs.strides)
            dilation = tuple(int(d) for d in attrs.dilation)
            geom = ConvGeometry(strides, _padding4(attrs.padding), dilation)
        if depthwise:
            return end, PlannedDepthwise(name, data, w, bias, in_shape, (int(w.shape[2]), int(w.shape[3])), geom,
                                         activation, absorbed, self.report.layers[-1]), absorbed, None
        unsigned = cfg.unsigned_after_relu and data in nonneg
        bits = cfg.bits_for(name)            # mixed precision: a per-layer override (a grouped conv's node name)
        if groups == 1:
            pro = match_prologue(data, in_shape, bindings, uses, users, clamps, claimed["vars"] | claimed["keep"]) \
                if self.backend.fuses_prologue and not dense else None
            plan = self._layer(name, data, w, in_shape, bias, geom, bits, unsigned, activation, fused, residual,
                               dense, pro)
            return end, plan, absorbed + (pro.absorbed if pro else []), residual
        # one layer per group: its weights, its input channels, its slice of the bias
        ci, cg = int(in_shape[1]) // groups, co // groups
        plans = [self._layer(f"{name}/g{g}", None, w[g * cg:(g + 1) * cg], (in_shape[0], ci, *in_shape[2:]),
                             None if bias is None else bias[g * cg:(g + 1) * cg], geom, bits, unsigned,
                             activation, fused, None, False, None) for g in range(groups)]
        return end, GroupedConv(data, plans), absorbed, None

    def _constants(self, plan: PlannedLayer) -> None:
        """The planned layer as the backend's kernel computes it, once it is known whether it
        writes fused BFP (:meth:`Backend.computed_layer`: e.g. output channels padded to the
        vector lanes), and its constant arguments, before those of its prologue."""
        layer = self.backend.computed_layer(plan.layer)
        rep = plan.report
        params = self.backend.layer_params(layer, rep.quantized.q, rep.quantized.xi, rep.bias)
        plan.consts = [relax.const(a) for a in params] + plan.consts
        if layer is not plan.layer:
            plan.layer = rep.layer = layer
        rep.deployed_bytes = deployed_bytes(params)

    def _layer(self, name, data, w, in_shape, bias, geom, bits, unsigned, activation, fused, residual, dense, pro):
        """Quantize one layer's weight ``w`` (OIHW), report it and plan its call (a PlannedLayer);
        ``pro``: the prologue it absorbs (it reads ``pro.x`` then), or None."""
        cfg = self.config
        co = int(w.shape[0])
        # a block wider than the layer's input is one block of all its channels: the same scales,
        # mantissas and exponents as block = C, without packing and multiplying empty slots
        block = min(cfg.block, int(in_shape[1]))
        try:
            qw = quantize_weight(w, bits, block, cfg.fit, cfg.scale_dtype)
        except DSConvError as exc:                # name the layer
            raise type(exc)(f"layer '{name}': {exc}") from None
        layer = DSConvLayer(tuple(in_shape), co, (int(w.shape[2]), int(w.shape[3])), geom,
                            bits, block, cfg.mantissa, unsigned, cfg.scale_dtype,
                            bias is not None, activation, self.backend.act_dtype, residual is not None,
                            prologue=pro.ops if pro else (), prologue_relu=bool(pro and pro.relu))
        if pro is not None:               # it reads x; the report lists the prologue first
            data, fused = pro.x, (pro.label, *fused)
        report = LayerReport(
            name, True, "", tuple(w.shape), tuple(in_shape), fp32_bytes=int(w.size * 4),
            deployed_bytes=0, sqnr_db=sqnr_db(w, qw.dequantize()), unsigned=unsigned,
            fused=tuple(fused), geom=geom, quantized=qw, bias=bias, activation=activation, layer=layer, bits=bits)
        self.report.layers.append(report)
        # the PrimFunc, the layer's constants (and its deployed bytes) and the call are made once
        # every layer is planned (chain_layers may make it write or read BFP: :meth:`_constants`);
        # a dense layer is emitted as reshape to [N, K, 1, 1], the 1x1 DSConv, reshape back
        return PlannedLayer(name, layer, data, [relax.const(a) for a in pro.consts] if pro else [], residual,
                            dense, report)


def _ident(name: str) -> str:
    out = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
    return out or "layer"


@relax.expr_functor.mutator
class _Replace(relax.PyExprMutator):
    """Emits the planned layers' calls in place of the bindings they replace."""

    def __init__(self, plans, dropped):
        super().__init__()
        self.plans = plans
        self.dropped = dropped
        self.bfp = {}          # producer's output var -> the vars of the BFP input it writes
        self.nhwc = {}         # producer's output var -> its float output, channel-innermost

    def visit_var_binding_(self, binding):
        if binding.var in self.dropped:
            return
        plan = self.plans.get(binding.var)
        if plan is None:
            super().visit_var_binding_(binding)
            return
        emit = self.builder_.emit
        if isinstance(plan, GroupedConv):
            parts = emit(relax.op.split(self.visit_expr(plan.data), len(plan.groups), axis=1))
            outs = [emit(relax.call_tir(g.gv, [emit(relax.TupleGetItem(parts, i)), *g.consts], g.outputs[0]))
                    for i, g in enumerate(plan.groups)]
            value = relax.op.concat(outs, axis=1)
            self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))
            return
        if isinstance(plan, PlannedDepthwise):    # reads and writes channel-innermost
            self.nhwc[binding.var] = emit(relax.call_tir(plan.gv, [self.nhwc[plan.data], *plan.consts],
                                                         plan.outputs[0]))
            return
        layer = plan.layer
        if plan.dense:
            n, k = (int(d) for d in plan.data.ty.shape)
            x4 = emit(relax.op.reshape(self.visit_expr(plan.data), (n, k, 1, 1)))
            y4 = emit(relax.call_tir(plan.gv, [x4, *plan.consts], plan.outputs[0]))
            value = relax.op.reshape(y4, (n, layer.out_channels))
        else:
            head = self.bfp[plan.data] if layer.bfp_input else \
                [self.nhwc[plan.data] if layer.input_nhwc else self.visit_expr(plan.data)]
            res = [] if plan.residual is None else \
                [self.nhwc[plan.residual] if layer.residual_nhwc else self.visit_expr(plan.residual)]
            args = [*head, *plan.consts, *res]
            outs = plan.outputs
            if len(outs) == 1 and layer.fp32_nhwc:    # read only by residual adds of fused layers
                self.nhwc[binding.var] = emit(relax.call_tir(plan.gv, args, outs[0]))
                return
            if len(outs) == 1:
                value = relax.call_tir(plan.gv, args, outs[0])
            else:
                call = emit(relax.call_tir(plan.gv, args, outs))
                items = [emit(relax.TupleGetItem(call, i)) for i in range(len(outs))]
                if not layer.fp32_output:          # every user reads the BFP items: no float tensor
                    self.bfp[binding.var] = items
                    return
                self.bfp[binding.var] = items[1:]
                if layer.fp32_nhwc:                # read only by residual adds of fused layers
                    self.nhwc[binding.var] = items[0]
                    return
                value = items[0]
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))
