"""DSConv on CUDA: the GPU layout's arithmetic (checked on the CPU against the numpy reference),
the generated device code (PTX arch, dp4a), the .so files for the Jetson targets, and - only where
a GPU is present - the kernels run on the GPU against the numpy reference."""

import re

import numpy as np
import pytest
import tvm

from dsconv_tvm.backends import common
from dsconv_tvm.backends.cuda import arch as cuda_arch
from dsconv_tvm.backends.cuda import kernels, nvrtc, schedule
from dsconv_tvm.backends.cuda import ptx as ptx_module
from dsconv_tvm.errors import TargetError
from dsconv_tvm.scheme.layer import DSConvLayer
from dsconv_tvm.scheme.geometry import ConvGeometry
from dsconv_tvm.scheme.reference import activate, dsconv2d
from dsconv_tvm.target import get_target
from dsconv_tvm.scheme.weights import quantize_weight

HOST = get_target("x86").tvm_target()
NO_NVRTC = "NVRTC 11.8 (pip extra 'cuda') is not installed: PTX cannot be generated"
NO_GPU = "no CUDA GPU here (CI has none): the kernels were compiled and their PTX checked, not run"

CASES = [
    # in_shape, CO, kernel, strides, padding, bits, block, mantissa, unsigned, bias, act
    ((1, 10, 7, 5), 6, (3, 3), (1, 1), (1, 1, 1, 1), 4, 8, 8, True, True, "relu"),
    ((2, 9, 6, 6), 4, (3, 3), (2, 2), (1, 1, 1, 1), 4, 5, 8, False, False, "none"),
    ((1, 12, 5, 5), 8, (1, 1), (1, 1), (0, 0, 0, 0), 8, 6, 7, True, True, "none"),
    ((1, 7, 6, 6), 3, (3, 3), (1, 1), (2, 2, 2, 2), 3, 3, 6, False, True, "relu"),
    ((1, 16, 5, 5), 8, (1, 1), (1, 1), (0, 0, 0, 0), 4, 16, 8, True, True, "relu6"),
]


def _layer(case) -> DSConvLayer:
    shape, co, k, s, pad, bits, block, m, uns, bias, act = case
    return DSConvLayer(shape, co, k, ConvGeometry(s, pad, (1, 1)), bits, block, m, uns, "float32", bias, act)


def _data(layer: DSConvLayer, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(layer.in_shape).astype(np.float32) * 3
    if layer.unsigned:
        x = np.maximum(x, 0)
    co, c = layer.out_channels, layer.in_shape[1]
    wf = rng.standard_normal((co, c, *layer.kernel)).astype(np.float32)
    qw = quantize_weight(wf, layer.bits, layer.block, "l2", layer.scale_dtype)
    bias = rng.standard_normal(co).astype(np.float32) if layer.has_bias else None
    args = [x, kernels.pack_weights(qw.q, layer.bits, layer.block), common.pack_scales(qw.xi, layer.scale_dtype)]
    if bias is not None:
        args.append(bias)
    ref = dsconv2d(x, qw.q, qw.xi, layer.block, layer.mantissa, layer.geom, bias, layer.unsigned)
    ref = activate(ref, layer.activation)
    absref = dsconv2d(np.abs(x), np.abs(qw.q.astype(np.int16)), np.abs(qw.xi), layer.block, layer.mantissa,
                      layer.geom, None, layer.unsigned)
    atol = 2e-6 * layer.groups * layer.kernel[0] * layer.kernel[1] * float(absref.max()) + 1e-30
    return args, ref, atol


def test_weight_words_hold_each_channel_once():
    """Packed 4-bit words: byte b = channel b (low nibble) | channel b+4 (high nibble)."""
    rng = np.random.default_rng(1)
    q = rng.integers(-8, 8, size=(3, 11, 2, 2))
    words = kernels.pack_weights(q, 4, 11).view(np.uint32)            # G=1, slots 16 -> 2 words
    assert words.shape == (1, 2, 2, 2, 3)
    slots = np.zeros((2, 2, 16, 3), np.int64)                     # KH, KW, channel slot, CO
    for wi in range(2):
        for byte in range(4):
            for half, ch in ((0, byte), (1, byte + 4)):
                nib = (words[0, :, :, wi, :].astype(np.int64) >> (8 * byte + 4 * half)) & 0xF
                slots[:, :, 8 * wi + ch] = (nib ^ 8) - 8
    np.testing.assert_array_equal(slots[:, :, :11].transpose(3, 2, 0, 1), q)
    assert not slots[:, :, 11:].any()


@pytest.mark.parametrize("case", CASES)
def test_cuda_layout_arithmetic_on_cpu(case):
    """The CUDA PrimFunc's integer arithmetic (mantissa words, nibble unpacking, the -128 offset of
    unsigned mantissas and its weight-sum correction), built for the CPU, against numpy."""
    layer = _layer(case)
    args, ref, atol = _data(layer)
    ex = tvm.compile(kernels.dsconv_primfunc(layer, dp4a=False).with_attr("global_symbol", "main"), HOST)
    out = tvm.runtime.tensor(np.zeros(layer.out_shape, np.float32))
    ex(*[tvm.runtime.tensor(a) for a in args], out)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=atol)


def _cuda_source(layer, arch):
    target = tvm.target.Target({"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}})
    func = kernels.dsconv_primfunc(layer, cuda_arch.has_dp4a(arch)).with_attr("global_symbol", "main")
    ex = tvm.compile(schedule.schedule_dsconv_cuda(func, target).mod, target)
    dev = [m for m in ex.mod.imports if m.kind == "cuda"]
    assert dev, "no CUDA device module"
    return dev[0].inspect_source("cuda")


@pytest.mark.parametrize("board,arch,dp4a", [("jetson-orin", "sm_87", True), ("jetson-xavier", "sm_72", True),
                                              ("jetson-nano", "sm_53", False)])
def test_ptx_for_arch(board, arch, dp4a):
    if not nvrtc.nvrtc_available():
        pytest.skip(NO_NVRTC)
    src = _cuda_source(_layer(CASES[0]), arch)
    ptx = nvrtc.compile_ptx(src, arch)
    assert re.search(rf"^\.target {arch}\b", ptx, re.M)
    assert ("dp4a.s32.s32" in ptx) == dp4a            # sm_53 has no dp4a: int32 multiply-adds
    assert ".entry" in ptx
    if nvrtc.ptxas_path():
        isa = get_target(board).cuda["ptx_version"]        # what the board's JetPack driver takes
        low = nvrtc.set_ptx_version(ptx, isa)
        assert re.search(rf"^\.version {re.escape(isa)}$", low, re.M)
        assert len(nvrtc.assemble(low, arch)) > 0           # ptxas 11.8: valid PTX of that ISA


@pytest.fixture(scope="module")
def orin_so(tmp_path_factory):
    if not nvrtc.nvrtc_available():
        pytest.skip(NO_NVRTC)
    from dsconv_tvm.driver.compile import compile_model

    spec = get_target("jetson-orin")
    try:
        spec.check_toolchain()
    except TargetError as exc:
        pytest.skip(str(exc))
    out = str(tmp_path_factory.mktemp("orin") / "resnet20.so")
    res = compile_model("models/resnet20.onnx", "jetson-orin", out)
    return out, res


def test_jetson_orin_so_carries_ptx(orin_so):
    path, res = orin_so
    from dsconv_tvm.host import elf_machine

    assert elf_machine(path) == "AArch64"
    code = ptx_module.device_code(path)
    assert [fmt for fmt, _ in code] == ["ptx"]                  # PTX, no CUDA source
    ptx = code[0][1].decode()
    assert re.search(r"^\.target sm_87\b", ptx, re.M) and re.search(r"^\.version 7\.4$", ptx, re.M)
    assert ptx.count("dp4a.s32.s32") >= 20 * 2                 # every DSConv layer uses dp4a
    assert b"__global__" not in open(path, "rb").read()
    assert len(res.report.converted) == 20
    # the same quantization run with the CPU kernels: agrees with fp32 like on the CPU targets
    assert res.agreement.top1_agree == 1.0 and res.agreement.rel_l2 < 0.3


def test_cuda_target_without_gpu_says_so(monkeypatch):
    monkeypatch.delenv("DSCONV_CUDA_ARCH", raising=False)
    if cuda_arch.detect_gpu_arch() is not None:
        pytest.skip("this machine has a GPU")
    with pytest.raises(TargetError, match="no NVIDIA GPU found"):
        get_target("cuda").tvm_target()


def test_cuda_target_arch_from_env(monkeypatch):
    monkeypatch.setenv("DSCONV_CUDA_ARCH", "sm_75")
    t = get_target("cuda").tvm_target()
    assert t.kind.name == "cuda" and str(t.attrs["arch"]) == "sm_75" and t.host.kind.name == "llvm"


@pytest.mark.skipif(not cuda_arch.gpu_present(), reason=NO_GPU)
@pytest.mark.parametrize("case", CASES)
def test_dsconv_on_gpu(case):
    """The scheduled CUDA kernel (dp4a where the GPU has it) on the GPU, against numpy."""
    arch = cuda_arch.detect_gpu_arch()
    layer = _layer(case)
    args, ref, atol = _data(layer)
    target = tvm.target.Target({"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}})
    func = kernels.dsconv_primfunc(layer, cuda_arch.has_dp4a(arch)).with_attr("global_symbol", "main")
    ex = tvm.compile(schedule.schedule_dsconv_cuda(func, target).mod, target)
    dev = tvm.cuda(0)
    out = tvm.runtime.tensor(np.zeros(layer.out_shape, np.float32), dev)
    ex(*[tvm.runtime.tensor(a, dev) for a in args], out)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=atol)
