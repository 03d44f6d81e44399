"""ONNX in: loading and checking a model, folding BatchNorm, fixing input shapes, importing to Relax."""
