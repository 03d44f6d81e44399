#!/usr/bin/env python3
"""GPU benchmark: DSConv (W4 by default) vs TVM fp32 and TVM fp16 of the same ONNX model, on this
machine's NVIDIA GPU (target ``cuda``).  All three are built with the same GPU pipeline (dlight GPU
rules; DSConv layers with the CUDA DSConv schedule), exported with PTX and loaded back, then timed
with the VM's time_evaluator.  Without a GPU it stops with one line saying so.

    python tools/bench_cuda.py models/resnet20.onnx [--batch 1] [--repeat 20] [--tuning-db DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--tuning-db", default=None, help="MetaSchedule database from `dsconv-tvm tune --target cuda`")
    args = ap.parse_args(argv)

    import numpy as np
    import tvm
    from tvm import relax

    from dsconv_tvm.backends.cuda.arch import gpu_present
    from dsconv_tvm.backends.cuda.backend import spec_arch
    from dsconv_tvm.driver.compile import build, build_relax, rewrite_dsconv
    from dsconv_tvm.execute.compare import compare_outputs
    from dsconv_tvm.execute.runner import run_executable, sample_inputs
    from dsconv_tvm.config import DSConvConfig
    from dsconv_tvm.errors import DSConvError
    from dsconv_tvm.frontend.onnx import load_onnx
    from dsconv_tvm.target import get_target

    if not gpu_present():
        print("bench_cuda: no CUDA GPU usable here (no driver/GPU, or TVM's CUDA runtime cannot load); "
              "nothing was measured", file=sys.stderr)
        return 2
    try:
        spec = get_target("cuda")
        loaded = load_onnx(args.model, None)
        fp32_mod, _ = build_relax(loaded, None)
        ds_mod, report = rewrite_dsconv(fp32_mod, loaded, DSConvConfig(bits=args.bits), spec)
        fp16_mod = relax.transform.ToMixedPrecision(out_dtype="float16")(fp32_mod)
    except DSConvError as exc:
        print(f"bench_cuda: error: {exc}", file=sys.stderr)
        return 2
    database = None
    if args.tuning_db:
        from tvm.s_tir import meta_schedule as ms
        database = ms.database.JSONDatabase(work_dir=args.tuning_db)
    dev = tvm.cuda(0)
    inputs = sample_inputs(loaded)
    arch = spec_arch(spec)
    print(f"GPU {arch}; model {args.model}; {len(report.converted)} of {len(report.layers)} convs -> DSConv W{args.bits}")
    outs, tmp = {}, tempfile.mkdtemp()
    for name, mod in (("tvm-fp32", fp32_mod), ("tvm-fp16", fp16_mod), (f"dsconv-w{args.bits}", ds_mod)):
        ex = build(mod, spec, database if name.startswith("dsconv") else None)
        path = os.path.join(tmp, f"{name}.so")
        spec.export_library(ex, path)                 # PTX inside: the same file a deployment loads
        lib = tvm.runtime.load_module(path)
        outs[name] = run_executable(lib, inputs, dev)
        vm = relax.VirtualMachine(lib, dev)
        vm.set_input("main", *[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs])
        res = vm.time_evaluator("invoke_stateful", dev, number=10, repeat=args.repeat)("main")
        print(f"  {name:12s} median {res.median * 1e3:8.3f} ms   mean {res.mean * 1e3:8.3f} ms   "
              f"(std {res.std * 1e3:.3f})")
    for name in outs:
        if name != "tvm-fp32":
            a = compare_outputs(outs["tvm-fp32"], outs[name], name)
            print(f"  {name} vs fp32: rel. L2 {a.rel_l2:.4f}, top-1 agree {a.top1_agree:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
