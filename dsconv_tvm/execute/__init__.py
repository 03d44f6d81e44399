"""Running compiled models here: :mod:`.runner` (load a library, run it on data, time it; the one
Relax VM runner of the package) and :mod:`.compare` (agreement, top-k; SQNR is
:func:`dsconv_tvm.scheme.metrics.sqnr_db`)."""
