"""Kernel backends: one sub-package per target family (``cpu/`` for x86 and ARM, ``cuda/`` for NVIDIA
GPUs), siblings behind the :class:`~dsconv_tvm.backends.base.Backend` interface.  The registry in
:mod:`.base` is the one place that maps a target to its backend; what every backend shares (the
BFP stages, the float sum across blocks, the epilogue, the DSConv attribute) is :mod:`.common`."""
