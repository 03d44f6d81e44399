"""The CPU backend (x86 and ARM, TVM target kind ``llvm``): layout, TE kernel, tensor intrinsics,
the DSConv schedule and MetaSchedule space, and the default rules for what stays fp32."""
