"""Session fixtures shared by the test modules.

``rpc_tracker``: a ``dsconv-tvm tracker`` on a free port of 127.0.0.1 for the whole session.
``emulated_board_booting`` / ``emulated_board``: the emulated Raspberry Pi (aarch64 Python + TVM
runtime under qemu-user, built once into the cache by tools/emulated_board.py) running
``dsconv-tvm board-server`` registered at that tracker.  ``emulated_board_booting`` only starts it
(registration takes ~10-30 s, so a test can compile its models meanwhile); ``emulated_board`` waits
until it is registered.  Every process tree is killed at the end of the session.
"""

from __future__ import annotations

import gc
import importlib.util
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dsconv_tvm.remote.processes import popen_child

REPO = Path(__file__).resolve().parent.parent
EMULATED_KEY = "rpi-emu"


def load_tool(name: str):
    """The module ``tools/<name>.py`` (the tools are scripts, not a package), loaded once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_emulated_board_tool():
    return load_tool("emulated_board")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli() -> list[str]:
    return [sys.executable, "-m", "dsconv_tvm.cli"]


@dataclass
class _Service:
    proc: subprocess.Popen
    host: str
    port: int
    log: Path
    key: str | None = None
    tracker: str | None = None
    started: float = field(default_factory=time.time)
    registered_after: float | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        from dsconv_tvm.remote.processes import kill_process_tree

        kill_process_tree(self.proc.pid)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _start(argv, log: Path, env=None) -> subprocess.Popen:
    fh = open(log, "w")
    try:
        return popen_child(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           env=env, cwd=str(REPO))
    finally:
        fh.close()


def start_tracker(log: Path) -> _Service:
    """``dsconv-tvm tracker`` on 127.0.0.1:<free port>, up and answering; ``.address`` is
    "127.0.0.1:PORT".  Stop it with ``.stop()``."""
    from dsconv_tvm.remote.tracker import RemoteError, tracker_summary

    for _attempt in range(3):                       # a free port may be taken meanwhile
        port = free_port()
        svc = _Service(_start([*_cli(), "tracker", "--port", str(port)], log), "127.0.0.1", port, log)
        t0 = time.time()
        while time.time() - t0 < 60:
            try:
                tracker_summary("127.0.0.1", port, timeout=2)
                break
            except RemoteError:
                if svc.proc.poll() is not None:
                    break
                time.sleep(0.3)
        else:
            svc.stop()
            pytest.fail(f"the tracker did not start within 60 s:\n{svc.output()}")
        if svc.proc.poll() is None:
            break
    else:
        pytest.fail(f"the tracker could not start:\n{svc.output()}")
    return svc


def emulated_board_tool():
    """tools/emulated_board.py, or skip the test when qemu-user-static is missing."""
    tool = load_emulated_board_tool()
    try:
        tool.check_qemu()
    except tool.BoardSetupError as exc:
        pytest.skip(str(exc))
    return tool


@pytest.fixture(scope="session")
def rpc_tracker(tmp_path_factory):
    """The session's tracker (see :func:`start_tracker`)."""
    svc = start_tracker(tmp_path_factory.mktemp("tracker") / "tracker.log")
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def emulated_board_booting(rpc_tracker, tmp_path_factory):
    """The emulated board, built if needed and started (not yet waited for)."""
    tool = emulated_board_tool()
    t0 = time.time()
    logs = []
    board = tool.ensure_board(log=logs.append)
    setup_s = time.time() - t0
    log = tmp_path_factory.mktemp("emulated-board") / "board.log"
    port = free_port()
    fh = open(log, "w")
    try:
        proc = tool.start_board_server(board, rpc_tracker.address, EMULATED_KEY, port=port,
                                       stdout=fh, stderr=subprocess.STDOUT)
    finally:
        fh.close()
    svc = _Service(proc, "127.0.0.1", port, log, key=EMULATED_KEY, tracker=rpc_tracker.address)
    svc.setup_seconds = setup_s                      # type: ignore[attr-defined]
    svc.board = board                                # type: ignore[attr-defined]
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def emulated_board(emulated_board_booting):
    """The emulated board, registered at ``rpc_tracker`` under ``.key``."""
    svc = emulated_board_booting
    if svc.registered_after is None:
        tool = load_emulated_board_tool()
        try:
            tool.wait_registered(svc.tracker, svc.key, timeout=240, proc=svc.proc)
        except tool.BoardSetupError as exc:
            pytest.fail(f"{exc}\n{svc.output()[-3000:]}")
        svc.registered_after = time.time() - svc.started
        print(f"\nemulated board: setup {svc.setup_seconds:.1f} s, registered "
              f"{svc.registered_after:.1f} s after start", file=sys.stderr)
    return svc


@pytest.fixture(autouse=True)
def board_free_after_test(request):
    """After each test that used the session's emulated board: the board is free again (its RPC
    sessions were closed), so that the next test's request does not wait for a leaked one."""
    yield
    if not {"emulated_board", "emulated_board_booting"} & set(request.fixturenames):
        return
    svc = request.getfixturevalue("emulated_board_booting")
    if svc.registered_after is None:                 # not waited for: not used
        return
    if svc.proc.poll() is not None:
        pytest.fail(f"the emulated board server exited (code {svc.proc.returncode}):\n{svc.output()[-2000:]}")
    from dsconv_tvm.remote.tracker import RemoteError, wait_board_free

    gc.collect()
    try:
        wait_board_free(svc.tracker, svc.key, timeout=60)
    except RemoteError as exc:
        pytest.fail(f"after {request.node.nodeid}: {exc}")


# ------------------------------------------------------------------------------------------------
# shared helpers of the model tests
# ------------------------------------------------------------------------------------------------
def onnx_initializers(seed: int):
    """Seeded makers of a test model's ONNX initializers, drawing from one generator in call order:
    ``(rng, t, bn)`` with ``t(name, *shape, s=0.3)`` a normal tensor times ``s`` and
    ``bn(prefix, c, s_beta=0.1, s_mean=0.1)`` a BatchNormalization's scale, bias, mean, variance
    (scale and variance in [0.5, 1.5))."""
    import numpy as np
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)

    def t(name, *shape, s=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)

    def bn(prefix, c, s_beta=0.1, s_mean=0.1):
        return [numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), prefix + "_g"),
                t(prefix + "_b", c, s=s_beta), t(prefix + "_m", c, s=s_mean),
                numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), prefix + "_v")]

    return rng, t, bn


def residual_model(path):
    """conv-bn-relu, maxpool, a residual block (conv-bn-relu-conv-bn + identity, relu), 1x1 conv
    with stride 2, dilated conv, avgpool, gemm: the ops the example models use."""
    import onnx
    from onnx import TensorProto, helper

    _, t, bn = onnx_initializers(1)

    inits = [t("w0", 16, 3, 3, 3), *bn("bn0", 16), t("w1", 16, 16, 3, 3, s=0.1), *bn("bn1", 16),
             t("w2", 16, 16, 3, 3, s=0.1), *bn("bn2", 16), t("w3", 40, 16, 1, 1), t("b3", 40, s=0.1),
             t("w4", 24, 40, 3, 3, s=0.05), t("wf", 10, 24), t("bf", 10)]
    n = helper.make_node
    nodes = [
        n("Conv", ["input", "w0"], ["c0"], pads=[1, 1, 1, 1], name="stem"),
        n("BatchNormalization", ["c0", "bn0_g", "bn0_b", "bn0_m", "bn0_v"], ["n0"]),
        n("Relu", ["n0"], ["r0"]),
        n("MaxPool", ["r0"], ["p0"], kernel_shape=[2, 2], strides=[2, 2]),
        n("Conv", ["p0", "w1"], ["c1"], pads=[1, 1, 1, 1], name="block_conv1"),
        n("BatchNormalization", ["c1", "bn1_g", "bn1_b", "bn1_m", "bn1_v"], ["n1"]),
        n("Relu", ["n1"], ["r1"]),
        n("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="block_conv2"),
        n("BatchNormalization", ["c2", "bn2_g", "bn2_b", "bn2_m", "bn2_v"], ["n2"]),
        n("Add", ["n2", "p0"], ["s2"]),
        n("Relu", ["s2"], ["r2"]),
        n("Conv", ["r2", "w3", "b3"], ["c3"], strides=[2, 2], name="down"),
        n("Relu", ["c3"], ["r3"]),
        n("Conv", ["r3", "w4"], ["c4"], pads=[2, 2, 2, 2], dilations=[2, 2], name="dilated"),
        n("GlobalAveragePool", ["c4"], ["g"]),
        n("Flatten", ["g"], ["f"]),
        n("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(nodes, "resblock", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 20, 20])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def compiled_vs_reference(path, out, cfg, shapes=None, n_inputs=2, target="x86"):
    """Compile ``path`` for ``target`` (one this host runs) and compare the .so with the numpy DSConv reference model on
    ``n_inputs`` sample inputs; (compile result, worst error relative to the output scale)."""
    import numpy as np
    import tvm

    from dsconv_tvm.driver.compile import compile_model
    from dsconv_tvm.execute.runner import run_executable, sample_inputs
    from dsconv_tvm.frontend.onnx import load_onnx
    from dsconv_tvm.scheme.reference import reference_model

    result = compile_model(path, target, out, cfg, shapes, check=False)
    loaded = load_onnx(path, shapes)
    ref = reference_model(loaded, result.report, cfg.mantissa, cfg.block)
    lib = tvm.runtime.load_module(out)
    worst = 0.0
    for seed in range(n_inputs):
        x = sample_inputs(loaded, seed)
        a, b = run_executable(lib, x), ref(*x)
        # Tolerance (see README "Correctness"): each layer's integers are exact, but the float sums run
        # in another order, so the next layer's input can differ by float32 rounding; where that moves
        # a value across a mantissa rounding boundary the mantissa differs by one step (2^-7 of the
        # block maximum at m=8).  Such flips are rare and stay local, so we bound the error relative
        # to the output scale by 1e-3 and require most outputs to agree to 1e-5.
        scale = np.abs(b).max()
        err = np.abs(a - b)
        assert err.max() <= 1e-3 * scale, (err.max(), scale)
        assert np.mean(err <= 1e-5 * scale + 1e-6) >= 0.9
        worst = max(worst, err.max() / scale)
    return result, worst
