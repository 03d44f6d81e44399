"""tools/arm_count.py: the insn_count QEMU plugin counts exactly, and the instruction count of
ResNet-20 (DSConv, W4 B=64, rpi5) on the emulated Cortex-A76 stays at its committed value
(results/arm_count_ci.json), so ARM code generation cannot silently get slower.

Skipped only when the plugin-capable qemu-aarch64 (Debian qemu-user) is missing or the plugin
cannot be built with the host C compiler.  Each subprocess has its own timeout (pytest-timeout is
not a dependency)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_tool

REPO = Path(__file__).resolve().parents[2]
CI_JSON = REPO / "results" / "arm_count_ci.json"
TOLERANCE = 0.03          # relative change of the count that fails the regression test


def _tool():
    return load_tool("arm_count")


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    tool = _tool()
    try:
        tool.find_qemu()
        return tool.build_plugin(tmp_path_factory.mktemp("cache"))
    except tool.ArmCountError as exc:
        pytest.skip(str(exc))


N = 60_000                # fits one movz
# markers as raw system calls (lseek(-1, MAGIC|k, 0)), so that nothing but this code runs
# between them: block 1 = mov, subs, b.ne; block 2 = subs, b.ne (N-1 times); block 3 = the six
# instructions up to the second svc (counted when block 3 starts, before its marker fires)
PROGRAM = r"""
void _start(void) {
    __asm__ volatile(
        "mov x8, #62\n mov x0, #-1\n movz x1, #0x0001\n movk x1, #0x4356, lsl #16\n"
        "movk x1, #0x4453, lsl #32\n mov x2, #0\n svc #0\n"
        "mov x9, #N\n"
        "1: subs x9, x9, #1\n b.ne 1b\n"
        "mov x8, #62\n mov x0, #-1\n movz x1, #0x0002\n movk x1, #0x4356, lsl #16\n"
        "movk x1, #0x4453, lsl #32\n svc #0\n"
        "mov x8, #93\n mov x0, #0\n svc #0\n" ::: "x0", "x1", "x2", "x8", "x9", "memory");
}
"""


def test_plugin_counts_a_loop_exactly(plugin, tmp_path):
    """2 instructions per iteration + 1 + 6 between the markers; nothing else."""
    gcc = shutil.which("aarch64-linux-gnu-gcc")
    if gcc is None:
        pytest.skip("aarch64-linux-gnu-gcc not installed (tools/install_system_deps.sh)")
    src = tmp_path / "loop.c"
    src.write_text(PROGRAM.replace("#N", f"#{N}"))
    exe = tmp_path / "loop"
    subprocess.run([gcc, "-O1", "-nostdlib", "-static", "-o", str(exe), str(src)], check=True,
                   timeout=60)
    out = tmp_path / "counts.txt"
    subprocess.run([_tool().find_qemu(), "-cpu", "cortex-a76", "-plugin", f"{plugin},out={out}",
                    str(exe)], check=True, timeout=60)
    phases = _tool().parse_counts(out)
    assert list(phases) == ["1", "2", "exit"]
    blocks, total = phases["2"]
    assert total == 2 * N + 1 + 6
    assert sum(n * c for _, n, c in blocks) == total
    assert sorted(c for _, _, c in blocks) == [1, 1, N - 1]     # the loop's block N-1 times
    assert phases["exit"][1] == 3                                # mov, mov, svc(exit)


def test_attribution_splits_by_object_and_function():
    tool = _tool()
    maps = [(0x1000, 0x3000, 0, "/x/libk.so"), (0x5000, 0x6000, 0, "/y/libc.so.6")]
    funcs = [(0x100, 0x40, "__tvm_ffi_dsconv_a"), (0x200, 0x20, "dsconv_a_compute_"),
             (0x400, 0x20, "dsconv_b_compute_")]
    blocks = [(0x1100, 4, 3),     # dsconv_a wrapper entry: 3 calls
              (0x1210, 5, 10),    # inside dsconv_a_compute_
              (0x1300, 7, 2),     # after it, before dsconv_b: its parallel lambda
              (0x1400, 2, 1),     # dsconv_b
              (0x5010, 9, 1),     # libc
              (0x9000, 1, 4)]     # unmapped
    by_obj, per_fn, calls = tool.attribute(blocks, maps, "/x/libk.so", funcs)
    assert by_obj == {"libk.so": 12 + 50 + 14 + 2, "libc.so.6": 9, "[anonymous]": 4}
    assert per_fn == {"dsconv_a": 12 + 50 + 14, "dsconv_b": 2}
    assert calls == {"dsconv_a": 3}


def test_resnet20_dsconv_count_on_emulated_a76_is_unchanged(plugin, tmp_path):
    ref = json.loads(CI_JSON.read_text())
    out = tmp_path / "r20.json"
    cmd = [sys.executable, str(REPO / "tools" / "arm_count.py"), str(REPO / "models" / "resnet20.onnx"),
           "--cpu", ref["cpu"], "--target", ref["target"], "--bits", str(ref["config"]["bits"]),
           "--block", str(ref["config"]["block"]), "--mantissa", str(ref["config"]["mantissa"]),
           "--dense", ref["config"]["dense"], "--first-layer", ref["config"]["first_layer"],
           "--variants", "dsconv", "--timeout", "240", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(out.read_text())["variants"]["dsconv"]
    want = ref["variants"]["dsconv"]["instructions"]
    # the run computed the right thing (same class as ONNX Runtime on the host, close values)
    assert got["output_check"]["top1_agree"] == 1.0
    assert got["output_check"]["rel_l2_vs_host_ort_fp32"] < 0.25
    assert sum(got["per_layer"].values()) > 0.5 * got["instructions"]
    change = got["instructions"] / want - 1
    assert change <= TOLERANCE, (
        f"ResNet-20 on the emulated {ref['cpu']} now executes {got['instructions']:,} instructions "
        f"per inference, {100 * change:+.1f} % vs the committed {want:,} ({CI_JSON.name})")
    assert change >= -TOLERANCE, (
        f"ResNet-20 got faster: {got['instructions']:,} instructions vs the committed {want:,} "
        f"({100 * change:+.1f} %); update {CI_JSON.name} with tools/arm_count.py (see docs/arm.md)")


def test_mobilenet_v2_architecture_has_the_published_size(tmp_path):
    """tools/mobilenet_v2_arch.py (used when torch is missing) has MobileNetV2's 52 convs + 1 Gemm,
    300.8 M multiply-adds (the paper's 300 M; exactly the torchvision export's count) and 3.5 M
    weights."""
    import onnx
    from onnx import numpy_helper

    sys.path.insert(0, str(REPO / "tools"))
    import mobilenet_v2_arch

    model = mobilenet_v2_arch.build_graph()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    macs = _tool().layer_macs(str(path))
    assert len(macs) == 53
    assert sum(macs.values()) == 300_774_272
    weights = sum(numpy_helper.to_array(i).size for i in model.graph.initializer
                  if i.name.startswith(("conv_w", "fc_w")))
    assert weights == 3_469_760


def test_target_must_run_on_the_emulated_core():
    tool = _tool()
    tool.check_target("rpi5", "cortex-a76")
    tool.check_target("rpi4", "cortex-a72")
    tool.check_target("arm", "cortex-a72")
    with pytest.raises(tool.ArmCountError, match="dot-product"):
        tool.check_target("rpi5", "cortex-a72")
    with pytest.raises(tool.ArmCountError, match="not a 64-bit ARM"):
        tool.check_target("x86", "cortex-a76")
