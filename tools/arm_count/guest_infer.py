"""Runs inside the emulated aarch64 board (tools/arm_count.py starts it under qemu-aarch64 with the
insn_count plugin): one model, one warm-up inference, then K counted inferences between two marker
system calls, so that loading, compiling and the first run's one-time work are not counted.

    guest_infer.py tvm|ort MODEL INPUT.npy K MAPS_OUT OUTPUT.npy

Only the aarch64 board's packages are available here (numpy, the TVM runtime, onnxruntime); this
file does not import dsconv_tvm.
"""

import os
import sys

import numpy as np

MARKER_MAGIC = 0x445343560000      # must match tools/arm_count/insn_count.c


def marker(k: int) -> None:
    """lseek(-1, MAGIC | k, SEEK_SET): fails with EBADF, seen by the plugin as a phase marker."""
    try:
        os.lseek(-1, MARKER_MAGIC | k, 0)
    except OSError:
        pass


def tvm_runner(path: str):
    import tvm

    lib = tvm.runtime.load_module(path)
    vm = lib["vm_load_executable"]()
    vm["vm_initialization"](1, 0, 2)          # kDLCPU, device 0, pooled allocator
    main = vm["main"]

    def run(x):
        return main(tvm.runtime.tensor(x)).numpy()
    return run


def ort_runner(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x):
        return sess.run(None, {name: x})[0]
    return run


def main(argv) -> int:
    kind, model, inp, k, maps_out, out = argv
    k = int(k)
    x = np.ascontiguousarray(np.load(inp).astype(np.float32))
    run = (tvm_runner if kind == "tvm" else ort_runner)(model)
    y = run(x)                                # warm-up (first-run allocations, ORT's prepacking)
    with open("/proc/self/maps") as f, open(maps_out, "w") as g:
        g.write(f.read())
    marker(1)
    for _ in range(k):
        y = run(x)
    marker(2)
    np.save(out, np.asarray(y, np.float32))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
