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

#: the exponents rewritten: (x's power, sqrt(x)'s, sqrt(sqrt(x))'s), each 0 or 1, and 1/... or not
_FORMS = {0.5: (0, 1, 0, False), 0.25: (0, 0, 1, False), 0.75: (0, 1, 1, False), 1.5: (1, 1, 0, False),
          -0.5: (0, 1, 0, True), -0.25: (0, 0, 1, True), -0.75: (0, 1, 1, True)}


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
        form = _FORMS.get(_exponent(e))
        if form is None or str(getattr(x.ty, "dtype", "")) != "float32":
            return call
        self.count += 1
        emit = self.builder_.emit
        v = emit(relax.op.sqrt(x))
        factors = [f for f, use in ((x, form[0]), (v, form[1]), (emit(relax.op.sqrt(v)) if form[2] else None,
                                                                  form[2])) if use]
        out = factors[0]
        for f in factors[1:]:
            out = emit(relax.op.multiply(out, f))
        return relax.op.divide(relax.const(1.0, "float32"), out) if form[3] else out


def power_to_sqrt(mod):
    """``mod`` with every float32 ``power(x, c)``, ``c`` a key of :data:`_FORMS`, written with
    square roots; returns (the module, how many were rewritten)."""
    count = 0
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            m = _PowerToSqrt(mod)
            new = m.visit_expr(func)
            if m.count:
                mod[gv] = new
                count += m.count
    return mod, count
