"""ONNX -> Relax -> DSConv Relax -> scheduled TensorIR -> .so: the one compile path.

``compile_model`` is what ``dsconv-tvm compile`` runs.  The pieces are usable on their own:
``build_relax`` (import + rewrite), ``relax_pipeline`` (TVM's CPU or CUDA pipeline with the DSConv default
schedules inserted after fusion) and ``build`` (Relax module -> executable for a target).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from .config import DSConvConfig
from .errors import ModelError
from .outputs import check_output_path
from .frontend import LoadedModel, load_onnx, to_relax
from .targets import TargetSpec, get_target
from .transform import ConversionReport, DSConvRewrite


def relax_pipeline(target, database=None, tuned: list | None = None):
    """TVM's default Relax pipeline for the target (CPU or CUDA), with (in this order) the schedules
    of a tuning database applied to the fused TIR, then the DSConv / fallback default schedule
    rules for the rest.  The names of the functions the database scheduled are appended to
    ``tuned``."""
    import contextlib

    import tvm
    from tvm import relax

    from .schedule import register_metaschedule_rule

    if database is not None:             # replaying tuned traces needs the DSConv intrinsics
        register_metaschedule_rule()

    @tvm.transform.module_pass(opt_level=0, name="RecordTunedFunctions")
    def _record(mod, _ctx):
        if tuned is not None:
            tuned.extend(gv.name_hint for gv, f in mod.functions_items()
                         if isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get("tirx.is_scheduled", False))
        return mod

    if target.kind.name == "cuda":           # GPU: the CUDA DSConv rule in front of dlight's GPU rules
        from tvm.relax.backend.cuda import pipeline as backend

        from . import cuda
        cuda.register_codegen_hook()
        legalize, default_schedules = cuda.legalize_passes, cuda.default_schedule_pass
    else:
        from tvm.relax.backend.cpu_generic import pipeline as backend

        from .schedule import default_schedule_pass as default_schedules

        def legalize(t):
            return backend.library_dispatch_passes(t) + backend.legalize_passes(t)

    @tvm.transform.module_pass(opt_level=0, name="DSConvPipeline")
    def _pipeline(mod, _ctx):
        with target, (database if database is not None else contextlib.nullcontext()):
            apply_db = [relax.transform.MetaScheduleApplyDatabase(enable_warning=False), _record] \
                if database is not None else []
            seq = tvm.transform.Sequential(
                legalize(target)
                + apply_db
                + [default_schedules()]
                + backend.dataflow_lower_passes(target)
                + backend.finalize_passes(target))
            mod = seq(mod)
        return mod

    return _pipeline


def build_relax(loaded: LoadedModel, config: DSConvConfig | None, spec: TargetSpec | None = None):
    """The Relax module of the model, with convs rewritten to DSConv unless ``config`` is None."""
    mod = _with_input_shapes(to_relax(loaded), loaded)
    if config is None:
        return mod, ConversionReport()
    return rewrite_dsconv(mod, loaded, config, spec)


def rewrite_dsconv(fp32_mod, loaded: LoadedModel, config: DSConvConfig, spec: TargetSpec | None = None):
    """``DSConvRewrite`` on an imported module (which stays as it is); (new module, report).
    ``spec`` picks the kernels: how the CPU layers store their mantissas (what the target's dot
    product takes), or the CUDA kernel family for GPU targets."""
    from .cuda import kernels_for
    from .intrinsics import activation_dtype

    kernels = kernels_for(spec) if spec is not None else None
    act = activation_dtype(spec.tvm_target()) if spec is not None and kernels is None else "uint8"
    rewrite = DSConvRewrite(config, loaded.conv_names, act, kernels)
    return rewrite(fp32_mod), rewrite.report


def _with_input_shapes(mod, loaded: LoadedModel):
    """Add ``dsconv_input_shapes()`` returning the compiled input shapes (read by ``run``)."""
    from tvm import relax

    bb = relax.BlockBuilder(mod)
    with bb.function("dsconv_input_shapes", []):
        bb.emit_func_output(relax.Tuple([relax.ShapeExpr(list(s)) for s in loaded.input_shapes.values()]))
    return bb.get()


def build(mod, spec: TargetSpec, database=None, tuned: list | None = None):
    """Compile a Relax module for a target spec; returns the ``tvm.runtime.Executable``."""
    import tvm

    target = spec.tvm_target()
    return tvm.compile(mod, target, relax_pipeline=relax_pipeline(target, database, tuned))


def run_executable(ex, inputs: list[np.ndarray], dev=None) -> np.ndarray:
    """Run ``main`` of a host executable (or a loaded .so) on numpy inputs (on ``dev``, default CPU)."""
    import tvm
    from tvm import relax

    dev = dev or tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs])
    if not hasattr(out, "numpy"):          # a tuple of outputs: the first
        out = out[0]
    return out.numpy()


def sample_inputs(loaded: LoadedModel, seed: int = 0) -> list[np.ndarray]:
    """A deterministic sample input per graph input (uniform [0, 1): image-like)."""
    rng = np.random.default_rng(seed)
    return [rng.random(shape).astype(loaded.input_dtypes[name])
            for name, shape in loaded.input_shapes.items()]


@dataclass
class Agreement:
    max_abs_diff: float
    rel_l2: float
    top1_agree: float          # fraction of samples whose argmax agrees (classification outputs)
    where: str                 # "the compiled .so" or "a host build of the same DSConv model"


@dataclass
class CompileResult:
    output: str
    target: str
    config: DSConvConfig
    report: ConversionReport
    input_shapes: dict
    folded_bn: list
    seconds: float
    agreement: Agreement | None = None
    notes: list[str] = field(default_factory=list)
    schedules: str = "default schedules"      # where the schedules came from
    tuned_functions: list[str] = field(default_factory=list)


def compare_outputs(ref: np.ndarray, out: np.ndarray, where: str) -> Agreement:
    diff = float(np.max(np.abs(ref - out))) if ref.size else 0.0
    rel = float(np.linalg.norm(ref - out) / max(np.linalg.norm(ref), 1e-30))
    r2, o2 = ref.reshape(ref.shape[0], -1), out.reshape(out.shape[0], -1)
    top1 = float(np.mean(np.argmax(r2, axis=1) == np.argmax(o2, axis=1)))
    return Agreement(diff, rel, top1, where)


def compile_model(model_path: str, target: str, output: str, config: DSConvConfig | None = None,
                  input_shapes: dict | None = None, check: bool = True, log=None,
                  tuning_db: str | None = None) -> CompileResult:
    """Compile an ONNX model into a DSConv ``.so`` for ``target`` (see ``dsconv-tvm compile``)."""
    log = log or (lambda msg: None)
    config = config or DSConvConfig()
    t0 = time.time()
    spec = get_target(target)
    spec.check_toolchain()
    check_output_path(output)
    loaded = load_onnx(model_path, input_shapes)
    unknown = [name for name in config.skip if name not in loaded.conv_names]
    if unknown:
        raise ModelError(f"{model_path}: --skip {' '.join(unknown)}: no Conv node of that name; the Conv "
                         f"nodes are: {', '.join(loaded.conv_names) or '(none)'}")
    log(f"loaded {model_path}: inputs {loaded.input_shapes}, {len(loaded.conv_names)} Conv nodes, "
        f"{len(loaded.folded_bn)} BatchNormalization folded")
    fp32_mod, _ = build_relax(loaded, None)
    mod, report = rewrite_dsconv(fp32_mod, loaded, config, spec)
    log(f"rewrote {len(report.converted)} of {len(report.layers)} convs to DSConv; compiling for {spec.name}")
    from .tuning import find_database
    database, where = find_database(spec.name, tuning_db)
    tuned: list[str] = []
    ex = build(mod, spec, database, tuned)
    spec.export_library(ex, output)
    result = CompileResult(output, spec.name, config, report, loaded.input_shapes, loaded.folded_bn,
                           time.time() - t0, schedules=where, tuned_functions=tuned)
    if not report.layers:
        result.notes.append("warning: the model has no convolution; it was compiled without DSConv layers")
    if check:
        result.agreement = _agreement(loaded, spec, output, mod, fp32_mod, config)
    result.seconds = time.time() - t0
    return result


def _agreement(loaded: LoadedModel, spec: TargetSpec, output: str, dsconv_mod, fp32_mod,
               config: DSConvConfig | None = None) -> Agreement:
    """fp32 (TVM, host) vs DSConv on a sample input."""
    import tvm

    host = get_target("x86")
    inputs = sample_inputs(loaded)
    ref = run_executable(build(fp32_mod, host), inputs)
    if spec.runs_here():
        dev = tvm.cuda(0) if spec.cuda is not None else None
        out = run_executable(tvm.runtime.load_module(os.path.abspath(output)), inputs, dev)
        where = "the compiled .so"
    elif spec.cuda is not None:          # GPU layout: compare the same quantization on CPU kernels
        out = run_executable(build(rewrite_dsconv(fp32_mod, loaded, config)[0], host), inputs)
        where = "a host build of the same DSConv model (CPU kernels)"
    else:
        out = run_executable(build(dsconv_mod, host), inputs)
        where = "a host build of the same DSConv model"
    return compare_outputs(ref, out, where)
