"""The backend interface and the registry that picks one from a target: the only place where the
CPU/CUDA decision is made.  Adding a backend is a folder under ``backends/`` with a class
implementing :class:`Backend`, and one line in :data:`REGISTRY`."""

from __future__ import annotations

import importlib

import numpy as np

from ..errors import TargetError

#: TVM target kind -> "module:class" of its backend (imported when first used, so that importing
#: the registry costs nothing).
REGISTRY = {
    "llvm": "dsconv_tvm.backends.cpu.backend:CPUBackend",
    "cuda": "dsconv_tvm.backends.cuda.backend:CUDABackend",
}


class Backend:
    """What the rest of the package asks of a target family.  An instance is bound to one
    ``tvm.target.Target`` (:meth:`for_target`); the class methods need only the target's data."""

    #: the TVM target kind this backend compiles for
    kind = ""
    #: whether its DSConv kernels can fuse a residual add into their epilogue
    fuses_residual = False
    #: whether its DSConv kernels can write the next layers' BFP input and read it (fused BFP)
    fuses_bfp = False
    #: whether its DSConv kernels can apply a per-channel affine + ReLU to the float input before
    #: quantizing it (``DSConvLayer.has_prologue`` / ``prologue_relu``)
    fuses_prologue = False
    #: whether it runs a depthwise fp32 conv channel-innermost between two DSConv layers (the
    #: producer writing its float output [N, H, W, C], the consumers reading it so:
    #: ``DSConvLayer.fp32_nhwc`` / ``input_nhwc``, :meth:`depthwise_nhwc_primfunc`)
    nhwc_depthwise = False
    #: whether its kernels run on the calling thread's CPU (the tuning guard times them there)
    runs_on_host_cpu = False

    def __init__(self, target):
        self.target = target

    # -- targets (class level: from the target's data, before a tvm.target.Target exists) -------
    @classmethod
    def check_target_file(cls, raw: dict) -> str | None:
        """What is wrong with a target file of this backend's kind (None: nothing)."""
        return None

    @classmethod
    def resolve_target_dict(cls, spec, d: dict) -> dict:
        """The TVM target dict of ``spec`` with what only this machine knows filled in (for
        ``detect_host`` specs); ``d`` is a copy the method may change."""
        return d

    @classmethod
    def can_run_here(cls, spec) -> bool:
        """Whether a library built for ``spec`` runs on this machine (beyond the host architecture
        and CPU features, which :mod:`dsconv_tvm.target` checks)."""
        return True

    @classmethod
    def export_options(cls, spec) -> dict:
        """Extra keyword arguments of ``export_library`` for ``spec``."""
        return {}

    @classmethod
    def device(cls):
        """The TVM device a host library of this backend runs on."""
        import tvm

        return tvm.cpu(0)

    # -- kernels --------------------------------------------------------------------------------
    @property
    def act_dtype(self) -> str:
        """How the DSConv layers store their BFP mantissas on this target."""
        raise NotImplementedError

    def primfunc(self, layer):
        """The unscheduled PrimFunc of one :class:`~dsconv_tvm.scheme.layer.DSConvLayer`."""
        raise NotImplementedError

    def bfp_format(self, layer):
        """The :class:`~dsconv_tvm.scheme.layer.BFPFormat` in which ``layer`` reads a fused
        producer's output (only asked where :attr:`fuses_bfp`)."""
        raise NotImplementedError

    def computed_layer(self, layer):
        """``layer`` as this backend's kernel computes it (e.g. output channels padded to the vector
        lanes: ``out_slots``); asked by the rewrite once a layer's fused-BFP fields are set, before
        its PrimFunc is made (its constants are then made for the layer returned)."""
        return layer

    def depthwise_nhwc_primfunc(self, in_shape, kernel, geom, has_bias: bool, activation: str):
        """The unscheduled PrimFunc of a depthwise fp32 conv on a channel-innermost input (only
        asked where :attr:`nhwc_depthwise`); its constants from :meth:`depthwise_nhwc_params`."""
        raise NotImplementedError

    def depthwise_nhwc_params(self, w: np.ndarray, bias: np.ndarray | None) -> list[np.ndarray]:
        """The constant arguments of :meth:`depthwise_nhwc_primfunc` from the OIHW weight (C, 1, KH,
        KW) and the bias."""
        raise NotImplementedError

    def layer_params(self, layer, q: np.ndarray, xi: np.ndarray, bias: np.ndarray | None) -> list[np.ndarray]:
        """The constant arguments of the layer's PrimFunc after its input, in this backend's layout."""
        raise NotImplementedError

    # -- compiling ------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Register what compiling, tuning and replaying schedules need in this process (idempotent)."""

    def pipeline_module(self):
        """TVM's Relax backend pipeline module of the target family (``dataflow_lower_passes``,
        ``finalize_passes``, ...)."""
        raise NotImplementedError

    def legalize_passes(self) -> list:
        """Library dispatch, legalization and fusion: the module the schedules (default, tuned) and
        the tuner's task extraction see."""
        raise NotImplementedError

    def default_schedule_pass(self):
        """The pass giving every PrimFunc not yet scheduled its default schedule."""
        raise NotImplementedError

    def schedules_key(self, target_name: str) -> str:
        """The folder of ``schedules/`` whose shipped records fit this target (their traces name
        the kernels' tensor intrinsics): by default the target's own name."""
        return target_name

    # -- tuning ---------------------------------------------------------------------------------
    def dsconv_tuning_space(self):
        """(space generator, search strategy) of the DSConv tasks, or None: MetaSchedule's generic
        space (what DSConv tasks of a backend without a tunable template get)."""
        return None

    def tuning_builder_options(self, spec) -> dict:
        """Keyword arguments of MetaSchedule's ``LocalBuilder`` (worker initializer, export)."""
        raise NotImplementedError


def deployed_bytes(params: list[np.ndarray]) -> int:
    """The deployed bytes of a converted layer: its packed weights and scales, the first two of its
    :meth:`Backend.layer_params`."""
    return int(params[0].nbytes + params[1].nbytes)


def backend_class(kind: str) -> type[Backend]:
    """The backend class of a TVM target kind ("llvm", "cuda", ...)."""
    try:
        module, name = REGISTRY[kind].split(":")
    except KeyError:
        raise TargetError(f"no DSConv backend for TVM target kind '{kind}' "
                          f"(known: {', '.join(sorted(REGISTRY))})") from None
    return getattr(importlib.import_module(module), name)


def backend_for(target) -> Backend:
    """The backend bound to a ``tvm.target.Target``."""
    return backend_class(str(target.kind.name))(target)
