#!/usr/bin/env python3
"""The benchmark of issue 3: DSConv W4 against ONNX Runtime (fp32, static int8) and TVM fp32.

For every model, in one process tree, on the same cores (the process pins itself, children inherit),
batch 1:

* ``ort_fp32``   ONNX Runtime, the fp32 model (``intra_op_num_threads`` = --threads)
* ``ort_int8``   ONNX Runtime, static int8: QDQ, per-channel s8 weights, u8 activations calibrated
                 on the benchmark images themselves
* ``tvm_fp32``   TVM, the fp32 model, tuned with MetaSchedule + XGBoost with --trials trials (or --trials-per-task K per task)
* ``dsconv_b32`` / ``dsconv_b64``  DSConv W4 m=8, B=32 / 64, tuned with the same budget
                 (``TVM_NUM_THREADS`` = --threads)

Every variant is timed in its own child process (no thread pool of one runtime disturbs another):
a warm-up, then --repeat measurements of the mean of --number calls; median, min and max are
reported.  Outputs on the --images benchmark images are compared with ORT fp32 (argmax agreement,
relative L2 error; reported, not asserted: the light_* models have random weights).  Weight bytes:
ONNX initializers for ORT / TVM fp32 (after BN folding for TVM), packed 4-bit weights + KDS scales +
every tensor kept fp32 for DSConv.  A per-layer report times the largest DSConv layers standalone.

Writes ``<out-dir>/<name>.{json,csv,md,png}``.  Tuning databases are cached in --work-dir (default
``~/.cache/dsconv-tvm/bench/tune``), keyed by model, variant and trials: a rerun does not retune.

Usage:  python tools/benchmark.py [--models resnet50 ...] [--trials N | --trials-per-task K | --no-tune] [...]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
for _p in (REPO, TOOLS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_models  # noqa: E402
from dsconv_tvm.fileio import atomic_write_text  # noqa: E402
import bench_peak  # noqa: E402

VARIANTS = ("ort_fp32", "ort_int8", "tvm_fp32", "dsconv_b32", "dsconv_b64")
LABELS = {"ort_fp32": "ORT fp32", "ort_int8": "ORT int8 (QDQ per-channel)", "tvm_fp32": "TVM fp32",
          "dsconv_b32": "DSConv W4 B=32 m=8", "dsconv_b64": "DSConv W4 B=64 m=8"}
DEFAULT_MODELS = ("resnet50", "vgg19", "googlenet", "densenet121", "alexnet", "mobilenet_v2",
                  "resnet20", "vgg_small", "mobilenet_small")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dsconv_config(variant: str):
    """W4 m8 with the variant's block; fully connected layers as DSConv too unless --dense keep
    (the setting travels to the timing children in DSCONV_BENCH_DENSE)."""
    from dsconv_tvm.config import DSConvConfig

    return DSConvConfig(bits=4, block=int(variant.rsplit("_b", 1)[1]), mantissa=8,
                        dense=os.environ.get("DSCONV_BENCH_DENSE", "dsconv"))


# ------------------------------------------------------------------------------------------------
# timing: one child process per variant
# ------------------------------------------------------------------------------------------------
def _stats(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "times_ms": times}


def _plan(t1_ms: float, spec: dict) -> tuple[int, int, int]:
    """(warm-up calls, repeat, number) within the variant's time budget: as asked when it fits,
    else number 1 and as many repeats as fit (at least 5) -- slow untuned models take seconds a call."""
    warmup, repeat, number = spec["warmup"], spec["repeat"], spec["number"]
    budget_ms = 1e3 * spec.get("budget_s", float("inf"))
    if t1_ms * (warmup + repeat * number) <= budget_ms:
        return warmup, repeat, number
    return min(warmup, 1), max(5, min(repeat, int(budget_ms / max(t1_ms, 1e-6)))), 1


def time_child(spec: dict) -> dict:
    """Runs in the child: outputs on every image, then warm-up and the timed runs."""
    x = np.load(spec["images"])
    x1 = np.ascontiguousarray(x[:1])
    if spec["kind"] == "ort":
        sess = bench_models.ort_session(spec["path"], spec["threads"])
        name = sess.get_inputs()[0].name

        def call(inp):
            return sess.run(None, {name: inp})[0]
    else:
        import tvm

        from dsconv_tvm.execute.runner import load_library

        vm, _shape = load_library(spec["path"])

        def call(inp):
            return vm["main"](tvm.runtime.tensor(inp)).numpy()
    t0 = time.perf_counter()
    outs = [call(x1)]
    t1_ms = (time.perf_counter() - t0) * 1e3
    outs += [call(np.ascontiguousarray(x[i:i + 1])) for i in range(1, len(x))]
    warmup, repeat, number = _plan(t1_ms, spec)
    for _ in range(warmup):
        call(x1)
    if spec["kind"] == "ort":
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(number):
                call(x1)
            times.append((time.perf_counter() - t0) * 1e3 / number)
    else:
        from dsconv_tvm.execute.runner import time_main

        _, times = time_main(vm, x1, repeat, number)
    np.save(spec["outputs"], np.concatenate(outs).astype(np.float32))
    return {**_stats(times), "warmup": warmup, "repeat": repeat, "number": number}


def time_variant(kind: str, path: str, images_npy: str, args, work: str, tag: str) -> tuple[dict, np.ndarray]:
    spec = {"kind": kind, "path": path, "images": images_npy, "warmup": args.warmup,
            "repeat": args.repeat, "number": args.number, "threads": args.threads,
            "budget_s": args.budget,
            "outputs": os.path.join(work, f"{tag}_out.npy")}
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--time-child", json.dumps(spec)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        tail = [ln for ln in res.stderr.splitlines() if ln.strip()][-3:]
        raise RuntimeError(f"timing {tag} failed: {' | '.join(tail)}")
    return json.loads(res.stdout.strip().splitlines()[-1]), np.load(spec["outputs"])


# ------------------------------------------------------------------------------------------------
# tuning (cached) and building
# ------------------------------------------------------------------------------------------------
def tune_cached(model: bench_models.BenchModel, variant: str, args) -> tuple[str | None, dict]:
    """(database dir or None, tuning info).  Tunes once per (model, variant, trials, target)."""
    from dsconv_tvm.driver.tune import convergence, tune_model
    from dsconv_tvm.driver.database import is_database_dir

    if args.no_tune or args.trials <= 0:
        return None, {"tuned": False}
    work = tune_dir(args, model.name, variant)
    marker = os.path.join(work, "bench_tune.json")
    if os.path.isfile(marker) and is_database_dir(work):
        with open(marker) as f:
            return work, json.load(f)
    log(f"{model.name} {variant}: tuning with {budget_text(args.trials, args.trials_per_task)} -> {work}")
    dsconv = variant.startswith("dsconv")
    res = tune_model(model.path, args.target, work, dsconv_config(variant) if dsconv else None,
                     trials=args.trials, trials_per_iter=args.trials_per_iter,
                     trials_per_task=args.trials_per_task, dsconv=dsconv,
                     log=lambda m: log(f"  {m}"))
    final, reach_s, reach_n = convergence(res.history)
    done = bool(res.history)          # a history exists once every task has been measured
    info = {"tuned": True, "trials": res.trials, "tasks": len(res.tasks), "seconds": round(res.seconds, 1),
            "failures": res.failures, "all_tasks_measured": done, "final_total_ms": final if done else None,
            "within10_seconds": round(reach_s, 1) if done else None, "within10_trials": reach_n if done else None,
            "history": res.history}
    with open(marker + ".tmp", "w") as f:
        json.dump(info, f)
    os.replace(marker + ".tmp", marker)
    return work, info


def tune_dir(args, model_name: str, variant: str) -> str:
    budget = f"k{args.trials_per_task}" if args.trials_per_task else f"t{args.trials}"
    return os.path.join(args.work_dir, args.target, model_name, f"{variant}_{budget}")


def budget_text(trials: int, trials_per_task: int | None) -> str:
    return f"{trials_per_task} trials per task" if trials_per_task else f"{trials} trials per model"


def build_tvm_fp32(model_path: str, target: str, db_dir: str | None, out: str) -> dict:
    """The fp32 model through the same pipeline (database: the tuned one, else shipped/default)."""
    from dsconv_tvm.driver.compile import build, build_relax
    from dsconv_tvm.frontend.onnx import load_onnx
    from dsconv_tvm.target import get_target
    from dsconv_tvm.driver.database import find_database

    t0 = time.time()
    spec = get_target(target)
    loaded = load_onnx(model_path)
    database, where = find_database(spec.name, db_dir)
    tuned: list[str] = []
    spec.export_library(build(build_relax(loaded, None)[0], spec, database, tuned), out)
    from onnx import numpy_helper
    weight_bytes = int(sum(numpy_helper.to_array(i).nbytes for i in loaded.model.graph.initializer))
    return {"build_seconds": round(time.time() - t0, 1), "schedules": where, "tuned_functions": len(tuned),
            "weight_bytes": weight_bytes}


def build_dsconv(model_path: str, target: str, variant: str, db_dir: str | None, out: str):
    from dsconv_tvm.driver.compile import compile_model

    t0 = time.time()
    result = compile_model(model_path, target, out, dsconv_config(variant), check=False, tuning_db=db_dir)
    return result, time.time() - t0


def dsconv_weight_bytes(result, fp32_total: int) -> dict:
    """Deployed bytes: every fp32 tensor of the (BN-folded) model, with the converted convs' weights
    replaced by their packed 4-bit weights + KDS scales."""
    conv_fp32 = sum(l.fp32_bytes for l in result.report.converted)
    conv_dep = sum(l.deployed_bytes for l in result.report.converted)
    return {"weight_bytes": int(fp32_total - conv_fp32 + conv_dep),
            "converted_fp32_bytes": int(conv_fp32), "converted_deployed_bytes": int(conv_dep),
            "layers_converted": len(result.report.converted), "layers_kept": len(result.report.kept)}


# ------------------------------------------------------------------------------------------------
# per-layer report
# ------------------------------------------------------------------------------------------------
def standalone_layer_module(report_layer, spec):
    """A Relax module whose main calls the converted layer's own PrimFunc once, as the model does: the
    :class:`DSConvLayer` the rewrite built (from the compile report), the target backend's kernel and
    the layer's own packed weights, scales and bias; a residual, if fused, is a constant tensor."""
    from tvm import relax

    from dsconv_tvm.backends.base import backend_for
    from dsconv_tvm.driver.compile import with_input_shapes
    from dsconv_tvm.frontend.onnx import LoadedModel

    layer = report_layer.layer
    backend = backend_for(spec.tvm_target())
    qw = report_layer.quantized
    params = backend.layer_params(layer, qw.q, qw.xi, report_layer.bias)
    for op in layer.prologue:        # an absorbed BN before the conv: here the identity
        params.append(np.full(layer.in_shape[1], op in ("divide", "multiply"), np.float32))
    bb = relax.BlockBuilder()
    gv = bb.add_func(backend.primfunc(layer), "dsconv_layer")
    x = relax.Var("x", relax.TensorType(list(layer.in_shape), "float32"))
    if layer.has_residual:
        params.append(np.random.default_rng(2).standard_normal(layer.out_shape).astype(np.float32))
    with bb.function("main", [x]):
        cargs = [x, *[relax.const(a) for a in params]]
        with bb.dataflow():
            y = bb.emit_output(relax.call_tir(gv, cargs, relax.TensorType(list(layer.out_shape), "float32")))
        bb.emit_func_output(y)
    fake = LoadedModel("layer", None, {"x": list(layer.in_shape)}, {"x": "float32"}, [], [])
    return with_input_shapes(bb.get(), fake)


def layer_report(model_name: str, variant: str, result, db_dir: str | None, args, peak: dict,
                 work: str) -> list[dict]:
    """Time the ``args.layers`` largest (by MACs) distinct DSConv layers standalone."""
    from dsconv_tvm.driver.compile import build
    from dsconv_tvm.target import get_target
    from dsconv_tvm.driver.database import find_database

    spec = get_target(args.target)
    seen, rows = set(), []
    layers = sorted(result.report.converted, key=lambda l: -l.layer.macs)
    for rl in layers:
        layer = rl.layer
        if layer in seen:
            continue
        seen.add(layer)
        if len(rows) >= args.layers:
            break
        database, _ = find_database(spec.name, db_dir)
        tuned: list[str] = []
        so = os.path.join(work, f"{model_name}_{variant}_layer{len(rows)}.so")
        spec.export_library(build(standalone_layer_module(rl, spec), spec, database, tuned), so)
        x = np.random.default_rng(1).random(layer.in_shape).astype(np.float32)
        npy = os.path.join(work, "layer_x.npy")
        np.save(npy, x)
        t, _ = time_variant("tvm", so, npy, args, work, f"layer{len(rows)}")
        macs = layer.macs
        gops = 2 * macs / (t["median_ms"] * 1e-3) / 1e9
        rows.append({"model": model_name, "variant": variant, "layer": rl.name,
                     "in_shape": list(layer.in_shape), "out_shape": list(layer.out_shape),
                     "kernel": list(layer.kernel), "strides": list(layer.geom.strides),
                     "macs": macs, "median_ms": t["median_ms"], "min_ms": t["min_ms"], "max_ms": t["max_ms"],
                     "int_gops": gops, "fraction_of_peak": gops / peak["peak_gops"],
                     "tuned": bool(tuned), "goal_ge64": layer.in_shape[1] >= 64})
        log(f"  layer {rl.name} {layer.in_shape}->{layer.out_shape} k{layer.kernel}: "
            f"{t['median_ms']:.3f} ms, {gops:.1f} GOP/s = {100 * gops / peak['peak_gops']:.1f} % of peak")
    return rows


# ------------------------------------------------------------------------------------------------
# one model
# ------------------------------------------------------------------------------------------------
def agreement(ref: np.ndarray, out: np.ndarray) -> dict:
    from dsconv_tvm.execute.compare import compare_outputs

    return compare_outputs(ref, out).to_dict()


def bench_model(name: str, args, peak: dict, work: str) -> tuple[dict, list[dict]]:
    model = bench_models.prepare(name, args.images, args.seed, log)
    if model is None:
        return {"model": name, "skipped": True}, []
    images_npy = os.path.join(work, f"{model.name}_images.npy")
    np.save(images_npy, model.images)
    row = {"model": model.name, "source": model.source, "input_shape": list(model.images.shape[1:]),
           "images": len(model.images), "variants": {}}
    fp32_bytes = bench_models.initializer_bytes(model.path)
    outs = {}
    layers: list[dict] = []
    for variant in args.variants:
        v: dict = {"label": LABELS[variant]}
        try:
            if variant == "ort_fp32":
                path, kind = model.path, "ort"
                v["weight_bytes"] = fp32_bytes
            elif variant == "ort_int8":
                path, kind = int8_model(model, args), "ort"
                v["weight_bytes"] = bench_models.initializer_bytes(path)
            elif variant == "tvm_fp32":
                db, v["tuning"] = tune_cached(model, variant, args)
                path, kind = os.path.join(work, f"{model.name}_{variant}.so"), "tvm"
                v.update(build_tvm_fp32(model.path, args.target, db, path))
            else:
                db, v["tuning"] = tune_cached(model, variant, args)
                path, kind = os.path.join(work, f"{model.name}_{variant}.so"), "tvm"
                result, secs = build_dsconv(model.path, args.target, variant, db, path)
                folded_total = build_fp32_total(model.path)
                v.update(dsconv_weight_bytes(result, folded_total))
                v.update({"build_seconds": round(secs, 1), "schedules": result.schedules,
                          "tuned_functions": len(result.tuned_functions)})
                if args.layers and name in args.layer_models:
                    layers += layer_report(model.name, variant, result, db, args, peak, work)
            log(f"{model.name} {variant}: timing")
            v["latency"], outs[variant] = time_variant(kind, path, images_npy, args, work,
                                                       f"{model.name}_{variant}")
            log(f"{model.name} {variant}: median {v['latency']['median_ms']:.3f} ms "
                f"(min {v['latency']['min_ms']:.3f}, max {v['latency']['max_ms']:.3f})")
        except Exception as exc:  # noqa: BLE001  (one variant failing must not lose the others)
            v["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            log(f"{model.name} {variant}: FAILED {v['error']}")
        row["variants"][variant] = v
    ref = outs.get("ort_fp32")
    for variant, v in row["variants"].items():
        if ref is not None and variant in outs and variant != "ort_fp32":
            v["vs_ort_fp32"] = agreement(ref, outs[variant])
    add_ratios(row, fp32_bytes)
    return row, layers


def build_fp32_total(model_path: str) -> int:
    """Bytes of every initializer of the BN-folded model (what the compiler sees)."""
    from onnx import numpy_helper

    from dsconv_tvm.frontend.onnx import load_onnx

    loaded = load_onnx(model_path)
    return int(sum(numpy_helper.to_array(i).nbytes for i in loaded.model.graph.initializer))


def int8_model(model: bench_models.BenchModel, args) -> str:
    import hashlib

    key = hashlib.sha256(model.images.tobytes()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(model.path))[0]
    path = os.path.join(bench_models.bench_cache(), f"{stem}_int8_qdq_pc_{key}.onnx")
    if not os.path.exists(path):
        log(f"{model.name}: ORT static int8 quantization (QDQ, per-channel) on {len(model.images)} images")
        bench_models.quantize_int8(model.path, path, model.images)
    return path


def add_ratios(row: dict, fp32_bytes: int) -> None:
    """Latency ratios to ORT fp32 / ORT int8 / TVM fp32 and weight bytes ratio to fp32."""
    def med(variant):
        v = row["variants"].get(variant, {})
        return v.get("latency", {}).get("median_ms")

    for variant, v in row["variants"].items():
        m = med(variant)
        if m is None:
            continue
        for base in ("ort_fp32", "ort_int8", "tvm_fp32"):
            b = med(base)
            v[f"ratio_to_{base}"] = m / b if b else None
        if v.get("weight_bytes"):
            v["weight_ratio_to_fp32"] = v["weight_bytes"] / fp32_bytes


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
CSV_FIELDS = ("model", "variant", "median_ms", "min_ms", "max_ms", "ratio_to_ort_fp32", "ratio_to_ort_int8",
              "ratio_to_tvm_fp32", "weight_bytes", "weight_ratio_to_fp32", "argmax_agree", "rel_l2",
              "tuning_trials", "tuning_seconds", "within10_trials", "within10_seconds", "schedules", "error")


def flat_rows(results: dict) -> list[dict]:
    rows = []
    for m in results["models"]:
        for variant, v in m.get("variants", {}).items():
            lat = v.get("latency", {})
            tun = v.get("tuning", {}) or {}
            agr = v.get("vs_ort_fp32", {})
            rows.append({"model": m["model"], "variant": variant, "median_ms": lat.get("median_ms"),
                         "min_ms": lat.get("min_ms"), "max_ms": lat.get("max_ms"),
                         "ratio_to_ort_fp32": v.get("ratio_to_ort_fp32"),
                         "ratio_to_ort_int8": v.get("ratio_to_ort_int8"),
                         "ratio_to_tvm_fp32": v.get("ratio_to_tvm_fp32"),
                         "weight_bytes": v.get("weight_bytes"), "weight_ratio_to_fp32": v.get("weight_ratio_to_fp32"),
                         "argmax_agree": agr.get("argmax_agree"), "rel_l2": agr.get("rel_l2"),
                         "tuning_trials": tun.get("trials"), "tuning_seconds": tun.get("seconds"),
                         "within10_trials": tun.get("within10_trials"),
                         "within10_seconds": tun.get("within10_seconds"),
                         "schedules": v.get("schedules"), "error": v.get("error")})
    return rows


def _f(x, fmt=".3f", none="-"):
    return none if x is None else format(x, fmt)


def _mb(n):
    return "-" if n is None else f"{n / 2**20:.2f} MB"


def markdown(results: dict) -> str:
    out = io.StringIO()
    mach = results["machine"]
    peak = results["peak"]
    out.write(f"Machine: {mach['cpu']} ({mach['llvm_cpu']}), {results['threads']} threads pinned to cores "
              f"{results['cores']}; target {results['target']}; batch 1; {results['repeat']} x "
              f"{results['number']} timed calls after {results['warmup']} warm-up calls; load average (1, 5, 15 min) "
              f"before / after: {results.get('load_average', {}).get('before', '?')} / "
              f"{results.get('load_average', {}).get('after', '?')} (variants slower than "
              f"the {results.get('budget', '?')} s budget: number 1 and fewer repeats, see the JSON); "
              f"tuning budget: {budget_text(results['trials'], results.get('trials_per_task')) if not results['no_tune'] else 'none (--no-tune)'}"
              f" for each TVM variant.\n\n")
    out.write("| model | variant | median ms (min-max) | / ORT fp32 | / ORT int8 | / TVM fp32 | weights | "
              "/ fp32 | argmax agree | rel. L2 vs ORT fp32 |\n|---|---|---|---|---|---|---|---|---|---|\n")
    for r in flat_rows(results):
        lat = "failed: " + r["error"] if r["error"] else \
            f"{_f(r['median_ms'])} ({_f(r['min_ms'])}-{_f(r['max_ms'])})"
        out.write(f"| {r['model']} | {LABELS[r['variant']]} | {lat} | {_f(r['ratio_to_ort_fp32'], '.2f')} | "
                  f"{_f(r['ratio_to_ort_int8'], '.2f')} | {_f(r['ratio_to_tvm_fp32'], '.2f')} | "
                  f"{_mb(r['weight_bytes'])} | {_f(r['weight_ratio_to_fp32'], '.3f')} | "
                  f"{_f(r['argmax_agree'], '.2f')} | {_f(r['rel_l2'], '.3g')} |\n")
    skipped = [m["model"] for m in results["models"] if m.get("skipped")]
    if skipped:
        out.write(f"\nSkipped: {', '.join(skipped)}.\n")
    tuned = [r for r in flat_rows(results) if r["tuning_trials"]]
    if tuned:
        out.write("\nTuning cost (MetaSchedule + XGBoost; 'within 10 %' = first point where the sum of the "
                  "tasks' best kernel times came within 10 % of its final value):\n\n"
                  "| model | variant | trials | wall s | trials to within 10 % | s to within 10 % |\n"
                  "|---|---|---|---|---|---|\n")
        for r in tuned:
            out.write(f"| {r['model']} | {LABELS[r['variant']]} | {r['tuning_trials']} | {_f(r['tuning_seconds'], '.0f')} | "
                      f"{_f(r['within10_trials'], 'd')} | {_f(r['within10_seconds'], '.0f')} |\n")
    out.write(f"\n{peak_text(peak)}\n")
    out.write("\n| goal | measured | met |\n|---|---|---|\n")
    for g in goals(results):
        met = "not measured" if g["met"] is None else ("yes" if g["met"] else "NO")
        out.write(f"| {g['goal']} | {_f(g['measured'], '.3f')} | {met} |\n")
    if results.get("layers"):
        out.write("\n| model | variant | layer | input | output | kernel | ms | integer GOP/s | % of peak | "
                  ">= 64 in ch |\n|---|---|---|---|---|---|---|---|---|---|\n")
        for l in results["layers"]:
            out.write(f"| {l['model']} | {l['variant']} | {l['layer']} | {'x'.join(map(str, l['in_shape']))} | "
                      f"{'x'.join(map(str, l['out_shape']))} | {l['kernel'][0]}x{l['kernel'][1]}/{l['strides'][0]} | "
                      f"{l['median_ms']:.3f} | {l['int_gops']:.1f} | {100 * l['fraction_of_peak']:.1f} | "
                      f"{'yes' if l.get('goal_ge64') else 'no'} |\n")
    return out.getvalue()


def peak_text(peak: dict) -> str:
    """How the int8 peak was obtained (every "% of peak" is relative to it)."""
    others = ", ".join(f"{name} {2 * m['gmacs']:.0f}" for name, m in peak.get("measured", {}).items()
                       if name != peak["isa"])
    return (f"int8 peak: {peak['peak_gops']:.0f} GOP/s, measured by tools/bench_peak.py on {peak['cores']} threads "
            f"with the kernels' own dot-product sequence ({peak['isa']}: {peak['sequence']}): "
            f"{peak['macs_per_cycle_per_core']:.1f} MACs/cycle/core at the measured {peak['clock_hz'] / 1e9:.2f} GHz"
            + (f" (other sequences, GOP/s: {others})" if others else "") + ".")


def goals(results: dict) -> list[dict]:
    """The issue's goals, checked on this run's numbers (None where the run lacks the measurement)."""
    out = []
    rn = next((m for m in results["models"] if m["model"] == "resnet50" and not m.get("skipped")), None)
    for variant in ("dsconv_b32", "dsconv_b64"):
        v = (rn or {}).get("variants", {}).get(variant, {})
        for base, limit in (("ort_fp32", 0.4), ("ort_int8", 0.9)):
            r = v.get(f"ratio_to_{base}")
            out.append({"goal": f"ResNet-50 {LABELS[variant]} latency <= {limit} x {LABELS[base]}",
                        "measured": r, "met": None if r is None else r <= limit})
    w = (rn or {}).get("variants", {}).get("dsconv_b64", {}).get("weight_ratio_to_fp32")
    out.append({"goal": "ResNet-50 deployed weight bytes at W4 B=64 <= 0.16 x fp32", "measured": w,
                "met": None if w is None else w <= 0.16})
    layers = [l for l in results.get("layers", []) if l.get("goal_ge64")]
    worst = min((l["fraction_of_peak"] for l in layers), default=None)
    out.append({"goal": "DSConv layers with >= 64 input channels (per-layer report): >= 50 % of the measured "
                        "int8 peak (the worst such layer)", "measured": worst,
                "met": None if worst is None else worst >= 0.5})
    return out


def write_csv(results: dict, path: str) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for r in flat_rows(results):
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())


def plot(results: dict, path: str) -> bool:
    """Bar chart of latency relative to ORT fp32 (lower is better), one group per model."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install '.[bench]'): no chart")
        return False
    models = [m for m in results["models"] if not m.get("skipped")]
    variants = [v for v in VARIANTS if any(v in m["variants"] for m in models)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(models) + 2), 4.5))
    width = 0.8 / max(len(variants), 1)
    for k, variant in enumerate(variants):
        vals = [m["variants"].get(variant, {}).get("ratio_to_ort_fp32") or np.nan for m in models]
        ax.bar(np.arange(len(models)) + (k - (len(variants) - 1) / 2) * width, vals, width,
               label=LABELS[variant])
    ax.set_yscale("log")                       # ratios span orders of magnitude
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(models)))
    ax.set_xticklabels([m["model"] for m in models], rotation=20)
    ax.set_ylabel("latency / ORT fp32 latency (lower is better)")
    ax.set_title(f"batch 1, {results['threads']} threads, {results['machine']['cpu']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    from dsconv_tvm.fileio import atomic_write
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return True


def _without_home(obj):
    """``obj`` with the user's home directory written as ``~`` in every string (the results files
    are committed: no path of the machine that ran them)."""
    home = os.path.expanduser("~").rstrip(os.sep) + os.sep
    if isinstance(obj, str):
        return obj.replace(home, "~" + os.sep)
    if isinstance(obj, dict):
        return {k: _without_home(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_without_home(v) for v in obj]
    return obj


def write_outputs(results: dict, out_dir: str, name: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    results = _without_home(results)
    base = os.path.join(out_dir, name)
    atomic_write_text(base + ".json", json.dumps(results, indent=1, default=float))
    write_csv(results, base + ".csv")
    atomic_write_text(base + ".md", markdown(results))
    written = [base + ".json", base + ".csv", base + ".md"]
    if plot(results, base + ".png"):
        written.append(base + ".png")
    return written


# ------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    from tvm.target import codegen

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    import onnxruntime
    import tvm
    return {"cpu": cpu, "llvm_cpu": str(codegen.llvm_get_system_cpu()), "cpus": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "tvm": tvm.__version__}


def ship_schedules(results: dict, args) -> str:
    """Merge the best record per workload of every tuned database of this run into the shipped
    archive of the target's kernels, schedules/<key>/schedules.zip (what ``compile`` uses by default;
    ``key`` e.g. x86-vnni for --target x86 on a VNNI host)."""
    from tvm.s_tir import meta_schedule as ms

    from dsconv_tvm.driver.database import shipped_schedules_key
    from dsconv_tvm.driver.shipped import ARCHIVE, write_shipped

    dest = os.path.join(REPO, "schedules", shipped_schedules_key(args.target), ARCHIVE)
    dbs = []
    for m in results["models"]:
        for variant, v in m.get("variants", {}).items():
            tun = v.get("tuning") or {}
            if not tun.get("tuned") or not variant.startswith("dsconv") and not args.ship_fp32:
                continue
            dbs.append(ms.database.JSONDatabase(work_dir=tune_dir(args, m["model"], variant), allow_missing=False))
    n = write_shipped(dest, dbs)
    log(f"merged {len(dbs)} tuning databases into {dest} ({n} workloads)")
    return dest


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                    help=f"models (default: all): {', '.join(bench_models.ALL_MODELS)} or .onnx paths")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--target", default="x86-avx2", help="TVM target (default x86-avx2)")
    ap.add_argument("--trials", type=int, default=64, help="tuning trials per model and TVM variant (same "
                                                           "budget for fp32 and DSConv; default 64)")
    ap.add_argument("--trials-per-task", type=int, default=None, metavar="K",
                    help="instead of --trials: K trials per tuning task (same for fp32 and DSConv)")
    ap.add_argument("--trials-per-iter", type=int, default=16)
    ap.add_argument("--no-tune", action="store_true", help="no tuning: shipped schedules, else defaults")
    ap.add_argument("--dense", choices=["dsconv", "keep"], default="dsconv",
                    help="DSConv variants: fully connected layers as 1x1 DSConv (default) or fp32")
    ap.add_argument("--work-dir", default=None, help="tuning databases (default ~/.cache/dsconv-tvm/bench/tune)")
    ap.add_argument("--threads", type=int, default=2, help="threads for ORT and TVM, pinned to the first "
                                                           "THREADS allowed cores (default 2)")
    ap.add_argument("--images", type=int, default=16, help="calibration = benchmark images (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--number", type=int, default=5)
    ap.add_argument("--budget", type=float, default=60.0,
                    help="seconds of timed calls per variant at most: slower variants get --number 1 "
                         "and fewer repeats (at least 5; default 60)")
    ap.add_argument("--layers", type=int, default=6, help="largest DSConv layers timed standalone (0: none)")
    ap.add_argument("--layer-models", nargs="+", default=["resnet50", "vgg19", "resnet20"],
                    help="models of the per-layer report")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "results"))
    ap.add_argument("--name", default="benchmark_x86")
    ap.add_argument("--ship", action="store_true", help="merge the tuned DSConv databases into the shipped schedules/<key>/schedules.zip")
    ap.add_argument("--ship-fp32", action="store_true", help="with --ship: the fp32 databases too")
    ap.add_argument("--time-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if getattr(args, "dense", None):
        os.environ["DSCONV_BENCH_DENSE"] = args.dense
    if args.work_dir is None:
        args.work_dir = os.path.join(bench_models.bench_cache(), "tune")
    return args


def run(args) -> dict:
    cores = sorted(os.sched_getaffinity(0))[:args.threads]
    os.sched_setaffinity(0, cores)                      # children inherit: the same cores for all
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from dsconv_tvm.target import get_target

    spec = get_target(args.target)
    measured = bench_peak.measure(len(cores), bench_models.bench_cache())
    peak = bench_peak.peak_for(bench_peak.kernel_isa(spec), measured)
    log(f"int8 peak {peak['peak_gops']:.0f} GOP/s measured ({peak['sequence']}, "
        f"{peak['macs_per_cycle_per_core']:.1f} MACs/cycle/core at {peak['clock_hz'] / 1e9:.2f} GHz x "
        f"{len(cores)} cores)")
    load_before = [round(v, 2) for v in os.getloadavg()]
    results = {"machine": machine_info(), "target": args.target, "threads": args.threads, "cores": cores,
               "trials": args.trials, "trials_per_task": args.trials_per_task, "no_tune": args.no_tune, "warmup": args.warmup, "repeat": args.repeat,
               "number": args.number, "budget": args.budget, "images": args.images, "peak": peak, "models": [], "layers": []}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="dsconv-bench-") as work:
        for name in args.models:
            log(f"== {name}")
            row, layers = bench_model(name, args, peak, work)
            results["models"].append(row)
            results["layers"] += layers
    results["seconds"] = round(time.time() - t0, 1)
    results["load_average"] = {"before": load_before, "after": [round(v, 2) for v in os.getloadavg()]}
    results["goals"] = goals(results)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.time_child:
        print(json.dumps(time_child(json.loads(args.time_child))))
        return 0
    results = run(args)
    if args.ship:
        ship_schedules(results, args)
    written = write_outputs(results, args.out_dir, args.name)
    print(markdown(results))
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
