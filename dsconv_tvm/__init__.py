"""dsconv-tvm: DSConv low-bit block-scaled integer convolutions compiled with Apache TVM."""

__version__ = "0.1.0"
