#!/usr/bin/env python3
"""Where one inference of a compiled model spends its time: every call of the Relax VM timed.

Builds the model as ``dsconv-tvm compile --target TARGET`` does (W4 B=64 m=8 by default, fully
connected layers as DSConv; shipped schedules unless --tuning-db), loads the .so into a Relax VM
and times every ``Call`` instruction of ``main`` with the VM's instrument hook
(``VirtualMachine.set_instrument``: a callback before and after each call; TVM 0.27's Relax VM has
no built-in profiler): each DSConv layer (its BFP quantization stages are inside the same
PrimFunc), fp32 convs, pooling, adds, layout transforms, and the VM's own builtins (allocations,
shape checks).  ``--repeat`` profiled runs after warm-up; the median per call site is kept.  The
sum of the timed calls is compared with the unprofiled latency (the hook costs a few
microseconds per call).

Each DSConv function's integer GOP/s and fraction of the measured int8 peak
(:mod:`bench_peak`) are reported with its share of the inference.

Writes ``<out-dir>/<name>.{json,md}``.

Usage:  python tools/profile_model.py resnet50 [--target x86] [--block 64] [--threads 2] [...]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
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
import bench_peak  # noqa: E402

# (category, test on the called symbol), first match wins
CATEGORIES = (
    ("allocation", lambda s: s.startswith("vm.builtin.alloc") or s.startswith("vm.builtin.kill")),
    ("VM builtins", lambda s: s.startswith("vm.") or s.startswith("relax.")),
    ("DSConv", lambda s: s.startswith("dsconv_")),
    ("fp32 conv", lambda s: "conv" in s),
    ("fp32 matmul", lambda s: "matmul" in s or "dense" in s),
    ("pooling", lambda s: "pool" in s or s.startswith("mean") or "_mean" in s),
    ("layout (reshape, transpose, concat, pad)",
     lambda s: any(k in s for k in ("reshape", "transpose", "concat", "layout", "pad", "flatten", "split",
                                    "squeeze", "strided_slice", "take"))),
    ("elementwise (add, relu, ...)", lambda s: any(k in s for k in ("add", "relu", "clip", "multiply",
                                                                   "subtract", "divide", "maximum"))),
)


def category(symbol: str) -> str:
    return next((name for name, test in CATEGORIES if test(symbol)), "other")


def dsconv_kind(layer) -> str:
    """A DSConv layer's family for the summary: classifier, 1x1 / 3x3 / kxk, stride."""
    kh, kw = layer.kernel
    if layer.in_shape[2] == 1 and layer.in_shape[3] == 1:
        return "classifier (1x1 on a 1x1 map)"
    s = layer.geom.strides[0]
    return f"{kh}x{kw}" + (f" stride {s}" if s != 1 else "")


def profile_library(path: str, x: np.ndarray, repeat: int, warmup: int = 3) -> tuple[list[list], dict]:
    """(per profiled run: [(symbol, seconds), ...] in call order, unprofiled latency stats)."""
    import tvm

    from dsconv_tvm.execute.runner import load_library, time_main

    vm, _shape = load_library(path)
    _, times = time_main(vm, x, repeat=max(10, repeat), number=3)
    lat = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}
    tx = tvm.runtime.tensor(x)
    for _ in range(warmup):
        vm["main"](tx)
    runs: list[list] = []
    record: list = []
    started: list[float] = []

    # one thread: the thread's CPU time (robust on a shared machine); more: wall time
    clock = time.thread_time if os.environ.get("TVM_NUM_THREADS") == "1" else time.perf_counter

    def instrument(_func, symbol, before, _ret, *_args):
        t = clock()
        if before:
            started.append(t)
        else:
            record.append((str(symbol), t - started.pop()))
        return 0                     # VMInstrumentReturnKind.kNoOp

    vm.set_instrument(instrument)
    for _ in range(repeat):
        record = []
        started.clear()
        vm["main"](tx)
        runs.append(record)
    return runs, lat


def summarize(runs: list[list], lat: dict, report, peak: dict | None) -> dict:
    """Median over runs of every call site; rows per called function and per category."""
    n = len(runs[0])
    if any(len(r) != n or [s for s, _ in r] != [s for s, _ in runs[0]] for r in runs):
        raise RuntimeError("the profiled runs called different functions")
    sites = [(runs[0][i][0], statistics.median(r[i][1] for r in runs)) for i in range(n)]
    total = sum(t for _, t in sites)
    layers = {}
    for rl in report.converted if report is not None else []:
        layers.setdefault(rl.func_name, []).append(rl)
    funcs: dict[str, dict] = {}
    for sym, t in sites:
        f = funcs.setdefault(sym, {"function": sym, "category": category(sym), "calls": 0, "ms": 0.0})
        f["calls"] += 1
        f["ms"] += 1e3 * t
    for f in funcs.values():
        f["share"] = f["ms"] / (1e3 * total)
        rls = layers.get(f["function"])
        if rls:
            layer = rls[0].layer
            f.update({"layers": [r.name for r in rls], "kind": dsconv_kind(layer),
                      "in_shape": list(layer.in_shape), "out_shape": list(layer.out_shape),
                      "kernel": list(layer.kernel), "strides": list(layer.geom.strides),
                      "macs_per_call": int(layer.macs)})
            gops = 2 * layer.macs * f["calls"] / (f["ms"] * 1e-3) / 1e9
            f["int_gops"] = gops
            if peak:
                f["fraction_of_peak"] = gops / peak["peak_gops"]
    cats: dict[str, dict] = {}
    for f in funcs.values():
        c = cats.setdefault(f["category"], {"category": f["category"], "calls": 0, "ms": 0.0})
        c["calls"] += f["calls"]
        c["ms"] += f["ms"]
    kinds: dict[str, dict] = {}
    for f in funcs.values():
        if "kind" in f:
            k = kinds.setdefault(f["kind"], {"kind": f["kind"], "calls": 0, "ms": 0.0, "macs": 0})
            k["calls"] += f["calls"]
            k["ms"] += f["ms"]
            k["macs"] += f["macs_per_call"] * f["calls"]
    for group in (cats, kinds):
        for c in group.values():
            c["share"] = c["ms"] / (1e3 * total)
    for k in kinds.values():
        k["int_gops"] = 2 * k["macs"] / (k["ms"] * 1e-3) / 1e9
        if peak:
            k["fraction_of_peak"] = k["int_gops"] / peak["peak_gops"]
    return {"profiled_total_ms": 1e3 * total, "unprofiled": lat, "calls_per_inference": n,
            "categories": sorted(cats.values(), key=lambda c: -c["ms"]),
            "dsconv_kinds": sorted(kinds.values(), key=lambda c: -c["ms"]),
            "functions": sorted(funcs.values(), key=lambda f: -f["ms"])}


def markdown(res: dict) -> str:
    out = io.StringIO()
    p = res["profile"]
    out.write(f"# Profile: {res['model']} ({res['config']}), target {res['target']}, schedules: {res['schedules']}\n\n")
    out.write(f"Machine: {res['cpu']}, {res['threads']} threads pinned to cores {res['cores']}, batch 1; "
              f"load average before / after: {res['load_before']} / {res['load_after']}. "
              f"Unprofiled latency {p['unprofiled']['median_ms']:.2f} ms (min {p['unprofiled']['min_ms']:.2f}, "
              f"max {p['unprofiled']['max_ms']:.2f}); sum of the {p['calls_per_inference']} timed VM calls "
              f"{p['profiled_total_ms']:.2f} ms (median of {res['repeat']} profiled runs per call site, "
              f"{'CPU time of the one thread' if res['threads'] == 1 else 'wall time'}; shares below are of this "
              f"sum).\n\n")
    if res.get("peak"):
        out.write(f"int8 peak {res['peak']['peak_gops']:.0f} GOP/s (measured, {res['peak']['sequence']}).\n\n")
    out.write("| category | calls | ms | share |\n|---|---|---|---|\n")
    for c in p["categories"]:
        out.write(f"| {c['category']} | {c['calls']} | {c['ms']:.3f} | {100 * c['share']:.1f} % |\n")
    if p["dsconv_kinds"]:
        out.write("\n| DSConv layers | calls | ms | share | integer GOP/s | % of peak |\n|---|---|---|---|---|---|\n")
        for k in p["dsconv_kinds"]:
            out.write(f"| {k['kind']} | {k['calls']} | {k['ms']:.3f} | {100 * k['share']:.1f} % | "
                      f"{k['int_gops']:.0f} | {100 * k.get('fraction_of_peak', float('nan')):.1f} |\n")
    out.write("\n| function | category | calls | ms | share | layer | GOP/s | % of peak |\n"
              "|---|---|---|---|---|---|---|---|\n")
    for f in p["functions"]:
        if "kind" in f:
            desc = (f"{'x'.join(map(str, f['in_shape'][1:]))} -> {'x'.join(map(str, f['out_shape'][1:]))}, "
                    f"{f['kind']}")
            g = f"{f['int_gops']:.0f}"
            fp = f"{100 * f['fraction_of_peak']:.1f}" if "fraction_of_peak" in f else "-"
        else:
            desc, g, fp = "", "", ""
        out.write(f"| {f['function']} | {f['category']} | {f['calls']} | {f['ms']:.3f} | {100 * f['share']:.1f} % | "
                  f"{desc} | {g} | {fp} |\n")
    return out.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help=f"{', '.join(bench_models.ALL_MODELS)} or an .onnx path")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--dense", choices=["dsconv", "keep"], default="dsconv")
    ap.add_argument("--fp32", action="store_true", help="profile the fp32 model (no DSConv)")
    ap.add_argument("--tuning-db", default=None)
    ap.add_argument("--no-nhwc-depthwise", action="store_true",
                    help="keep the depthwise convs NCHW (DSConvConfig(nhwc_depthwise=False)): the A/B baseline")
    ap.add_argument("--library", default=None, help="profile this .so (built for the model) instead of building")
    ap.add_argument("--threads", type=int, default=2,
                    help="TVM threads (default 2); with 1 every call is timed in the thread's CPU time")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out-dir", default=os.path.join(REPO, "results"))
    ap.add_argument("--name", default=None, help="default profile_<model>_<target>")
    args = ap.parse_args(argv)

    cores = sorted(os.sched_getaffinity(0))[:args.threads]
    os.sched_setaffinity(0, cores)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from dsconv_tvm.config import DSConvConfig
    from dsconv_tvm.driver.compile import compile_model
    from dsconv_tvm.fileio import atomic_write_text
    from dsconv_tvm.target import get_target

    model = bench_models.prepare(args.model, 1, 0, print)
    if model is None:
        return 2
    cfg = None if args.fp32 else DSConvConfig(bits=args.bits, block=args.block, mantissa=8, dense=args.dense,
                                              nhwc_depthwise=not args.no_nhwc_depthwise)
    load_before = [round(v, 2) for v in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="dsconv-profile-") as work:
        so = args.library or os.path.join(work, "model.so")
        report, schedules = None, "given library"
        if cfg is not None:
            t0 = time.time()
            result = compile_model(model.path, args.target, so if not args.library else os.path.join(work, "m.so"),
                                   cfg, check=False, tuning_db=args.tuning_db)
            report, schedules = result.report, result.schedules
            print(f"built in {time.time() - t0:.1f} s ({schedules})", file=sys.stderr)
        elif not args.library:
            from dsconv_tvm.driver.compile import build, build_relax
            from dsconv_tvm.driver.database import find_database
            from dsconv_tvm.frontend.onnx import load_onnx

            spec = get_target(args.target)
            database, schedules = find_database(spec.name, args.tuning_db)
            spec.export_library(build(build_relax(load_onnx(model.path), None)[0], spec, database, []), so)
        x = np.ascontiguousarray(model.images[:1])
        runs, lat = profile_library(so, x, args.repeat)
    measured = bench_peak.measure(len(cores), bench_models.bench_cache())
    try:
        peak = bench_peak.peak_for(bench_peak.kernel_isa(get_target(args.target)), measured)
    except ValueError:
        peak = None
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    res = {"model": model.name, "source": model.source, "target": args.target,
           "config": "fp32" if cfg is None else f"DSConv W{args.bits} B={args.block} m=8 dense={args.dense}"
                     + (" nhwc_depthwise=0" if args.no_nhwc_depthwise else ""),
           "schedules": schedules, "cpu": cpu, "threads": args.threads, "cores": cores, "repeat": args.repeat,
           "load_before": load_before, "load_after": [round(v, 2) for v in os.getloadavg()],
           "peak": peak, "profile": summarize(runs, lat, report, peak)}
    name = args.name or f"profile_{model.name}_{args.target}"
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, name)
    atomic_write_text(base + ".json", json.dumps(res, indent=1, default=float))
    md = markdown(res)
    atomic_write_text(base + ".md", md)
    print(md)
    print(f"wrote {base}.json, {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
