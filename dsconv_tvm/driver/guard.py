"""The tuning guard: keep a tuned record only if it beats the default schedule of its PrimFunc.

MetaSchedule picks each workload's best record by wall-clock time measured while it tunes; on a
busy machine that choice can be mostly noise, and its search space cannot express everything the
backends' default schedules do (on the Zen 5 VNNI host ResNet-50 tuned ran 9.0 ms, the defaults
6.8 ms).  So after local tuning every workload's best record -- the one ``compile --tuning-db``
would apply (:func:`best_records`, the database's own ``get_top_k``) -- is timed against the
backend's default schedule pass applied to the same PrimFunc (what ``compile`` does without a
record): one thread, CPU time of the calling thread (``time.thread_time``, blind to other
processes), the two interleaved round by round, the median of each.  A record is kept only if it
is faster than :data:`MARGIN` x the default; the records of a workload that loses are removed from
the database (the records file rewritten atomically), so ``compile`` uses the default there.

The timing runs in a child process (``TVM_NUM_THREADS=1`` must be set before TVM starts its thread
pool, and a child can be killed): bounded by :data:`ROUNDS` rounds, :data:`BUDGET_S` seconds per
comparison and a hard timeout for the whole child.  A workload the child did not time (timeout,
build error) is dropped too: only records measured faster than the default stay.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from ..backends.base import backend_for
from ..backends.common import LAYER_ATTR, import_cpu_tensor_intrinsics, is_dsconv
from ..fileio import atomic_write_text
from ..remote.processes import popen_child
from ..target import get_target
from .database import check_database, drop_workload_records, open_user_database, repair_database

MARGIN = 0.95          # a record stays if tuned < MARGIN x default (5 % faster)
ROUNDS = 11            # interleaved rounds per comparison (at most)
BUDGET_S = 10.0        # a comparison stops after this many seconds (at least MIN_ROUNDS rounds)
MIN_ROUNDS = 3
ROUND_CPU_S = 0.02     # each round times enough calls for about this much CPU time
MAX_CALLS = 1000
STARTUP_S = 120.0      # the child's allowance for importing TVM and reading the database
PER_WORKLOAD_S = 60.0  # ... and per workload (compiling the two kernels, BUDGET_S of timing)
REPORT = "guard.json"
_SCHEME_KEYS = {"bits", "block", "mantissa", "unsigned", "act", "padding", "dilation"}


def workload_name(func) -> str:
    """A workload's PrimFunc by name: its DSConv layer, else ``fp32`` and its first blocks (e.g.
    ``fp32 pad_temp/conv2d_nchw/T_add``)."""
    import tvm

    if is_dsconv(func):
        items = dict(re.findall(r"(\w+)=(\[[^\]]*\]|\S+)", str(func.attrs[LAYER_ATTR])))
        shape = [f"{k}={items.pop(k)}" for k in ("in", "out", "kernel", "strides") if k in items]
        fused = [k for k, v in items.items() if k not in _SCHEME_KEYS and v != "0"]   # e.g. residual
        return " ".join(["dsconv", *shape, *(["+" + "+".join(fused)] if fused else [])])
    sch = tvm.s_tir.Schedule(func)
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    return "fp32 " + "/".join(names[:4])


def faster(tuned_ms: float, default_ms: float, margin: float = MARGIN) -> bool:
    return tuned_ms < margin * default_ms


def time_against_default(record, target, backend, rounds: int = ROUNDS,
                         budget_s: float = BUDGET_S) -> tuple[float, float]:
    """(record's ms, default's ms): the record's schedule and the backend's default schedule pass
    on the record's PrimFunc, each call timed in CPU time of this thread, interleaved (the order
    alternating every round), medians.  One thread only if TVM's pool has one (``TVM_NUM_THREADS=1``
    before TVM starts it)."""
    import numpy as np
    import tvm

    # each its own copy of the workload's module: a Schedule on it rewrites its PrimFunc in place
    # (the record's workload -- which ship_schedules then wrote to the archive -- came back scheduled)
    sch = tvm.s_tir.Schedule(_copy(record.workload.mod))
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    with target:
        default = backend.default_schedule_pass()(_copy(record.workload.mod))
    funcs = [tvm.compile(sch.mod, target).mod["main"], tvm.compile(default, target).mod["main"]]
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor((rng.random([int(d) for d in a.shape]) * (15 if "int" in str(a.dtype) else 1))
                               .astype(str(a.dtype))) for a in record.args_info]
    once = []
    for f in funcs:                                  # warm-up, and the calls a round needs
        t0 = time.thread_time()
        f(*args)
        once.append(time.thread_time() - t0)
    calls = max(1, min(MAX_CALLS, math.ceil(ROUND_CPU_S / max(min(once), 1e-7))))
    times: list[list[float]] = [[], []]
    start = time.monotonic()
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            t0 = time.thread_time()
            for _ in range(calls):
                funcs[i](*args)
            times[i].append((time.thread_time() - t0) / calls * 1e3)
        if r + 1 >= MIN_ROUNDS and time.monotonic() - start > budget_s:
            break
    return statistics.median(times[0]), statistics.median(times[1])


def beats_default(record, target, backend, rounds: int = ROUNDS,
                  margin: float = MARGIN) -> tuple[bool, float, float]:
    """(record faster than ``margin`` x the default, its ms, the default's ms)."""
    tuned, default = time_against_default(record, target, backend, rounds)
    return faster(tuned, default, margin), tuned, default


def best_records(work_dir: str):
    """[(workload index in the database file, best record or None)]: the record ``compile`` would
    apply (the database's ``get_top_k``; None where no record ran)."""
    from tvm.s_tir import meta_schedule as ms

    db = open_user_database(work_dir)
    out = []
    for i, line in enumerate(check_database(work_dir).workloads):
        top = db.get_top_k(ms.database.Workload.from_json(json.loads(line)), 1)
        out.append((i, top[0] if top else None))
    return out


def measure_database(work_dir: str, target_name: str, emit) -> None:
    """Time every workload's best record against its default (this process; see the module
    docstring for why the tuning guard runs it in a child): ``emit(dict)`` per workload."""
    target = get_target(target_name).tvm_target()
    backend = backend_for(target)
    import_cpu_tensor_intrinsics()
    backend.prepare()
    for i, record in best_records(work_dir):
        if record is None:
            emit({"workload": i, "error": "no record that ran"})
            continue
        entry = {"workload": i, "name": workload_name(record.workload.mod["main"])}
        try:
            entry["tuned_ms"], entry["default_ms"] = time_against_default(record, target, backend)
        except Exception as exc:  # noqa: BLE001  (a record that does not build: not timed)
            entry["error"] = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
        emit(entry)


def guard_main(argv=None) -> int:
    """The child: ``WORK_DIR TARGET``; one JSON line per workload on stdout."""
    work_dir, target_name = (argv or sys.argv[1:])[:2]
    measure_database(work_dir, target_name, lambda e: print(json.dumps(e), flush=True))
    return 0


def measure_in_child(work_dir: str, target_name: str, timeout_s: float | None = None) -> list[dict]:
    """:func:`measure_database` in a child with one TVM thread; killed after ``timeout_s``
    (default: :data:`STARTUP_S` + :data:`PER_WORKLOAD_S` per workload), keeping what it reported."""
    if timeout_s is None:
        timeout_s = STARTUP_S + PER_WORKLOAD_S * len(check_database(work_dir).workloads)
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TVM_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p))
    log_path = os.path.join(work_dir, "logs", "guard.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as err:
        proc = popen_child([sys.executable, "-c", "import sys; from dsconv_tvm.driver.guard import guard_main; "
                            "sys.exit(guard_main())", work_dir, target_name], sig=signal.SIGKILL,
                           stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        timed_out = False
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            out, _ = proc.communicate()
            out += json.dumps({"timeout": timeout_s}) + "\n"
        finally:
            if proc.poll() is None:          # interrupted: the child goes with us
                proc.kill()
                proc.wait()
    if proc.returncode and not timed_out:
        raise RuntimeError(f"the tuning guard's timing process failed (exit {proc.returncode}; see {log_path}); "
                           f"the database is unchanged (tune --keep-losing skips the guard)")
    entries = []
    for line in out.splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            pass
    return entries


@dataclass
class GuardEntry:
    workload: int
    name: str
    kept: bool
    tuned_ms: float | None = None
    default_ms: float | None = None
    note: str = ""              # why a workload was not timed


@dataclass
class GuardResult:
    work_dir: str
    margin: float
    entries: list[GuardEntry] = field(default_factory=list)
    records_removed: int = 0
    report: str = ""            # WORK_DIR/guard.json

    @property
    def kept(self) -> list[GuardEntry]:
        return [e for e in self.entries if e.kept]

    @property
    def dropped(self) -> list[GuardEntry]:
        return [e for e in self.entries if not e.kept]


def guard_database(work_dir: str, target_name: str, margin: float = MARGIN, measure=None) -> GuardResult:
    """Keep only the records that beat the default (see the module docstring): remove every record
    of a workload whose best record loses or was not timed (the records file rewritten atomically),
    and write the comparison to ``WORK_DIR/guard.json`` (atomically).  ``measure(work_dir,
    target_name)`` -> [{"workload", "name", "tuned_ms", "default_ms"} or an "error"/"timeout"]
    (default :func:`measure_in_child`)."""
    repair_database(work_dir)               # the file's workload indices are the ones measured
    with_records = sorted({json.loads(r)[0] for r in check_database(work_dir).records})
    reported = (measure or measure_in_child)(work_dir, target_name) if with_records else []
    timeout = next((r["timeout"] for r in reported if "timeout" in r), None)
    timed = {r["workload"]: r for r in reported if "workload" in r}
    result = GuardResult(work_dir, margin)
    for i in with_records:
        r = timed.get(i, {})
        tuned, default = r.get("tuned_ms"), r.get("default_ms")
        note = r.get("error") or ("" if r else "not timed" + (f" (timeout {timeout:.0f} s)" if timeout else ""))
        ok = tuned is not None and default is not None and faster(tuned, default, margin)
        result.entries.append(GuardEntry(i, r.get("name", f"workload {i}"), ok, tuned, default, note))
    result.records_removed = drop_workload_records(work_dir, {e.workload for e in result.dropped})
    result.report = os.path.join(work_dir, REPORT)
    atomic_write_text(result.report, json.dumps({
        "margin": margin, "clock": "time.thread_time, TVM_NUM_THREADS=1, interleaved rounds, median",
        "kept": len(result.kept), "dropped": len(result.dropped), "records_removed": result.records_removed,
        "tasks": [asdict(e) for e in result.entries]}, indent=1) + "\n")
    return result


def guard_lines(result: GuardResult) -> list[str]:
    """One line per workload (kept / dropped, tuned vs default ms) and a summary line."""
    lines = []
    for e in result.entries:
        times = (f"tuned {e.tuned_ms:.4f} ms, default {e.default_ms:.4f} ms ({e.tuned_ms / e.default_ms:.2f}x)"
                 if e.tuned_ms is not None and e.default_ms is not None else e.note)
        lines.append(f"guard     {'kept   ' if e.kept else 'dropped'} {e.name}: {times}")
    lines.append(f"guard     {len(result.kept)} of {len(result.entries)} tasks keep their tuned record, "
                 f"{len(result.dropped)} use the default schedule (a record stays only if its median "
                 f"one-thread CPU time < {result.margin:g} x the default's; {result.records_removed} "
                 f"records removed); {result.report}")
    return lines


def _copy(mod):
    """A deep copy of an IRModule (through its JSON form)."""
    import tvm

    return tvm.ir.load_json(tvm.ir.save_json(mod))
