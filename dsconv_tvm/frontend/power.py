"""``power(x, c)`` with a constant exponent that is a multiple of 1/4 written with square roots.

LLVM compiles ``power`` to a scalar ``powf`` call per element (~20 cycles) and a loop containing
it does not vectorize: AlexNet's two LRN layers (``x / (k + a * sum)^0.75``) spent 1.5 ms of a
7.7 ms one-thread inference there.  ``sqrt`` compiles to the vector square root, so
``x^0.75 = sqrt(x) * sqrt(sqrt(x))`` and the like (each within a few ulps of ``powf``; x < 0 gives
NaN in both forms).  Other exponents are left alone.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

#: |exponent| -> its factors with v = sqrt(x), w = sqrt(v); a negative exponent (-0.25, -0.5,
#: -0.75: the reciprocal of a root) is 1 / the product
_FACTORS = {0.25: ("w",), 0.5: ("v",), 0.75: ("v", "w"), 1.5: ("x", "v")}


def _exponent(expr) -> float | None:
    if isinstance(expr, tvm.ir.GenericConst):
        value = np.asarray(expr.value.numpy())
        return float(value.reshape(())) if value.size == 1 else None
    return None


@relax.expr_functor.mutator
class _PowerToSqrt(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if getattr(call.op, "name", None) != "relax.power":
            return call
        x, e = call.args
        c = _exponent(e)
        factors = _FACTORS.get(abs(c)) if c is not None and c >= -1 else None
        if factors is None or str(getattr(x.ty, "dtype", "")) != "float32":
            return call
        self.count += 1
        emit = self.builder_.emit
        v = emit(relax.op.sqrt(x))
        named = {"x": x, "v": v, "w": emit(relax.op.sqrt(v)) if "w" in factors else None}
        out = named[factors[0]]
        for f in factors[1:]:
            out = emit(relax.op.multiply(out, named[f]))
        return relax.op.divide(relax.const(1.0, "float32"), out) if c < 0 else out


def power_to_sqrt(mod):
    """``mod`` with every float32 ``power(x, c)``, ``|c|`` a key of :data:`_FACTORS` (c >= -1),
    written with square roots; returns (the module, how many were rewritten)."""
    count = 0
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            m = _PowerToSqrt(mod)
            new = m.visit_expr(func)
            if m.count:
                mod[gv] = new
                count += m.count
    return mod, count
