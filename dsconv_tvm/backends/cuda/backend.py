"""The CUDA backend object (TVM target kind ``cuda``)."""

from __future__ import annotations

import os
import tempfile

from ...errors import TargetError
from ..base import Backend
from ..common import import_cpu_tensor_intrinsics, pack_scales
from .arch import detect_gpu_arch, gpu_present, has_dp4a
from .codegen import register_codegen_hook
from .kernels import dsconv_primfunc, pack_weights
from .nvrtc import NVRTC_HINT, nvrtc_available
from .ptx import pack_imports
from .schedule import default_schedule_pass


class CUDABackend(Backend):
    kind = "cuda"
    fuses_residual = False

    # -- targets --------------------------------------------------------------------------------
    @classmethod
    def check_target_file(cls, raw: dict) -> str | None:
        if not isinstance(raw.get("cuda"), dict):
            return "a cuda tvm_target and the 'cuda' key go together"
        return None

    @classmethod
    def resolve_target_dict(cls, spec, d: dict) -> dict:
        """``detect_host`` targets get the arch of this machine's GPU (nvidia-smi or
        $DSCONV_CUDA_ARCH); their host CPU is completed by :mod:`dsconv_tvm.target`."""
        if not spec.detect_host:
            return d
        arch = detect_gpu_arch()
        if arch is None:
            raise TargetError(f"target '{spec.name}': no NVIDIA GPU found (nvidia-smi missing or lists none); "
                              f"set DSCONV_CUDA_ARCH=sm_XY to compile for one, or use a jetson-* target")
        d["arch"] = arch
        return d

    @classmethod
    def can_run_here(cls, spec) -> bool:
        return gpu_present()

    @classmethod
    def export_options(cls, spec) -> dict:
        """Pack PTX, not CUDA source, into the ``.so``."""

        if not nvrtc_available():
            raise TargetError(f"target '{spec.name}' needs NVRTC 11.8 to put PTX into the .so; {NVRTC_HINT}")
        return {"fpack_imports": pack_imports(spec_arch(spec), (spec.cuda or {}).get("ptx_version"))}

    @classmethod
    def device(cls):
        import tvm

        return tvm.cuda(0)

    # -- kernels --------------------------------------------------------------------------------
    @property
    def arch(self) -> str:
        arch = str(self.target.attrs.get("arch", ""))
        if not arch:
            raise TargetError(f"target {self.target} has no CUDA arch")
        return arch

    @property
    def act_dtype(self) -> str:
        return "uint8"

    def primfunc(self, layer):
        return dsconv_primfunc(layer, has_dp4a(self.arch))

    def layer_params(self, layer, q, xi, bias):
        params = [pack_weights(q, layer.bits, layer.block), pack_scales(xi, layer.scale_dtype)]
        return params + ([bias] if bias is not None else [])

    # -- compiling ------------------------------------------------------------------------------
    def prepare(self) -> None:
        register_codegen_hook()

    def pipeline_module(self):
        from tvm.relax.backend.cuda import pipeline

        return pipeline

    def legalize_passes(self) -> list:
        """CUDA library dispatch + legalize + fusion, without TVM's dlight pass."""
        from tvm import relax

        return self.pipeline_module().library_dispatch_passes(self.target) + [
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]

    def default_schedule_pass(self):
        return default_schedule_pass()

    # -- tuning ---------------------------------------------------------------------------------
    def tuning_builder_options(self, spec) -> dict:
        """Candidates carry PTX (the runner needs no compile callback); the dp4a definition is
        registered in every builder worker."""
        return {"initializer": tuning_worker_init,
                "f_export": tuning_export(self.arch, (spec.cuda or {}).get("ptx_version"))}


def spec_arch(spec) -> str:
    """The CUDA arch of a target spec ("sm_87"; detected for ``detect_host`` specs)."""
    return str(spec.resolved_target_dict()["arch"])


def tuning_worker_init() -> None:
    """MetaSchedule builder worker initializer for CUDA targets."""

    import_cpu_tensor_intrinsics()
    register_codegen_hook()


def tuning_export(arch: str, ptx_version: str | None = None):
    """MetaSchedule ``f_export``: candidates exported with PTX."""
    def export(mod) -> str:        # runs in the builder worker

        path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
        mod.export_library(path, fpack_imports=pack_imports(arch, ptx_version, check_ptxas=False))
        return path
    return export
