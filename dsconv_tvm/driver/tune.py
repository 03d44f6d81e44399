"""Auto-tuning with MetaSchedule and its XGBoost cost model; tuning databases.

``tune_model`` extracts every TensorIR task of the DSConv-rewritten model (the DSConv layers and the
ops kept in fp32), tunes them with MetaSchedule (evolutionary search guided by XGBoost), measuring
locally or on the boards of one key at a TVM RPC tracker, all of them at once (candidates are built
in parallel and cross-linked into a ``.so`` on the host, so the boards need no compiler; see
:mod:`dsconv_tvm.remote.fleet`).  Every measured record is appended to the JSON database in
the work dir as soon as it is measured, so an interrupted run loses nothing already measured.
After local tuning, :mod:`.guard` keeps a task's records only if its best one beats the default
schedule.

Where ``compile`` finds the records: :mod:`.database`.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from ..backends.base import backend_for
from ..backends.common import import_cpu_tensor_intrinsics, is_dsconv
from ..config import DSConvConfig
from ..errors import DEFER_INTERRUPTS, OutputError, TargetError, check_interrupted
from ..frontend.onnx import load_onnx
from ..remote.fleet import fleet_runner, journal_counts, wait_for_boards
from ..target import get_target
from .compile import build_relax, rewrite_dsconv
from .database import repair_database
from .guard import GuardResult, guard_database


@dataclass
class TuneResult:
    work_dir: str
    tasks: list[str]
    trials: int
    seconds: float
    history: list[tuple[float, int, float]] = field(default_factory=list)   # (seconds, trials, total ms)
    failures: int = 0                 # candidates that failed to build or run
    first_error: str = ""
    boards: dict = field(default_factory=dict)   # "HOST:PORT" -> {"measured", "failed", "busy_s"}
    workers: int = 0                  # boards measuring at once (0: measured here)
    candidates: int = 0               # candidates measured (or failed): one database record each
    guard: GuardResult | None = None  # the tuning guard's comparison (None: not run, see guard_skipped)
    guard_skipped: str = ""           # why the guard did not run


def convergence(history) -> tuple[float, float, int]:
    """(final total ms, seconds and trials until the total first came within 10 % of it) from a
    :class:`TuneResult` history; (nan, nan, 0) without history."""
    if not history:
        return float("nan"), float("nan"), 0
    final = history[-1][2]
    first = next((t, n) for t, n, ms_ in history if ms_ <= 1.1 * final)
    return final, first[0], first[1]


def _progress_callback(weights: list[float], total_trials: int, result: TuneResult, stream, t0: float):
    """The progress bar; its "best total" is the sum over tasks of (best kernel time x calls per
    model run), i.e. the model's estimated kernel time once every task has been measured."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            super().__init__()
            self.trials = 0
            self.best: dict[int, float] = {}

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            check_interrupted()           # a deferred Ctrl-C / SIGTERM ends the tuning here
            self.trials += len(runner_results)
            result.candidates = self.trials
            for b, res in zip(builder_results, runner_results):
                err = b.error_msg or res.error_msg
                if err:
                    result.failures += 1
                    if not result.first_error:
                        result.first_error = str(err).strip()
                    continue
                if res.run_secs:
                    t = sum(float(s) for s in res.run_secs) / len(res.run_secs) * 1e3
                    self.best[task_id] = min(self.best.get(task_id, float("inf")), t)
            total = sum(t * weights[i] for i, t in self.best.items())
            done = len(self.best)
            width = 24
            frac = min(1.0, self.trials / max(total_trials, 1))
            bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
            if done == len(weights):      # a total over every task: comparable between rounds
                result.history.append((time.time() - t0, self.trials, total))
            print(f"tune [{bar}] trials {self.trials}/{total_trials}  tasks measured {done}/{len(weights)}  "
                  f"best total {total:.3f} ms  {time.time() - t0:.0f} s", file=stream, flush=True)

    return Progress()


def _quiet_metaschedule_console() -> None:
    """MetaSchedule prints its task tables on stdout at INFO; keep them in WORK_DIR/logs only.  Its
    console handler takes the level of the "tvm.s_tir.meta_schedule" logger when it is configured,
    and re-configuring fails on handlers without a name (e.g. from an earlier run in this process)."""
    import logging

    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    logger.setLevel(logging.WARNING)
    for handler in list(logger.handlers):
        if handler.get_name() is None:
            logger.removeHandler(handler)


def _flops(mod) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(mod))
    except Exception:  # noqa: BLE001
        return 0.0


def _tune_contexts(extracted, work_dir: str, seed: int, backend):
    """Tune contexts of the extracted tasks: DSConv tasks in the backend's DSConv search space (if
    it has one), every other task in MetaSchedule's generic space."""
    from tvm.s_tir import meta_schedule as ms

    threads = max(1, os.cpu_count() or 1)
    dsconv_space = backend.dsconv_tuning_space()
    contexts, weights = [], []
    for is_ds in (True, False):
        part = [t for t in extracted if is_dsconv(t.dispatched[0]["main"]) == is_ds]
        if part:
            space, strategy = dsconv_space if is_ds and dsconv_space else ("post-order-apply", "evolutionary")
            c, w = ms.relax_integration.extracted_tasks_to_tune_contexts(
                part, work_dir, space=space, strategy=strategy, seed=seed, num_threads=threads)
            contexts += c
            weights += w
    return contexts, weights


def tune_model(model_path: str, target_name: str, work_dir: str, config: DSConvConfig | None = None,
               input_shapes: dict | None = None, trials: int = 64, trials_per_iter: int = 16,
               trials_per_task: int | None = None,
               tracker: str | None = None, key: str | None = None, timeout: float = 60.0,
               seed: int = 0, log=None, stream=None, dsconv: bool = True,
               guard: bool = True) -> TuneResult:
    """Tune the DSConv model for a target; records go to ``work_dir`` (a JSON database).
    ``dsconv=False`` tunes the fp32 model as imported (no rewrite): the baseline with the same tuner.
    ``trials_per_task`` (instead of ``trials``): a budget of that many trials for each task tuned,
    so that models with more distinct layers get more in total (and every task gets measured).
    ``guard``: after local tuning on a CPU, keep only the records that beat the default schedule
    (:mod:`.guard`); skipped with ``tracker`` (the boards' timings cannot be checked here)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    log = log or (lambda msg: None)
    stream = stream or sys.stderr          # the stream of the moment, not of import time
    spec = get_target(target_name)
    spec.check_toolchain()
    if tracker is None and not spec.runs_here():
        raise TargetError(f"target '{spec.name}' does not run on this machine: measure on the board with "
                          f"--tracker HOST:PORT --key KEY (timings under emulation mean nothing)")
    # every free board with the key measures at once; none in time: one error line, before the work
    fleet = wait_for_boards(tracker, key, timeout) if tracker else None
    os.makedirs(work_dir, exist_ok=True)
    if not os.access(work_dir, os.W_OK):
        raise OutputError(f"cannot write the tuning database to {work_dir}")
    # a damaged line (a half-written record of a killed run) would make the whole database
    # unreadable, and a record appended after it would be damaged too: remove it first
    removed = repair_database(work_dir)
    if removed:
        log(f"warning: tuning database {work_dir}: removed {removed} damaged line"
            f"{'s' if removed > 1 else ''} (half-written records of an interrupted run)")
    target = spec.tvm_target()
    backend = backend_for(target)
    import_cpu_tensor_intrinsics()
    backend.prepare()
    loaded = load_onnx(model_path, input_shapes)
    fp32_mod, _ = build_relax(loaded, None)
    mod = fp32_mod
    if dsconv:                              # the target backend's kernels
        mod, _ = rewrite_dsconv(fp32_mod, loaded, config or DSConvConfig(), spec)
    with target:
        mod = tvm.transform.Sequential(backend.legalize_passes())(mod)
    extracted = ms.relax_integration.extract_tasks(mod, target)
    # spend the trials where the time goes: drop tasks below 1 % of the largest task's FLOPs
    flops = [_flops(t.dispatched[0]) * float(t.weight) for t in extracted]
    top = max(flops, default=0.0)
    extracted = [t for t, f in zip(extracted, flops) if f >= 0.01 * top]
    names = [t.task_name for t in extracted]
    log(f"{len(extracted)} tasks ({sum(1 for n in names if 'dsconv' in n)} DSConv): {', '.join(names)}")
    _quiet_metaschedule_console()
    contexts, weights = _tune_contexts(extracted, work_dir, seed, backend)
    if trials_per_task is not None:
        trials = trials_per_task * len(contexts)
        trials_per_iter = min(trials_per_iter, trials_per_task)
    _quiet_metaschedule_console()           # creating the contexts configures the loggers again
    builder = ms.builder.LocalBuilder(timeout_sec=120, **backend.tuning_builder_options(spec))
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20)
    result = TuneResult(work_dir, names, trials, 0.0)
    # one line per candidate measured on a board: which board, measured or failed, seconds
    journal = os.path.join(work_dir, "logs", "boards.jsonl")
    os.makedirs(os.path.dirname(journal), exist_ok=True)
    open(journal, "w").close()                               # this run's candidates only
    if tracker:
        host, port, free, registered = fleet
        result.workers = free
        log(f"measuring on {free} board{'s' if free > 1 else ''} with key '{key}' at once "
            f"({registered} registered at tracker {tracker}); building on {builder.max_workers} "
            f"host process{'es' if builder.max_workers > 1 else ''}")
        runner = fleet_runner(host, port, key, free, timeout, evaluator, journal)
    else:
        runner = ms.runner.LocalRunner(evaluator_config=evaluator)
    database = ms.database.JSONDatabase(work_dir=work_dir)
    t0 = time.time()
    callbacks = [*ms.measure_callback.MeasureCallback.create("default"),
                 _progress_callback([float(w) for w in weights], trials, result, stream, t0)]
    cost_model = ms.cost_model.XGBModel(extractor=ms.feature_extractor.PerStoreFeature(),
                                        adaptive_training=True, num_tuning_cores=os.cpu_count() or 1)
    DEFER_INTERRUPTS.append(True)      # see errors.DEFER_INTERRUPTS; raised in Progress.apply
    try:
        with target:            # the DSConv search space (schedule.py) reads the target
            ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir, max_trials_global=trials,
                          num_trials_per_iter=trials_per_iter, builder=builder, runner=runner,
                          database=database, cost_model=cost_model, measure_callbacks=callbacks,
                          task_scheduler="gradient")
    except Exception:
        check_interrupted()               # the interrupt raised in the callback, through TVM
        raise
    finally:
        DEFER_INTERRUPTS.pop()
        result.seconds = time.time() - t0
        result.boards = journal_counts(journal)
        if tracker:
            runner.pool.shutdown()        # no idle worker process outlives the run
        # every record measured so far stays valid, even when interrupted in the middle of a write
        repair_database(work_dir)
    if not guard:
        result.guard_skipped = "not run (--keep-losing): every record is kept"
    elif tracker:
        result.guard_skipped = ("not run: records measured on the boards are kept as they are (the guard "
                                "times records against the defaults on this host's CPU only)")
    elif not backend.runs_on_host_cpu:
        result.guard_skipped = f"not run: the guard times CPU kernels only (target {spec.name})"
    else:
        log("guard: timing each task's best record against its default schedule (one thread, CPU time)")
        result.guard = guard_database(work_dir, spec.name)
    return result
