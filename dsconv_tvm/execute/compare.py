"""Comparing a model's outputs with a reference's: the compile-time agreement, the board-vs-host
check, top-k hits.  (SQNR: :func:`dsconv_tvm.scheme.metrics.sqnr_db`.)"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: relative tolerance of the board-vs-host check, as a fraction of max |reference output|
CHECK_RTOL = 1e-4


@dataclass
class Agreement:
    max_abs_diff: float
    rel_l2: float
    top1_agree: float          # fraction of samples whose argmax agrees (classification outputs)
    where: str = ""            # e.g. "the compiled .so" or "a host build of the same DSConv model"

    def to_dict(self) -> dict:
        return {"argmax_agree": self.top1_agree, "rel_l2": self.rel_l2, "max_abs_diff": self.max_abs_diff}


def compare_outputs(ref: np.ndarray, out: np.ndarray, where: str = "") -> Agreement:
    """Max |diff|, relative L2 error and the fraction of samples (leading axis) with the same argmax."""
    ref64, out64 = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    diff = float(np.max(np.abs(ref64 - out64))) if ref64.size else 0.0
    rel = float(np.linalg.norm(ref64 - out64) / max(np.linalg.norm(ref64), 1e-30))
    r2, o2 = ref64.reshape(ref64.shape[0], -1), out64.reshape(out64.shape[0], -1)
    top1 = float(np.mean(np.argmax(r2, axis=1) == np.argmax(o2, axis=1)))
    return Agreement(diff, rel, top1, where)


def check_close(got: np.ndarray, ref: np.ndarray) -> dict:
    """The board-vs-host agreement: max |diff| <= CHECK_RTOL * max |ref|, and the same argmax of
    every sample (integer arithmetic is identical; float sums may be ordered differently)."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return {"ok": False, "max_abs_diff": float("inf"), "tolerance": 0.0, "argmax_equal": False,
                "shape": list(got.shape), "reference_shape": list(ref.shape)}
    tol = CHECK_RTOL * float(np.max(np.abs(ref))) if ref.size else 0.0
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    n = got.shape[0] if got.ndim > 1 else 1
    am_got = np.argmax(got.reshape(n, -1), axis=1)
    am_ref = np.argmax(ref.reshape(n, -1), axis=1)
    same = bool(np.array_equal(am_got, am_ref))
    finite = bool(np.all(np.isfinite(got)))
    return {"ok": bool(finite and diff <= tol and same), "max_abs_diff": diff, "tolerance": tol,
            "argmax_equal": same, "argmax": [int(a) for a in am_got]}


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per sample: is ``labels`` among the ``k`` largest logits (ties broken by class order)."""
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return (top == labels[:, None]).any(axis=1)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits`` against integer ``labels``."""
    return float(np.mean(topk_hits(logits, labels, 1)))
