"""The Relax pipeline of a DSConv model, one list of passes for every backend:

    backend legalize/fusion -> [tuned schedules from a database] -> default schedules
    -> TVM's dataflow lowering and finalization for the target family
"""

from __future__ import annotations

import contextlib

from .backends.base import backend_for


def relax_pipeline(target, database=None, tuned: list | None = None):
    """The pipeline for ``target``: the schedules of a tuning database applied to the fused TIR,
    then the backend's default schedule rules for the rest.  The names of the functions the
    database scheduled are appended to ``tuned``."""
    import tvm
    from tvm import relax

    backend = backend_for(target)
    backend.prepare()
    pipe = backend.pipeline_module()

    @tvm.transform.module_pass(opt_level=0, name="RecordTunedFunctions")
    def _record(mod, _ctx):
        if tuned is not None:
            tuned.extend(gv.name_hint for gv, f in mod.functions_items()
                         if isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get("tirx.is_scheduled", False))
        return mod

    @tvm.transform.module_pass(opt_level=0, name="DSConvPipeline")
    def _pipeline(mod, _ctx):
        with target, (database if database is not None else contextlib.nullcontext()):
            apply_db = [relax.transform.MetaScheduleApplyDatabase(enable_warning=False), _record] \
                if database is not None else []
            seq = tvm.transform.Sequential(
                backend.legalize_passes()
                + apply_db
                + [backend.default_schedule_pass()]
                + pipe.dataflow_lower_passes(target)
                + pipe.finalize_passes(target))
            mod = seq(mod)
        return mod

    return _pipeline
