"""The DSConv scheme in numpy only (no TVM): block floating point, weight quantization (VQK + KDS),
conv geometry, the numpy reference forward and the error metrics.  Everything else is tested
against these modules."""
