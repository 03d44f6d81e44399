"""Accuracy: :mod:`.evaluate` (fp32 vs the compiled DSConv model on data), :mod:`.adapt` (unlabelled
layer-wise adaptation), :mod:`.probes` (the fp32 teacher in ONNX Runtime), :mod:`.datasets` and
:mod:`.images` (inputs)."""
