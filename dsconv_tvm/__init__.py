"""dsconv-tvm: DSConv low-bit block-scaled integer convolutions compiled with Apache TVM.

The Python API (the command line ``dsconv-tvm`` is a thin layer over it).  Importing the package is
cheap: each name below is imported from its module when first used.

=======================  ==========================================================================
name                     what it is
=======================  ==========================================================================
``DSConvConfig``         the quantization scheme: bits, block, mantissa, fit, policies (``config``)
``compile_model``        ONNX file -> DSConv ``.so`` for a target, with a per-layer report
                         (``driver.compile``; ``build_relax`` / ``rewrite_dsconv`` / ``build`` are
                         its steps)
``tune_model``           MetaSchedule + XGBoost tuning of a model's tasks into a database
                         (``driver.tune``)
``DSConvRewrite``        the Relax pass that rewrites conv2d into DSConv (``rewrite.dsconv_rewrite``)
``get_target``           a target (``targets/<name>.json``) and its backend (``target``);
``list_targets``         the names of the known targets
``load_onnx``            load, check and BN-fold an ONNX model (``frontend.onnx``)
``load_library``         a compiled host ``.so`` in a Relax VM and its input shape (``execute.runner``)
``predict``              run a host ``.so`` on an array of samples (``execute.runner``)
``bench_local``,         latency of a ``.so`` here / on a board over the RPC tracker / on every
``bench_remote``,        board of a key at once (``remote.bench``)
``bench_all``
``evaluate``             fp32 vs the compiled DSConv model on data (``accuracy.evaluate``)
``adapt_model``          unlabelled layer-wise adaptation of the KDS scales (``accuracy.adapt``)
``choose_bits``          mixed precision: per-layer bits by sensitivity under a byte budget, for
                         ``DSConvConfig.layer_bits`` (``accuracy.mixed``)
``quantize_weight``      VQK + KDS quantization of one weight tensor (``scheme.weights``)
``dsconv2d``             the numpy DSConv forward, the reference of the kernels (``scheme.reference``)
``DSConvError``          the base of every one-line user error (``errors``)
=======================  ==========================================================================
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "DSConvConfig": "config",
    "compile_model": "driver.compile",
    "build_relax": "driver.compile",
    "rewrite_dsconv": "driver.compile",
    "build": "driver.compile",
    "tune_model": "driver.tune",
    "DSConvRewrite": "rewrite.dsconv_rewrite",
    "get_target": "target",
    "list_targets": "target",
    "load_onnx": "frontend.onnx",
    "load_library": "execute.runner",
    "predict": "execute.runner",
    "bench_local": "remote.bench",
    "bench_remote": "remote.bench",
    "bench_all": "remote.bench",
    "evaluate": "accuracy.evaluate",
    "adapt_model": "accuracy.adapt",
    "choose_bits": "accuracy.mixed",
    "quantize_weight": "scheme.weights",
    "dsconv2d": "scheme.reference",
    "DSConvError": "errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """The public names, imported lazily (``import dsconv_tvm`` does not import TVM)."""
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'dsconv_tvm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
