"""Facts about the bindings of a Relax function that the rewrite reads: which calls clamp a tensor
to constant bounds (the activations a layer may absorb) and which values are provably >= 0 (the
layers whose input mantissas may be unsigned)."""

from __future__ import annotations

import math

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx

from .prologue import const_value, static_shape

NONNEG_PASSTHROUGH = {
    "relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d", "relax.mean",
    "relax.reshape", "relax.flatten", "relax.permute_dims", "relax.squeeze", "relax.expand_dims",
    "relax.nn.pad", "relax.strided_slice",
}


def is_call(expr, op_name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == op_name


def scalar(expr, bindings) -> float | None:
    """The value of a constant scalar (a one-element constant tensor or an immediate), else None."""
    if isinstance(expr, (tirx.IntImm, tirx.FloatImm)):
        return float(expr.value)
    value = const_value(expr, bindings)
    return float(value.reshape(())) if value is not None and value.size == 1 else None


def is_topi_scalar_op(func, op: str, args: list) -> bool:
    """Whether the PrimFunc ``func`` called with ``args`` (a float tensor and a constant scalar, in
    either order) is TOPI's elementwise ``op`` (maximum / minimum) of them, as the ONNX frontend
    emits Clip: compared with the PrimFunc TE makes of it."""
    from tvm import te, topi

    if not isinstance(func, tirx.PrimFunc):
        return False
    ins = []
    for arg in args:
        shape = static_shape(arg)
        if shape is None:
            return False
        ins.append(te.placeholder([tirx.IntImm("int64", d) for d in shape], str(arg.ty.dtype)))
    ref = te.create_prim_func([*ins, getattr(topi, op)(*ins)]).without_attr("global_symbol")
    return tvm_ffi.structural_equal(func, ref)


def clamps_of(bindings: dict, mod) -> dict:
    """var -> (x, lower, upper) for the bindings that clamp a float32 tensor x to constant bounds:
    relu, clip, maximum / minimum with a constant scalar in either order (a Relax op, or the ONNX
    frontend's call_tir of TOPI's PrimFunc in ``mod``); the activations a layer may absorb."""
    clamps = {}
    for var, value in bindings.items():
        if not isinstance(value, relax.Call) or static_shape(var) is None or str(var.ty.dtype) != "float32":
            continue
        if is_call(value, "relax.nn.relu"):
            clamps[var] = (value.args[0], 0.0, math.inf)
            continue
        if is_call(value, "relax.clip"):
            lo, hi = (scalar(a, bindings) for a in value.args[1:3])
            if lo is not None and hi is not None:
                clamps[var] = (value.args[0], lo, hi)
            continue
        if is_call(value, "relax.maximum") or is_call(value, "relax.minimum"):
            op, args = value.op.name[len("relax."):], list(value.args)
        elif is_call(value, "relax.call_tir") and len(value.args) == 2 and isinstance(value.args[1], relax.Tuple) \
                and len(value.args[1].fields) == 2:
            args = list(value.args[1].fields)
            op = next((o for o in ("maximum", "minimum") if value.args[0].name_hint.startswith(o)), None)
        else:
            continue
        for x, c in (args, args[::-1]):
            bound = scalar(c, bindings)
            if op is None or bound is None or static_shape(x) != static_shape(var):
                continue
            if is_call(value, "relax.call_tir") and not is_topi_scalar_op(mod[value.args[0]], op, args):
                break
            clamps[var] = (x, bound, math.inf) if op == "maximum" else (x, -math.inf, bound)
            break
    return clamps


def nonneg_vars(bindings: dict, clamps: dict) -> set:
    """Vars whose values are provably >= 0 (ReLU / Clip(lower >= 0) outputs and what only moves/pools
    them); ``clamps`` from :func:`clamps_of`."""
    nonneg = set()

    def nonneg_arg(a):
        return a in nonneg or (const_value(a, bindings) is not None and float(np.min(const_value(a, bindings))) >= 0)

    for var, value in bindings.items():
        if var in clamps:
            x, lower, upper = clamps[var]
            if lower >= 0 or (x in nonneg and upper >= 0):
                nonneg.add(var)
            continue
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            continue
        name = value.op.name
        args = list(value.args)
        if name in NONNEG_PASSTHROUGH and args and args[0] in nonneg:
            nonneg.add(var)
        elif name in ("relax.add", "relax.minimum", "relax.multiply") and all(nonneg_arg(a) for a in args):
            nonneg.add(var)
        elif name == "relax.maximum" and any(nonneg_arg(a) for a in args):
            nonneg.add(var)
        elif name == "relax.concat" and isinstance(args[0], relax.Tuple) and all(
                f in nonneg for f in args[0].fields):
            nonneg.add(var)
    return nonneg
