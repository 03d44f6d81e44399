#!/usr/bin/env python3
"""Instructions per inference on an emulated Cortex-A76 (Raspberry Pi 5) or Cortex-A72 (Pi 4):
DSConv vs ONNX Runtime fp32 vs ONNX Runtime int8, without a board.

    python tools/arm_count.py MODEL.onnx --cpu cortex-a76|cortex-a72 [--target rpi5|rpi4]
                              [--bits 4 --block 64 ...] [--variants dsconv ort_fp32 ort_int8]
                              --json OUT.json

MODEL is an .onnx file or a benchmark model name of ``tools/bench_models.py`` (``resnet50``,
``resnet20``, ...).  For each variant, the emulated board of ``tools/emulated_board.py`` (aarch64
CPython 3.11 + numpy + the aarch64 TVM runtime, plus the aarch64 onnxruntime wheel of the host's
version in a separate cached directory) runs ``tools/arm_count/guest_infer.py`` under the
dynamically linked ``qemu-aarch64`` (Debian ``qemu-user``; the static build has no plugin support)
with ``-cpu cortex-a76`` / ``-cpu cortex-a72`` and the ``insn_count`` TCG plugin
(``tools/arm_count/insn_count.c``, built here with the host C compiler into the cache).  The guest
loads the model, runs one warm-up inference, then ``--k`` inferences between two marker system
calls; the count between the markers divided by K is the number reported, so loading, ORT's graph
optimisation and weight prepacking and all first-run work are excluded.  Threads: one
(``TVM_NUM_THREADS=1``; ORT ``intra_op_num_threads=1``, ``inter_op_num_threads=1``, no spinning);
the plugin counts the instructions of every guest thread, so idle pool threads would add nothing
anyway, and spinning ones would (which is why spinning is off).

What is counted: executed AArch64 instructions (every instruction of each executed translation
block).  Instruction counts are deterministic and track the work a core has to issue, but they are
not time: cache and memory stalls, the different latencies/throughputs of instructions (an ``sdot``
counts as one, like a ``mov``) and the smaller memory traffic of 4-bit weights are invisible here;
``tools/arm_mca.py`` estimates cycles of the inner loops.

The DSConv count is split by the functions of the compiled library (``per_layer``: one entry per
generated kernel; layers with identical shapes share one kernel, named after the first of them) and
everything is also split by mapped object (``by_object``: the library, libtvm_runtime, libpython,
onnxruntime's extension, libc...).  Each variant's output is compared with ONNX Runtime fp32 on the
host (``output_check``) so that a broken run cannot report a plausible count.

The .so is compiled on the host with ``python -m dsconv_tvm compile MODEL --target T --no-check``;
the int8 model is ORT's static QDQ per-channel quantization after ``quant_pre_process``, calibrated
on the same images as the x86 benchmark (``bench_models.quantize_int8``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for _p in (str(REPO), str(REPO / "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_models  # noqa: E402
import emulated_board  # noqa: E402

HERE = REPO / "tools" / "arm_count"
QEMU = "qemu-aarch64"
CPUS = {"cortex-a76": "rpi5", "cortex-a72": "rpi4"}
VARIANTS = ("dsconv", "ort_fp32", "ort_int8")
# /proc/cpuinfo as the guest sees it: qemu-user passes the host's (x86) file through, which makes
# pytorch/cpuinfo inside onnxruntime crash at import; with this file (served from the sysroot
# given with -L) ORT/MLAS also identify the emulated core (MIDR implementer/part) as on a real Pi.
CPUINFO = {
    "cortex-a76": ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
                   "lrcpc dcpop asimddp", "0x4", "0xd0b", "1"),
    "cortex-a72": ("fp asimd evtstrm crc32 cpuid", "0x0", "0xd08", "3"),
}
FORMAT = 1


class ArmCountError(RuntimeError):
    """A problem reported in one line, without a traceback."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_dir(cache: str | None = None) -> Path:
    if cache:
        return Path(cache).expanduser()
    env = os.environ.get("DSCONV_TVM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dsconv-tvm"


def _sha(*parts: bytes | str, n: int = 16) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:n]


# ------------------------------------------------------------------------------------------------
# qemu, the plugin, the per-CPU sysroot
# ------------------------------------------------------------------------------------------------
def find_qemu() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise ArmCountError(f"{QEMU} not found: install the Debian package qemu-user "
                            f"(tools/install_system_deps.sh does); qemu-user-static has no plugins")
    return path


def build_plugin(cache: Path) -> Path:
    """insn_count.so for this host, built once per source version into ``<cache>/arm-count``."""
    src = HERE / "insn_count.c"
    key = _sha(src.read_bytes(), (HERE / "plugin_api.h").read_bytes())
    out = cache / "arm-count" / f"insn_count-{key}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ArmCountError("no host C compiler (cc/gcc) to build the QEMU plugin: install gcc")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    proc = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
                           "-fvisibility=hidden", "-o", str(tmp), str(src), "-lpthread"],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ArmCountError(f"building the QEMU plugin failed: {proc.stderr.strip()[-500:]}")
    os.replace(tmp, out)
    return out


def cpu_sysroot(board, cpu: str, cache: Path) -> Path:
    """A sysroot for ``qemu -L``: links to the board's root plus a /proc/cpuinfo of ``cpu``."""
    feats, variant, part, rev = CPUINFO[cpu]
    entries = sorted(e.name for e in board.root.iterdir())
    root = cache / "arm-count" / f"sysroot-{cpu}-{_sha(str(board.root), *entries, n=8)}"
    text = "".join(f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {feats}\n"
                   f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: {variant}\n"
                   f"CPU part\t: {part}\nCPU revision\t: {rev}\n\n" for i in range(4))
    if (root / "proc" / "cpuinfo").is_file() and (root / "proc" / "cpuinfo").read_text() == text:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sysroot-", dir=root.parent))
    for name in entries:
        (tmp / name).symlink_to((board.root / name).resolve())
    (tmp / "proc").mkdir()
    (tmp / "proc" / "cpuinfo").write_text(text)
    try:
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)
        os.rename(tmp, root)
    except OSError:                    # made by a concurrent run meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.splitlines()[0].strip()
    except Exception:  # noqa: BLE001
        return "unknown"


# ------------------------------------------------------------------------------------------------
# parsing what the guest leaves behind
# ------------------------------------------------------------------------------------------------
def parse_counts(path: Path) -> dict[str, tuple[list[tuple[int, int, int]], int]]:
    """{marker label: ([(vaddr, n_insns, count), ...], total)} of the plugin's output file."""
    phases: dict[str, tuple[list, int]] = {}
    label, blocks = None, []
    with open(path) as f:
        for line in f:
            if line.startswith("M "):
                label, blocks = line[2:].strip(), []
            elif line.startswith("T "):
                phases[label] = (blocks, int(line[2:]))
            else:
                a, n, c = line.split()
                blocks.append((int(a, 16), int(n), int(c)))
    return phases


def parse_maps(text: str) -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of every mapping with a path."""
    maps = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].strip():
            continue
        lo, hi = (int(v, 16) for v in parts[0].split("-"))
        maps.append((lo, hi, int(parts[2], 16), parts[5].strip()))
    return maps


def library_functions(so: Path) -> list[tuple[int, int, str]]:
    """(address, size, name) of the defined functions of an aarch64 .so (cross nm)."""
    nm = shutil.which("aarch64-linux-gnu-nm") or shutil.which("nm")
    proc = subprocess.run([nm, "-S", "--defined-only", str(so)], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise ArmCountError(f"nm failed on {so.name}: {proc.stderr.strip()[:300]}")
    funcs = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        # (e843419@... are the linker's erratum veneers, not functions)
        if len(parts) == 4 and parts[2] in "tTwW" and int(parts[1], 16) > 0 \
                and not parts[3].startswith("e843419@"):
            funcs.append((int(parts[0], 16), int(parts[1], 16), parts[3]))
    return sorted(funcs)


def kernel_name(symbol: str) -> str:
    """The layer/kernel a TVM-generated symbol belongs to (its packed wrapper, its compute
    function and its parallel lambdas are one entry)."""
    s = re.sub(r"^__tvm_ffi_", "", symbol)
    s = re.sub(r"_compute_(_\d+)?$", "", s)
    s = re.sub(r"(_compute_)?_lambda_?\d*$", "", s)
    return s


def attribute(blocks, maps, so_path: str | None, funcs) -> tuple[dict, dict, dict]:
    """Split the blocks' instructions by mapped object, and for ``so_path`` by function.
    Returns (by_object, per_function, calls_per_function)."""
    import bisect

    maps = sorted(maps)
    starts = [m[0] for m in maps]
    base = None
    if so_path is not None:
        own = [m for m in maps if os.path.basename(m[3]) == os.path.basename(so_path)]
        if own:
            base = min(m[0] - m[2] for m in own)
    fstarts = [f[0] for f in funcs]
    by_obj: dict[str, int] = {}
    per_fn: dict[str, int] = {}
    calls: dict[str, int] = {}
    for vaddr, n, count in blocks:
        insns = n * count
        i = bisect.bisect_right(starts, vaddr) - 1
        if i >= 0 and maps[i][0] <= vaddr < maps[i][1]:
            obj = os.path.basename(maps[i][3])
        else:
            obj = "[anonymous]"
        by_obj[obj] = by_obj.get(obj, 0) + insns
        if base is not None and so_path is not None and obj == os.path.basename(so_path):
            off = vaddr - base
            j = bisect.bisect_right(fstarts, off) - 1
            # code after a named function and before the next one is its parallel lambdas:
            # LLVM emits them (private, unnamed in the symbol table) right after the function
            if j >= 0 and (off < funcs[j][0] + funcs[j][1] or funcs[j][2].endswith("_compute_")):
                name = kernel_name(funcs[j][2])
                if off == funcs[j][0] and funcs[j][2].startswith("__tvm_ffi_"):
                    calls[name] = calls.get(name, 0) + count
            else:
                name = "(library, outside named functions)"
            per_fn[name] = per_fn.get(name, 0) + insns
    return by_obj, per_fn, calls


# ------------------------------------------------------------------------------------------------
# the variants' model files (host side)
# ------------------------------------------------------------------------------------------------
def prepare_model(model: str, n_images: int, seed: int):
    """bench_models.BenchModel for a benchmark name or an .onnx path (the Fashion-MNIST examples of
    models/ get their test images, like the x86 benchmark)."""
    stem = Path(model).stem
    if os.path.isfile(model) and stem in bench_models.EXAMPLES and \
            Path(model).resolve() == (REPO / "models" / f"{stem}.onnx").resolve():
        return bench_models.prepare_example(stem, n_images)
    bm = bench_models.prepare(model, n_images, seed, log=log)
    if bm is None and model == "mobilenet_v2":
        # tools/imagenet_models.py needs torch for the real weights: MobileNetV2's architecture
        # with seeded weights instead (the instruction count depends on the shapes, not the values)
        import mobilenet_v2_arch

        bm = bench_models.BenchModel("mobilenet_v2", mobilenet_v2_arch.ensure(seed, log=log),
                                     bench_models.synthetic_images(n_images, seed=seed),
                                     "MobileNetV2 architecture, seeded He-normal weights, BN calibrated")
    if bm is None:
        raise ArmCountError(f"model {model} is not available (see the message above)")
    return bm


def int8_model(bm, work: Path) -> Path:
    key = hashlib.sha256(bm.images.tobytes()).hexdigest()[:12]
    stem = Path(bm.path).stem
    path = Path(bench_models.bench_cache()) / f"{stem}_int8_qdq_pc_{key}.onnx"
    if not path.exists():
        log(f"{bm.name}: ORT static int8 quantization (QDQ, per-channel) on {len(bm.images)} images")
        bench_models.quantize_int8(bm.path, str(path), bm.images)
    return path


def dsconv_library(bm, target: str, compile_args: list[str], cache: Path, timeout: float) -> tuple[Path, dict]:
    """Compile MODEL for ``target`` with the CLI (cached by model, options and the compiler's
    source)."""
    src = b"".join(p.read_bytes() for p in sorted((REPO / "dsconv_tvm").rglob("*.py")))
    sched = b"".join(p.read_bytes() for p in sorted((REPO / "schedules").rglob("*"))
                     if p.is_file() and target in str(p))
    key = _sha(Path(bm.path).read_bytes(), target, " ".join(compile_args), src, sched)
    out_dir = cache / "arm-count" / "libs"
    out_dir.mkdir(parents=True, exist_ok=True)
    so = out_dir / f"{bm.name}_{target}_{key}.so"
    rep = so.with_suffix(".json")
    if so.exists() and rep.exists():
        return so, json.loads(rep.read_text())
    cmd = [sys.executable, "-m", "dsconv_tvm", "compile", bm.path, "--target", target,
           "-o", str(so), "--no-check", "--report-json", str(rep), *compile_args]
    log(f"compiling the DSConv library: dsconv-tvm compile {Path(bm.path).name} --target {target} "
        + " ".join(compile_args))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    if proc.returncode != 0 or not so.exists():
        raise ArmCountError(f"dsconv-tvm compile failed (exit {proc.returncode}): "
                            + (proc.stderr.strip() or proc.stdout.strip())[-800:])
    log(f"  compiled in {time.time() - t0:.0f} s")
    return so, json.loads(rep.read_text())


# ------------------------------------------------------------------------------------------------
# one guest run
# ------------------------------------------------------------------------------------------------
def guest_count(kind: str, model_file: Path, x: np.ndarray, cpu: str, k: int, *, board, ort_dir,
                plugin: Path, sysroot: Path, timeout: float, work: Path, keep_dir=None) -> dict:
    qemu = find_qemu()
    run_dir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=work))
    inp, maps_out, out_npy, counts = (run_dir / "x.npy", run_dir / "maps.txt", run_dir / "y.npy",
                                      run_dir / "counts.txt")
    np.save(inp, x)
    env = {k_: v for k_, v in os.environ.items() if k_ not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=os.pathsep.join(str(p) for p in (board.site, ort_dir) if p),
               TVM_USE_RUNTIME_LIB="1", PYTHONNOUSERSITE="1", PYTHONHASHSEED="0",
               TVM_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [qemu, "-cpu", cpu, "-L", str(sysroot), "-plugin", f"{plugin},out={counts}",
           str(board.root / "usr" / "bin" / f"python{emulated_board.PY_VERSION}"),
           str(HERE / "guest_infer.py"), "tvm" if kind == "dsconv" else "ort", str(model_file),
           str(inp), str(k), str(maps_out), str(out_npy)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ArmCountError(f"{kind}: the emulated run took more than {timeout:.0f} s") from None
    secs = time.time() - t0
    if proc.returncode != 0 or not out_npy.exists():
        raise ArmCountError(f"{kind}: the emulated run failed (exit {proc.returncode}): "
                            + proc.stderr.strip()[-800:])
    phases = parse_counts(counts)
    if "2" not in phases:
        raise ArmCountError(f"{kind}: the plugin saw no end marker (is this the insn_count plugin?)")
    blocks, total = phases["2"]
    maps = parse_maps(maps_out.read_text())
    so_path = str(model_file) if kind == "dsconv" else None
    funcs = library_functions(model_file) if kind == "dsconv" else []
    by_obj, per_fn, calls = attribute(blocks, maps, so_path, funcs)
    y = np.load(out_npy)
    if keep_dir:
        shutil.copytree(run_dir, Path(keep_dir) / f"{kind}-{cpu}", dirs_exist_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    res = {"instructions": int(round(total / k)), "by_object": _per_k(by_obj, k),
           "emulation_seconds": round(secs, 1)}
    if kind == "dsconv":
        res["per_layer"] = _per_k(per_fn, k)
        res["calls_per_inference"] = {n: c // k for n, c in sorted(calls.items())}
        res["library_block_kinds"] = _per_k(library_block_kinds(blocks, maps, model_file), k)
        res["runtime_calls_per_inference"] = _per_k(runtime_calls(blocks, maps), k)
    return res, y


MAC_MNEMONICS = {"sdot", "udot", "smull", "smull2", "smlal", "smlal2", "umull", "umull2",
                 "umlal", "umlal2"}
QUANT_MNEMONICS = {"fabs", "fmax", "fmaxv", "fmaxp", "fmaxnm", "fmaxnmv", "fmaxnmp", "fcvtzs",
                   "fcvtns", "fcvtas", "fcvtms", "frintn", "frinta"}


def library_block_kinds(blocks, maps, so: Path) -> dict[str, int]:
    """Instructions of the library's executed blocks by what the block contains: integer MACs
    (sdot/smull/smlal...), else activation-quantization operations (fabs/fmax/fcvt*/frint*), else
    anything else (rescale epilogues, padding, fp32 layers, loop control)."""
    objdump = shutil.which("aarch64-linux-gnu-objdump") or shutil.which("objdump")
    proc = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(so)], capture_output=True,
                          text=True, timeout=300)
    mn = {int(m.group(1), 16): m.group(2)
          for m in re.finditer(r"^\s*([0-9a-f]+):\s+(\S+)", proc.stdout, re.M)}
    own = [m for m in maps if os.path.basename(m[3]) == so.name]
    if not own:
        return {}
    base = min(m[0] - m[2] for m in own)
    lo, hi = min(m[0] for m in own), max(m[1] for m in own)
    kinds = {"mac_blocks": 0, "quantization_blocks": 0, "other_blocks": 0}
    for vaddr, n, count in blocks:
        if not lo <= vaddr < hi:
            continue
        ops = {mn.get(vaddr - base + 4 * i) for i in range(n)}
        kind = ("mac_blocks" if ops & MAC_MNEMONICS else
                "quantization_blocks" if ops & QUANT_MNEMONICS else "other_blocks")
        kinds[kind] += n * count
    return kinds


def runtime_calls(blocks, maps, names=("TVMBackendAllocWorkspace", "TVMBackendParallelLaunch")) -> dict:
    """How often the runtime functions ``names`` of libtvm_runtime.so were entered."""
    own = [m for m in maps if os.path.basename(m[3]) == "libtvm_runtime.so"]
    if not own or not os.path.isfile(own[0][3]):
        return {}
    base = min(m[0] - m[2] for m in own)
    nm = shutil.which("aarch64-linux-gnu-nm") or shutil.which("nm")
    out = subprocess.run([nm, "-D", "--defined-only", own[0][3]], capture_output=True, text=True,
                         timeout=120).stdout
    addr = {p[2]: int(p[0], 16) for p in (line.split() for line in out.splitlines()) if len(p) == 3}
    entries = {base + addr[n]: n for n in names if n in addr}
    res = dict.fromkeys(entries.values(), 0)
    for vaddr, _, count in blocks:
        if vaddr in entries:
            res[entries[vaddr]] += count
    return res


def _per_k(d: dict, k: int) -> dict:
    return {n: int(round(v / k)) for n, v in sorted(d.items(), key=lambda kv: -kv[1])}


def layer_macs(path: str) -> dict[str, int]:
    """Multiply-accumulates of every Conv / Gemm node of an ONNX model (by node name), from ONNX
    shape inference (the model's inputs must be static)."""
    import onnx
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load(path))
    g = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*g.value_info, *g.output, *g.input)}
    inits = {i.name: i.dims for i in g.initializer}
    out = {}
    for n in g.node:
        if n.op_type in ("Conv", "Gemm") and n.input[1] in inits and n.output[0] in shapes:
            w = list(inits[n.input[1]])
            y = shapes[n.output[0]]
            batch = y[0] if y and y[0] else 1          # a symbolic batch runs as 1
            if n.op_type == "Conv" and len(y) == 4 and y[2] and y[3]:
                out[n.name] = int(np.prod(w)) * y[2] * y[3] * batch
            elif n.op_type == "Gemm":
                out[n.name] = int(np.prod(w)) * batch
    return out


def host_reference(path: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def output_check(ref: np.ndarray, y: np.ndarray) -> dict:
    ref = ref.reshape(ref.shape[0], -1).astype(np.float64)
    y = y.reshape(ref.shape).astype(np.float64)
    rel = float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))
    return {"top1_agree": float(np.mean(ref.argmax(1) == y.argmax(1))), "rel_l2_vs_host_ort_fp32": round(rel, 5)}


# ------------------------------------------------------------------------------------------------
def check_target(target: str, cpu: str) -> None:
    """A library for ``target`` must run on ``cpu``: aarch64, and no dot product on the A72."""
    spec_file = REPO / "targets" / f"{target}.json"
    if not spec_file.is_file():
        return                                  # a target the compiler knows otherwise: let it say
    spec = json.loads(spec_file.read_text())
    tvm_target = spec.get("tvm_target", {})
    triple = tvm_target.get("mtriple") or tvm_target.get("host", {}).get("mtriple", "")
    if not str(triple).startswith("aarch64"):
        raise ArmCountError(f"target {target} is not a 64-bit ARM target (mtriple {triple!r}); "
                            f"use rpi5, rpi4 or arm")
    if cpu == "cortex-a72" and "dotprod" in spec.get("features", []):
        raise ArmCountError(f"target {target} uses the dot-product instructions, which the "
                            f"Cortex-A72 lacks; use --target rpi4 (or arm)")


def count_model(args) -> dict:
    cpu = args.cpu
    target = args.target or CPUS[cpu]
    check_target(target, cpu)
    cache = cache_dir(args.cache)
    find_qemu()
    plugin = build_plugin(cache)
    board = emulated_board.ensure_board(args.cache, log=log)
    ort_dir = emulated_board.ensure_ort_site(args.cache, log=log) \
        if any(v.startswith("ort") for v in args.variants) else None
    sysroot = cpu_sysroot(board, cpu, cache)
    bm = prepare_model(args.model, args.images, args.seed)
    x = np.ascontiguousarray(bm.images[:1])
    ref = host_reference(bm.path, x)
    compile_args = ["--bits", str(args.bits), "--block", str(args.block), "--mantissa", str(args.mantissa),
                    "--dense", args.dense, "--first-layer", args.first_layer, *args.compile_arg]
    result = {"model": bm.name, "model_file": Path(bm.path).name, "weights": bm.source, "cpu": cpu, "target": target,
              "config": {"bits": args.bits, "block": args.block, "mantissa": args.mantissa,
                         "dense": args.dense, "first_layer": args.first_layer,
                         "extra": list(args.compile_arg)},
              "method": (f"executed AArch64 instructions of {args.k} inference(s) after one warm-up, "
                         f"between guest markers, divided by {args.k}; qemu-aarch64 -cpu {cpu} with "
                         f"the insn_count TCG plugin; 1 thread"),
              "qemu": qemu_version(find_qemu()), "onnxruntime": emulated_board._host_ort_version(),
              "tvm_runtime": emulated_board.TVM_VERSION, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="arm-count-") as tmp:
        work = Path(tmp)
        for variant in args.variants:
            if variant == "dsconv":
                model_file, report = dsconv_library(bm, target, compile_args, cache, args.timeout)
                extra = {"layers_converted": sum(1 for l in report.get("layers", []) if l.get("converted")),
                         "layers_total": len(report.get("layers", []))}
            elif variant == "ort_fp32":
                model_file, extra = Path(bm.path), {}
            else:
                model_file, extra = int8_model(bm, work), {}
            log(f"{bm.name} {variant}: emulated {cpu} run ...")
            res, y = guest_count(variant, model_file, x, cpu, args.k, board=board, ort_dir=ort_dir,
                                 plugin=plugin, sysroot=sysroot, timeout=args.timeout, work=work,
                                 keep_dir=args.keep_dir)
            res["output_check"] = output_check(ref, y)
            if variant == "dsconv":
                try:
                    macs = layer_macs(bm.path)
                except Exception:  # noqa: BLE001  (dynamic shapes: no MAC counts)
                    macs = {}
                per_mac = {}
                for kname, n in res["per_layer"].items():
                    layer = kname[len("dsconv_"):] if kname.startswith("dsconv_") else None
                    calls = res["calls_per_inference"].get(kname, 0)
                    if layer in macs and calls:
                        per_mac[kname] = {"macs": macs[layer] * calls,
                                          "instructions_per_mac": round(n / (macs[layer] * calls), 4)}
                res["per_layer_macs"] = per_mac
                res["model_macs"] = int(sum(macs.values()))
            res.update(extra)
            result["variants"][variant] = res
            log(f"  {res['instructions']:,} instructions/inference ({res['emulation_seconds']} s emulated)")
    v = result["variants"]
    if "dsconv" in v:
        for other in ("ort_int8", "ort_fp32"):
            if other in v:
                result.setdefault("ratios", {})[f"dsconv/{other}"] = round(
                    v["dsconv"]["instructions"] / v[other]["instructions"], 4)
    return result


def table(result: dict) -> str:
    v = result["variants"]
    lines = [f"{result['model']} on emulated {result['cpu']} ({result['target']}), instructions per "
             f"inference, 1 thread",
             f"  {'variant':<10} {'instructions':>16} {'vs int8':>8} {'vs fp32':>8}  output vs host fp32"]
    for name, r in v.items():
        ri = r["instructions"] / v["ort_int8"]["instructions"] if "ort_int8" in v else None
        rf = r["instructions"] / v["ort_fp32"]["instructions"] if "ort_fp32" in v else None
        oc = r.get("output_check", {})
        lines.append(f"  {name:<10} {r['instructions']:>16,} {_r(ri):>8} {_r(rf):>8}  top-1 "
                     f"{oc.get('top1_agree', float('nan')):.2f}, rel. L2 {oc.get('rel_l2_vs_host_ort_fp32', float('nan')):.4f}")
    if "dsconv" in v:
        tot = v["dsconv"]["instructions"]
        lines.append("  DSConv split (largest first):")
        for name, n in list(v["dsconv"]["per_layer"].items())[:12]:
            calls = v["dsconv"].get("calls_per_inference", {}).get(name)
            lines.append(f"    {name:<44} {n:>14,} {100 * n / tot:5.1f} %" + (f"  x{calls}" if calls else ""))
        rest = tot - sum(v["dsconv"]["per_layer"].values())
        lines.append(f"    {'(outside the library: VM, runtime, python)':<44} {rest:>14,} {100 * rest / tot:5.1f} %")
        kinds = v["dsconv"].get("library_block_kinds", {})
        if kinds:
            lines.append("  the library's blocks: " + ", ".join(
                f"{k.replace('_', ' ')} {n:,} ({100 * n / tot:.1f} %)" for k, n in kinds.items()))
        rc = v["dsconv"].get("runtime_calls_per_inference", {})
        if rc:
            lines.append("  runtime calls per inference: " + ", ".join(f"{k} {n:,}" for k, n in rc.items()))
    return "\n".join(lines)


def _r(x):
    return "-" if x is None else f"{x:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an .onnx file or a tools/bench_models.py name (resnet50, ...)")
    p.add_argument("--cpu", required=True, choices=sorted(CPUS), help="the emulated core")
    p.add_argument("--target", default=None, help="dsconv-tvm target (default: rpi5 for cortex-a76, "
                                                     "rpi4 for cortex-a72)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--mantissa", type=int, default=8)
    p.add_argument("--dense", choices=["keep", "dsconv"], default="dsconv")
    p.add_argument("--first-layer", choices=["keep", "dsconv"], default="keep")
    p.add_argument("--compile-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for dsconv-tvm compile (repeat the option)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--k", type=int, default=1, help="counted inferences (default 1; counts are "
                                                     "deterministic up to a few hundred instructions)")
    p.add_argument("--images", type=int, default=16, help="calibration images for ORT int8 (default "
                                                           "16, as the x86 benchmark); image 0 is the input")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per compile / emulated run")
    p.add_argument("--cache", default=None, help="cache directory (default $DSCONV_TVM_CACHE or "
                                                 "~/.cache/dsconv-tvm)")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--keep-dir", default=None, help="keep each run's raw plugin output and maps here")
    args = p.parse_args(argv)
    if args.k < 1:
        p.error("--k must be at least 1")
    try:
        result = count_model(args)
    except (ArmCountError, emulated_board.BoardSetupError) as exc:
        print(f"arm_count: error: {exc}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        tmp = args.json + ".tmp"
        Path(os.path.dirname(os.path.abspath(args.json))).mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
