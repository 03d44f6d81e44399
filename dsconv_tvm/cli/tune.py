"""``dsconv-tvm tune``: MetaSchedule + XGBoost tuning of a model (:func:`dsconv_tvm.driver.tune.tune_model`)."""

from __future__ import annotations

import os
import sys

from ..errors import ConfigError
from .common import EXIT_OK, add_scheme_options, config_from_args, log


def add_parser(sub) -> None:
    tu = sub.add_parser("tune", help="auto-tune a model for a target (MetaSchedule + XGBoost)",
                        description="Tune every TensorIR task of the DSConv model (DSConv layers and "
                                    "the ops kept in fp32) with MetaSchedule's evolutionary search and "
                                    "XGBoost cost model. Records are appended to the database in "
                                    "--work-dir as they are measured (an interrupted run keeps them); "
                                    "compile with --tuning-db WORK_DIR to use them. After local tuning "
                                    "each task's best record is timed against the default schedule "
                                    "(one thread, CPU time) and kept only if >= 5 % faster "
                                    "(WORK_DIR/guard.json; --keep-losing keeps every record).")
    tu.add_argument("model", nargs="?", help="the ONNX model file")
    tu.add_argument("--repair-db", default=None, metavar="DIR",
                    help="instead of tuning: remove the damaged lines (a half-written record of a "
                         "killed run) from the tuning database DIR, keeping every good record")
    tu.add_argument("--target", "-t", default="x86", help="target name (default x86 = this host)")
    tu.add_argument("--trials", type=int, default=64, help="measurement trials in total (default 64)")
    tu.add_argument("--trials-per-task", type=int, default=None, metavar="K",
                    help="instead of --trials: K trials for each task tuned (a budget that grows "
                         "with the number of distinct layers; about 8-16 is enough for DSConv)")
    tu.add_argument("--trials-per-iter", type=int, default=16, help="candidates per search round")
    tu.add_argument("--work-dir", default="tuning", help="database directory (default ./tuning)")
    tu.add_argument("--input-shapes", default=None, help='static input shapes, e.g. "input:[1,1,28,28]"')
    tu.add_argument("--tracker", default=None, metavar="HOST:PORT",
                    help="measure on the boards registered at this TVM RPC tracker")
    tu.add_argument("--key", default=None,
                    help="the boards' key at the tracker: every free board with it measures "
                         "candidates at once (one worker per board)")
    tu.add_argument("--timeout", type=float, default=120,
                    help="seconds to wait for a free board, and the RPC session timeout of each "
                         "candidate (default 120)")
    tu.add_argument("--fp32", action="store_true",
                    help="tune the fp32 model as imported (no DSConv rewrite): the baseline, tuned "
                         "with the same tuner; build it with tools/benchmark.py")
    tu.add_argument("--keep-losing", action="store_true",
                    help="skip the guard: keep the best record of every task even where it is not "
                         ">= 5 %% faster than the default schedule (the guard runs after local "
                         "tuning only; with --tracker it never runs)")
    add_scheme_options(tu)
    tu.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    from ..driver.database import check_database, is_database_dir, repair_database
    from ..driver.guard import guard_lines
    from ..driver.tune import convergence, tune_model
    from ..frontend.onnx import parse_input_shapes

    if args.repair_db:
        if not is_database_dir(args.repair_db):
            raise ConfigError(f"--repair-db {args.repair_db}: not a tuning database (no "
                              f"database_workload.json and database_tuning_record.json)")
        removed = repair_database(args.repair_db)
        kept = len(check_database(args.repair_db).records)
        print(f"database  {args.repair_db}: {kept} records kept, {removed} damaged line"
              f"{'' if removed == 1 else 's'} removed")
        return EXIT_OK
    if not args.model:
        raise ConfigError("tune needs the ONNX model (or --repair-db DIR)")
    args.interrupt_note = lambda: (f"the records measured so far are kept in {args.work_dir} "
                                   f"(compile with --tuning-db {args.work_dir})")

    if args.trials < 1:
        raise ConfigError(f"--trials {args.trials}: must be >= 1")
    if args.trials_per_task is not None and args.trials_per_task < 1:
        raise ConfigError(f"--trials-per-task {args.trials_per_task}: must be >= 1")
    if args.tracker and not args.key:
        raise ConfigError("--tracker needs --key (the board's key at the tracker)")
    if args.tracker and ":" not in args.tracker:
        raise ConfigError(f"--tracker {args.tracker!r}: expected HOST:PORT")
    if args.key and not args.tracker:
        raise ConfigError("--key needs --tracker HOST:PORT")
    if args.timeout <= 0:
        raise ConfigError(f"--timeout {args.timeout:g}: must be > 0")
    result = tune_model(args.model, args.target, args.work_dir, config_from_args(args),
                        parse_input_shapes(args.input_shapes), trials=args.trials,
                        trials_per_iter=args.trials_per_iter, trials_per_task=args.trials_per_task,
                        tracker=args.tracker, key=args.key,
                        timeout=args.timeout, log=log,
                        dsconv=not args.fp32, guard=not args.keep_losing)
    if result.failures:
        lines = [l for l in result.first_error.splitlines() if l.strip()]
        print(f"warning: {result.failures} of {result.trials} candidates failed to build or run; first error: "
              f"{(lines[-1] if lines else '?')[:300]}", file=sys.stderr)
    for board, c in sorted(result.boards.items()):
        print(f"board     {board}: {c['measured']} candidates measured, {c['failed']} failed, "
              f"{c['busy_s']:.0f} s in sessions of the run's {result.seconds:.0f} s")
    final, reach, n10 = convergence(result.history)
    print(f"tuned {len(result.tasks)} tasks with {result.trials} trials in {result.seconds:.0f} s; best total "
          f"{final:.3f} ms (the tasks' best kernels x calls per run), within 10 % of it after {n10} trials / "
          f"{reach:.0f} s")
    for line in guard_lines(result.guard) if result.guard else [f"guard     {result.guard_skipped}"]:
        print(line)
    print(f"database  {os.path.abspath(result.work_dir)}  (compile with --tuning-db {result.work_dir})")
    return EXIT_OK
