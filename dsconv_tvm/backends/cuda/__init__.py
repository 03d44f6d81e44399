"""The CUDA backend (desktop NVIDIA GPUs and Jetson, TVM target kind ``cuda``): arch detection,
layout and TE kernel, schedule, code generation hooks (dp4a), NVRTC, and the PTX in the ``.so``."""
