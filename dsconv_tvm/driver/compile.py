"""ONNX -> Relax -> DSConv Relax -> scheduled TensorIR -> .so: the one compile path.

``compile_model`` is what ``dsconv-tvm compile`` runs.  The pieces are usable on their own:
``build_relax`` (import + rewrite), ``rewrite_dsconv`` (the DSConv pass with the target's backend)
and ``build`` (Relax module -> executable for a target, through :func:`dsconv_tvm.pipeline.relax_pipeline`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ..backends.base import backend_for
from ..config import DSConvConfig
from ..errors import DSConvError, ModelError, check_interrupted
from ..execute.compare import Agreement, compare_outputs
from ..execute.runner import run_executable, sample_inputs
from ..fileio import check_output_path
from ..frontend.onnx import LoadedModel, load_onnx, to_relax
from ..pipeline import relax_pipeline
from ..rewrite.dsconv_rewrite import DSConvRewrite
from ..rewrite.report import ConversionReport
from ..target import HOST_TARGET, TargetSpec, get_target
from .database import DB_FILES, find_database


def build_relax(loaded: LoadedModel, config: DSConvConfig | None, spec: TargetSpec | None = None):
    """The Relax module of the model, with convs rewritten to DSConv unless ``config`` is None."""
    mod = with_input_shapes(to_relax(loaded), loaded)
    if config is None:
        return mod, ConversionReport()
    return rewrite_dsconv(mod, loaded, config, spec)


def rewrite_dsconv(fp32_mod, loaded: LoadedModel, config: DSConvConfig, spec: TargetSpec | None = None):
    """``DSConvRewrite`` on an imported module (which stays as it is); (new module, report).
    ``spec`` picks the kernels (its backend, bound to its TVM target); default: the CPU kernels of
    a generic x86 target."""

    backend = backend_for(spec.tvm_target()) if spec is not None else None
    rewrite = DSConvRewrite(config, loaded.conv_names, backend)
    try:
        return rewrite(fp32_mod), rewrite.report
    except DSConvError:
        raise
    except Exception:
        error = getattr(rewrite, "error", None)     # ours, raised inside the pass (through TVM's FFI)
        if isinstance(error, DSConvError):
            raise error from None
        raise


def with_input_shapes(mod, loaded: LoadedModel):
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
    allocation: object = None                 # mixed precision: the accuracy.mixed.Allocation, if any


def compile_model(model_path: str, target: str, output: str, config: DSConvConfig | None = None,
                  input_shapes: dict | None = None, check: bool = True, log=None,
                  tuning_db: str | None = None) -> CompileResult:
    """Compile an ONNX model into a DSConv ``.so`` for ``target`` (see ``dsconv-tvm compile``)."""

    log = log or (lambda msg: None)
    config = config or DSConvConfig()
    t0 = time.time()
    spec = get_target(target)
    spec.check_toolchain()
    # a shared library: TVM's loader treats other names specially (.tar is unpacked with tar, ...)
    check_output_path(output, inputs=[model_path, *_database_files(tuning_db)], suffixes=[".so"])
    loaded = load_onnx(model_path, input_shapes)
    unknown = [name for name in config.skip if name not in loaded.conv_names]
    if unknown:
        raise ModelError(f"{model_path}: --skip {' '.join(unknown)}: no Conv node of that name; the Conv "
                         f"nodes are: {', '.join(loaded.conv_names) or '(none)'}")
    unknown = [name for name in config.layer_bits
               if name not in loaded.conv_names and not (config.dense == "dsconv" and name.startswith("dense"))]
    if unknown:
        raise ModelError(f"{model_path}: layer_bits names {', '.join(unknown)}: no Conv node of that name; the "
                         f"Conv nodes are: {', '.join(loaded.conv_names) or '(none)'}")
    log(f"loaded {model_path}: inputs {loaded.input_shapes}, {len(loaded.conv_names)} Conv nodes, "
        f"{len(loaded.folded_bn)} BatchNormalization folded")
    fp32_mod, _ = build_relax(loaded, None)
    mod, report = rewrite_dsconv(fp32_mod, loaded, config, spec)
    log(f"rewrote {len(report.converted)} of {len(report.layers)} convs to DSConv; compiling for {spec.name}")
    database, where = find_database(spec.name, tuning_db)
    tuned: list[str] = []
    ex = build(mod, spec, database, tuned)
    check_interrupted()                  # an interrupt TVM turned into an error and a fallback caught
    spec.export_library(ex, output)
    result = CompileResult(output, spec.name, config, report, loaded.input_shapes, loaded.folded_bn,
                           time.time() - t0, schedules=where, tuned_functions=tuned)
    if not report.layers:
        result.notes.append("warning: the model has no convolution; it was compiled without DSConv layers")
    if check:
        result.agreement = _agreement(loaded, spec, output, mod, fp32_mod, config)
    result.seconds = time.time() - t0
    return result


def _database_files(tuning_db: str | None) -> list[str]:
    if not tuning_db:
        return []
    return [tuning_db] + [os.path.join(tuning_db, f) for f in DB_FILES]


def _agreement(loaded: LoadedModel, spec: TargetSpec, output: str, dsconv_mod, fp32_mod,
               config: DSConvConfig) -> Agreement:
    """fp32 (TVM, host) vs DSConv on a sample input, run with the library itself where it runs here,
    else with a host build of the same quantization (the host's kernels)."""
    import tvm

    host = get_target(HOST_TARGET)
    inputs = sample_inputs(loaded)
    ref = run_executable(build(fp32_mod, host), inputs)
    if spec.runs_here():
        out = run_executable(tvm.runtime.load_module(os.path.abspath(output)), inputs, spec.backend.device())
        where = "the compiled .so"
    elif spec.backend is not host.backend:   # another layout: the same quantization on host kernels
        out = run_executable(build(rewrite_dsconv(fp32_mod, loaded, config)[0], host), inputs)
        where = "a host build of the same DSConv model (CPU kernels)"
    else:
        out = run_executable(build(dsconv_mod, host), inputs)
        where = "a host build of the same DSConv model"
    return compare_outputs(ref, out, where)
