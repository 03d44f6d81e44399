"""The pre-activation a DSConv layer absorbs before its input quantization: per-channel ops on its
input, then a ReLU (DenseNet's BatchNormalization + ReLU before each conv, as Relax subtract,
divide, multiply, add by constant per-channel tensors, possibly through the ``Tuple`` /
``TupleGetItem`` the BN import leaves, then relu), or some of them (the ReLU alone, the ops
alone).  The layer then reads ``x`` and applies them in its quantization stage
(:func:`dsconv_tvm.backends.common.prologue_reader`), in the same float32 order, instead of
separate elementwise passes.

Only bindings whose value is used once (by the next op, the last by the conv) are absorbed: ``x``
itself may have other users (a DenseNet concat is read by every later layer of its block)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ..scheme.layer import PROLOGUE_OPS

_MAX_OPS = 8                      # a BN is four ops; DenseNet's pre-activation, six


@dataclass
class Prologue:
    """A matched prologue: the tensor the layer reads and what it applies to it."""

    x: object                     # the Relax var the layer reads instead of its data input
    ops: tuple[str, ...]          # per-channel ops (PROLOGUE_OPS), in the order they apply
    consts: list                  # their (C,) float32 constants
    relu: bool
    absorbed: list                # the vars it replaces

    @property
    def label(self) -> str:
        """How the report names it (``bn+relu<``: applied before the conv)."""
        return "+".join(["bn"] * bool(self.ops) + ["relu"] * self.relu) + "<"


def single_user(var, uses, users):
    """The var bound to the only expression that uses ``var`` (None if several users or an output)."""
    if uses.get(var, 0) != 1 or len(users.get(var, ())) != 1:
        return None
    return users[var][0]


def static_shape(expr) -> tuple[int, ...] | None:
    """The static shape of a tensor-typed Relax expression, else None."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape)
    except (TypeError, ValueError):
        return None


def const_value(expr, bindings) -> np.ndarray | None:
    """The value of a constant, through up to 8 var-to-var bindings, else None."""
    seen = 0
    while isinstance(expr, relax.Var) and expr in bindings and seen < 8:
        expr, seen = bindings[expr], seen + 1
    if isinstance(expr, tvm.ir.GenericConst):
        return expr.value.numpy()
    return None


def _channel_const(expr, bindings, shape) -> np.ndarray | None:
    """The (C,) float32 values of a constant that broadcasts along the channels of an NCHW tensor
    of ``shape`` ([C, 1, 1] or [1, C, 1, 1]), else None."""
    v = const_value(expr, bindings)
    c = shape[1]
    if v is None or v.dtype != np.float32 or v.shape not in ((c, 1, 1), (1, c, 1, 1)):
        return None
    return np.ascontiguousarray(v.reshape(c))


def _step(var, bindings, shape):
    """(input, op, constant) when ``var = op(input, constant)`` is a per-channel prologue op
    (multiply and add in either order), (input, None, None) when ``var`` is item 0 of a tuple
    (its other items unused), else None."""
    value = bindings[var]
    if isinstance(value, relax.TupleGetItem) and value.index == 0:
        return value.tuple_value, None, None
    if isinstance(value, relax.Tuple) and value.fields:
        return value.fields[0], None, None
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
        return None
    op = value.op.name[len("relax."):]
    if op not in PROLOGUE_OPS or len(value.args) != 2:
        return None
    a, b = value.args
    for x, c in ((a, b), (b, a)) if op in ("multiply", "add") else ((a, b),):
        const = _channel_const(c, bindings, shape)
        if const is not None and isinstance(x, relax.Var) and _channel_const(x, bindings, shape) is None:
            return x, op, const
    return None


def match_prologue(data, shape, bindings, uses, users, clamps, taken) -> Prologue | None:
    """The prologue ending at the conv's input ``data`` (NCHW ``shape``), or None.  ``clamps``:
    the function's clamps (a ReLU is one to [0, inf)); ``taken``: vars another layer absorbed."""
    def own(var):            # a binding the layer may absorb: bound here, used once, not taken
        return isinstance(var, relax.Var) and var in bindings and var not in taken and \
            single_user(var, uses, users) is not None

    v, absorbed, relu, ops, consts = data, [], False, [], []
    if own(v) and static_shape(v) == shape and v in clamps and clamps[v][1:] == (0.0, math.inf):
        relu, absorbed, v = True, [v], clamps[v][0]
    candidate = (v, len(absorbed), len(ops))        # the last point where the layer could read
    while own(v) and len(ops) < _MAX_OPS:
        step = _step(v, bindings, shape)
        if step is None:
            break
        absorbed.append(v)
        v, op, const = step
        if op is not None:
            ops.append(op)
            consts.append(const)
        if isinstance(v, relax.Var) and static_shape(v) == shape and str(v.ty.dtype) == "float32":
            candidate = (v, len(absorbed), len(ops))
    v, n_abs, n_ops = candidate
    if not n_abs or not (relu or n_ops):        # nothing to apply: the conv reads its input as it is
        return None
    return Prologue(v, tuple(reversed(ops[:n_ops])), list(reversed(consts[:n_ops])), relu, absorbed[:n_abs])
