"""The CPU backend object (TVM target kind ``llvm``): x86 (AVX2, AVX-512, VNNI) and ARM (NEON,
dot product)."""

from __future__ import annotations

import functools
import os

from ...host import HOST_FEATURE_NAMES, host_features, mcpu_features
from ..base import Backend
from ..common import import_cpu_tensor_intrinsics
from .layout import bfp_format, layer_params

# The kernel, schedule and intrinsics modules import TVM at their top: they are imported in the
# methods below, so that reading target files (which asks a backend to check them) does not.


class CPUBackend(Backend):
    kind = "llvm"
    runs_on_host_cpu = True
    fuses_residual = True
    fuses_prologue = True
    nhwc_depthwise = True

    # -- targets --------------------------------------------------------------------------------
    @classmethod
    def check_target_file(cls, raw: dict) -> str | None:
        if "cuda" in raw:
            return "a cuda tvm_target and the 'cuda' key go together"
        if not raw.get("detect_host", False) and not isinstance(raw["tvm_target"].get("num-cores"), int):
            return "llvm tvm_target needs an integer 'num-cores'"
        return None

    @classmethod
    def resolve_target_dict(cls, spec, d: dict) -> dict:
        """``detect_host`` targets: ``mcpu`` from LLVM's host CPU name, ``num-cores`` from
        :func:`os.cpu_count`, ``mattr`` from the detected AVX2 / AVX-512 / VNNI flags."""
        if not spec.detect_host:
            return d
        from tvm.target import codegen

        cpu = str(codegen.llvm_get_system_cpu())
        d["kind"] = d.get("kind", "llvm")
        d["mcpu"] = cpu
        d["num-cores"] = os.cpu_count() or 1
        host = host_features()
        implied = mcpu_features(cpu, d.get("mtriple"))
        mattr = [a for a in d.get("mattr", []) if a.lstrip("+-") not in HOST_FEATURE_NAMES]
        for feat in HOST_FEATURE_NAMES:
            if feat not in spec.features:
                continue
            if host.get(feat, False):
                mattr.append("+" + feat)
            elif implied.get(feat, False):
                # the CPU model implies it but this CPU (or VM) does not expose it
                mattr.append("-" + feat)
        if mattr:
            d["mattr"] = mattr
        else:
            d.pop("mattr", None)
        return d

    @classmethod
    def can_run_here(cls, spec) -> bool:
        if spec.detect_host:
            return True
        host = host_features()
        return all(host.get(f, False) for f in spec.features if f in HOST_FEATURE_NAMES)

    # -- kernels --------------------------------------------------------------------------------
    @functools.cached_property
    def act_dtype(self) -> str:          # asked once per converted layer by the pass: asked LLVM once
        from .intrinsics import activation_dtype

        return activation_dtype(self.target)

    @functools.cached_property
    def fuses_bfp(self) -> bool:
        """Fused BFP between layers on x86 (its kernels' ISA has an x86 schedules key): measured
        faster there; on ARM the kernels are tested but not the default: with main's ARM kernels
        (no mantissa sums, vectorized rounding) the emulated counts are mixed (ResNet-20 A76
        -31 %, almost all outside the quantization and MAC blocks; A72 -0.6 %; vgg_small A76
        +0.4 %; results/fused_bfp_arm_count.json)."""
        from .intrinsics import isa_of

        return isa_of(self.target) in X86_SCHEDULE_KEYS

    def primfunc(self, layer):
        from .kernels import dsconv_primfunc

        return dsconv_primfunc(layer)

    def depthwise_nhwc_primfunc(self, in_shape, kernel, geom, has_bias, activation):
        from .depthwise import depthwise_nhwc_primfunc

        return depthwise_nhwc_primfunc(in_shape, kernel, geom, has_bias, activation)

    def depthwise_nhwc_params(self, w, bias):
        from .depthwise import depthwise_nhwc_params

        return depthwise_nhwc_params(w, bias)

    def bfp_format(self, layer):
        return bfp_format(layer)

    def layer_params(self, layer, q, xi, bias):
        return layer_params(layer, q, xi, bias)

    def computed_layer(self, layer):
        """``layer`` as the x86 kernel computes it: output channels the widest dot-product lanes
        do not divide (ShuffleNet's 68 and 34 per group, a 1000-class conv head, 136 ...) padded
        to them (``out_slots``: zero weights, the epilogue writes the real ones), so the widest
        dot-product schedule applies instead of a narrower instruction or the plain 2- or
        4-channel one.  Measured on Zen 5 (one thread, CPU time): 68x14x14 -> 68 1x1 0.408 ->
        0.020 ms, 34x28x28 -> 34 0.413 -> 0.028, 136x7x7 -> 136 0.015 -> 0.011 (144x56x56 -> 24
        0.393 -> 0.358, but multiples of 8 below two vectors keep the 8-lane instruction: padding
        would waste a third or more).  Only for layers that write float NCHW (a fused-BFP or
        channel-innermost output's tiles are whole blocks: the rewrite asks after chaining), not
        for fully connected layers (their own schedule) nor on ARM (unmeasured there)."""
        import dataclasses

        from .intrinsics import isa_of, select
        from .schedule import vector_lanes

        lanes = vector_lanes(self.target)
        co = layer.out_channels
        if isa_of(self.target) not in X86_SCHEDULE_KEYS or co % lanes == 0 or (co % 8 == 0 and co < 2 * lanes) \
                or layer.bfp_output is not None or layer.fp32_nhwc or tuple(layer.out_shape[2:]) == (1, 1):
            return layer
        padded = -(-co // lanes) * lanes
        if select(self.target, layer.bits, layer.act_dtype, padded) is None:
            return layer
        return dataclasses.replace(layer, out_slots=padded)

    # -- compiling ------------------------------------------------------------------------------
    def prepare(self) -> None:
        from .schedule import register_metaschedule_rule

        register_metaschedule_rule()          # tuned traces name the DSConv intrinsics

    def pipeline_module(self):
        from tvm.relax.backend.cpu_generic import pipeline

        return pipeline

    def legalize_passes(self) -> list:
        pipe = self.pipeline_module()
        return pipe.library_dispatch_passes(self.target) + pipe.legalize_passes(self.target)

    def default_schedule_pass(self):
        from tvm.s_tir import dlight

        from .depthwise import DepthwiseNHWCCPU
        from .rules import FP32ConvCPU, ParallelFallback, PoolCPU
        from .schedule import DSConvCPU

        return dlight.ApplyDefaultSchedule(DSConvCPU(), DepthwiseNHWCCPU(), FP32ConvCPU(), PoolCPU(),
                                           ParallelFallback())

    def schedules_key(self, target_name: str) -> str:
        """x86 targets share the records of their kernels' dot-product instruction set (the traces
        name its intrinsic), whatever the CPU is called: ``--target x86`` on a VNNI host finds
        ``x86-vnni``, on an AVX2 host ``x86-avx2``.  ARM targets: by name."""
        from .intrinsics import isa_of

        return X86_SCHEDULE_KEYS.get(isa_of(self.target), target_name)

    # -- tuning ---------------------------------------------------------------------------------
    def dsconv_tuning_space(self):
        from .schedule import tuning_space

        return tuning_space()

    def tuning_builder_options(self, spec) -> dict:
        opts = {"initializer": import_cpu_tensor_intrinsics}
        if spec.cross_compiler:
            opts["f_export"] = export_with(spec.cross_compiler)
        return opts


#: the schedules/ folder of each x86 kernel instruction set (:func:`.intrinsics.isa_of`)
X86_SCHEDULE_KEYS = {"vnni": "x86-vnni", "avx512": "x86-avx512", "avx2": "x86-avx2"}


def export_with(cc: str):
    """MetaSchedule ``f_export``: link a candidate with the cross compiler ``cc``."""
    def export(mod) -> str:        # runs in the builder worker
        import os as _os
        import tempfile as _tempfile
        path = _os.path.join(_tempfile.mkdtemp(), "tvm_tmp_mod.so")
        mod.export_library(path, cc=cc)
        return path
    return export
