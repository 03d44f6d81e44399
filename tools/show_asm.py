#!/usr/bin/env python3
"""Show the vector integer instructions of a DSConv kernel's default schedule for a target.

Compiles one 3x3 DSConv layer (64 -> 64 channels, 14x14, W4 B=32 m=8, unsigned mantissas, bias +
ReLU), and prints a histogram of the SIMD integer instructions in its assembly plus the hottest
loop's body.  Usage: python tools/show_asm.py [x86-avx2|x86|arm|rpi4|rpi5|rpi-armv7 ...]
"""

import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tvm  # noqa: E402

from dsconv_tvm.backends.cpu.intrinsics import activation_dtype, isa_of  # noqa: E402
from dsconv_tvm.scheme.layer import DSConvLayer
from dsconv_tvm.backends.cpu.kernels import dsconv_primfunc  # noqa: E402
from dsconv_tvm.scheme.geometry import ConvGeometry  # noqa: E402
from dsconv_tvm.backends.cpu.schedule import schedule_dsconv_cpu  # noqa: E402
from dsconv_tvm.target import get_target  # noqa: E402

PATTERNS = {
    "x86": r"\b(vpmaddwd|vpmaddubsw|vpdpbusd|vpmulld|vpaddd|vpaddw|vpmovsxbd|vpmovzxbd|vpmovsxbw|vpmovzxbw|"
           r"vpsrad|vpslld|vpsraw|vpsllw|vpsrlw|vpand|vpxor|vpsubb|vcvtdq2ps|vfmadd\w+ps)\b",
    "arm": r"\b(smlal2?|umlal2?|smull2?|umull2?|sadalp|addp|mla|mul|sdot|udot|sshll2?|ushll2?|sshr|shl|and|"
           r"eor|sub|scvtf|fmla)\b",
    "armv7": r"\b(vmla\.i32|vmlal\.s16|vmul\.i32|vmull\.s16|vmovl\.[su]\d+|vshr\.s\d+|vshl\.i\d+|vcvt\.f32\.s32|vmla\.f32)\b",
}


def main(names):
    for name in names:
        spec = get_target(name)
        target = spec.tvm_target()
        layer = DSConvLayer((1, 64, 14, 14), 64, (3, 3), ConvGeometry((1, 1), (1, 1, 1, 1)), 4, 32, 8, True,
                            "float32", True, "relu", activation_dtype(target))
        func = dsconv_primfunc(layer).with_attr("global_symbol", "main")
        asm = tvm.compile(schedule_dsconv_cpu(func, target).mod, target).mod.inspect_source("asm")
        kind = "armv7" if spec.elf_machine == "ARM" else ("arm" if spec.elf_machine == "AArch64" else "x86")
        counts = collections.Counter(m.group(1) for m in re.finditer(PATTERNS[kind], asm))
        print(f"== {name} ({target.attrs.get('mcpu', '')}, dot product: {isa_of(target) or 'none'}): "
              f"SIMD integer/convert instructions in the kernel")
        for op, n in counts.most_common():
            print(f"   {op:<12} {n}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["x86-avx2", "x86-vnni", "rpi4", "rpi5", "rpi-armv7"])
