#!/usr/bin/env python3
"""Cycle estimate of the DSConv inner loops of an aarch64 library with ``llvm-mca``.

    python tools/arm_mca.py LIB.so [--cpu cortex-a76 cortex-a72] [--counts arm_count.json]
                            [--kernels N] [--json OUT.json] [--show-loop]

For each DSConv kernel of ``LIB.so`` (a ``dsconv-tvm compile --target rpi5|rpi4`` output; the
kernels of the largest layers first when ``--counts`` gives ``tools/arm_count.py``'s JSON, whose
per-kernel instruction counts rank them), the inner loop is taken from the cross disassembly
(``aarch64-linux-gnu-objdump -d``): among the innermost loops (a backward branch with no other
backward branch inside) of the kernel's code, the one with the most integer multiply-accumulate
instructions (``sdot``/``udot`` = 16 MACs on .16b, ``smull``/``smull2``/``smlal``/``smlal2``/``umull``...
= 8 MACs on .8h).  ``llvm-mca`` then simulates 200 iterations of that loop body on its scheduling
model of the core and gives cycles per iteration (steady state, every load an L1 hit), which is
reported per 64 MACs, with the most used resource (the bottleneck) and the fraction of the core's
int8 peak:

* Cortex-A76: two ``sdot`` per cycle (llvm-mca's model: reciprocal throughput 0.5) x 16 MACs =
  32 MACs/cycle, i.e. 2 cycles per 64 MACs.
* Cortex-A72 (no dot product): the widening multiply ``smull``/``smull2`` (8 MACs into .8h) issues on
  one ASIMD pipe and the ``sadalp`` that accumulates it into int32 on the other, one each per cycle
  in llvm-mca's model, so 8 MACs/cycle: 8 cycles per 64 MACs.  (Both peaks are measured by this
  tool with the same model on streams of independent instructions: ``PEAK_SNIPPETS``.)

What this cannot show: cache misses and memory bandwidth (every load is assumed to hit), the loop's
surroundings (the per-block float rescale outside it, the activation quantization pass), and
instruction fetch.  The smaller weight traffic of 4-bit weights appears neither here nor in
instruction counts; only a board's timings show it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

CPUS = ("cortex-a76", "cortex-a72")
OBJDUMP = "aarch64-linux-gnu-objdump"
NM = "aarch64-linux-gnu-nm"
BRANCH = re.compile(r"^(b\.\w+|b|cbz|cbnz|tbz|tbnz)$")

PEAK_SNIPPETS = {
    # independent sdot: 16 MACs each
    "cortex-a76": ("".join(f"sdot v{i}.4s, v{16 + i % 4}.16b, v{20 + i % 4}.16b\n" for i in range(8)),
                   8 * 16),
    # smull + smull2 (8 MACs each) and their sadalp accumulations
    "cortex-a72": ("".join(f"smull v{8 + 2 * i}.8h, v{16 + i}.8b, v{20 + i}.8b\n"
                           f"smull2 v{9 + 2 * i}.8h, v{16 + i}.16b, v{20 + i}.16b\n"
                           f"sadalp v{2 * i}.4s, v{8 + 2 * i}.8h\nsadalp v{2 * i + 1}.4s, v{9 + 2 * i}.8h\n"
                           for i in range(4)), 4 * 16),
}


def _proposal_a76() -> tuple[str, int]:
    """One 4-deep k-step of an 8 output channels x 12 pixels tile with the by-element sdot:
    24 int32x4 accumulators (v8-v31), 32 packed nibbles unpacked into 2 weight registers, 12
    pixels x 4 input channels in 3 registers (activations laid out [pixel 4][ic 4] per register)."""
    lines = ["ldr q0, [x0], #16", "ld1 {v1.16b, v2.16b, v3.16b}, [x1], #48",
             "and v4.16b, v0.16b, v6.16b", "ushr v5.16b, v0.16b, #4"]
    acc = 8
    for a in (1, 2, 3):
        for lane in range(4):
            for w in (4, 5):
                lines.append(f"sdot v{acc}.4s, v{w}.16b, v{a}.4b[{lane}]")
                acc += 1
    return "\n".join(lines) + "\n", 24 * 16


def _proposal_a72() -> tuple[str, int]:
    """One 8-deep k-step of an 8 output channels x 4 pixels tile without dot product: 64 packed
    nibbles unpacked once for 4 pixels; per pixel one ld4r (four 4-byte broadcasts), the products
    of two nibbles in int16 (smull + smlal, and smull2/smlal2 on the high halves instead of moving
    them through a general register), addp, sadalp into int32."""
    lines = ["ldp q0, q1, [x0], #32", "and v2.16b, v0.16b, v30.16b", "ushr v3.16b, v0.16b, #4",
             "and v4.16b, v1.16b, v30.16b", "ushr v5.16b, v1.16b, #4"]
    for p in range(4):
        lines += [f"ld4r {{v6.4s, v7.4s, v8.4s, v9.4s}}, [x{2 + p}], #16",
                  "smull v10.8h, v2.8b, v6.8b", "smlal v10.8h, v3.8b, v7.8b",
                  "smull2 v11.8h, v2.16b, v6.16b", "smlal2 v11.8h, v3.16b, v7.16b",
                  "smull v12.8h, v4.8b, v8.8b", "smlal v12.8h, v5.8b, v9.8b",
                  "smull2 v13.8h, v4.16b, v8.16b", "smlal2 v13.8h, v5.16b, v9.16b",
                  "addp v10.8h, v10.8h, v11.8h", "addp v12.8h, v12.8h, v13.8h",
                  f"sadalp v{16 + 2 * p}.4s, v10.8h", f"sadalp v{17 + 2 * p}.4s, v12.8h"]
    return "\n".join(lines) + "\n", 4 * 8 * 8


# instruction sequences the ARM kernels could use (cost of the instruction mix under the same
# llvm-mca model; not a verified kernel): --proposals
PROPOSALS = {"cortex-a76": _proposal_a76, "cortex-a72": _proposal_a72}


class McaError(RuntimeError):
    pass


def find_llvm_mca() -> tuple[str, int]:
    """The newest llvm-mca installed and its major version."""
    for name in (*(f"llvm-mca-{v}" for v in range(25, 12, -1)), "llvm-mca"):
        path = shutil.which(name)
        if path:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
            m = re.search(r"LLVM version (\d+)", out)
            return path, int(m.group(1)) if m else 0
    raise McaError("llvm-mca not found: install the Debian package llvm-19 (tools/install_system_deps.sh)")


def mca_model(cpu: str) -> str:
    """The -mcpu given to llvm-mca for ``cpu``.  LLVM (14 and 19 alike) schedules -mcpu=cortex-a76
    with its Cortex-A57 model; Neoverse N1 is the server version of the same Cortex-A76 core
    (same pipelines: 2 ASIMD, 2 load/store, 3 integer) and has its own model since LLVM 16, so it
    stands for the A76.  Cortex-A72 has always been scheduled with the A57 model, which is the A72's
    pipeline (A72 = A57 + faster dividers/branch prediction)."""
    if cpu == "cortex-a76" and find_llvm_mca()[1] >= 16:
        return "neoverse-n1"
    return cpu


def macs_of(mnemonic: str, operands: str) -> int:
    """Integer multiply-accumulates done by one instruction (0 for everything else)."""
    m = mnemonic
    if m in ("sdot", "udot", "usdot", "sudot"):
        return 16 if ".16b" in operands or ".4s" in operands.split(",")[0] else 8
    if m in ("smull", "umull", "smlal", "umlal", "smlsl"):
        return 8 if ".8h" in operands.split(",")[0] else 4
    if m in ("smull2", "umull2", "smlal2", "umlal2", "smlsl2"):
        return 8 if ".8h" in operands.split(",")[0] else 4
    if m in ("mla", "mul") and ".16b" in operands:
        return 16
    if m in ("mla", "mul") and ".8h" in operands:
        return 8
    return 0


def disassemble(so: Path, lo: int, hi: int) -> list[tuple[int, str, str]]:
    proc = subprocess.run([OBJDUMP, "-d", "--no-show-raw-insn", f"--start-address={lo:#x}",
                           f"--stop-address={hi:#x}", str(so)], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        raise McaError(f"{OBJDUMP} failed: {proc.stderr.strip()[:300]}")
    out = []
    for line in proc.stdout.splitlines():
        m = re.match(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$", line)
        if m:
            ops = m.group(3).split("//")[0].strip()
            out.append((int(m.group(1), 16), m.group(2), ops))
    return out


def kernels(so: Path) -> dict[str, tuple[int, int]]:
    """DSConv kernel -> (start, end) of its compute function and the parallel lambdas LLVM emits
    right after it (up to the next named function)."""
    proc = subprocess.run([NM, "-S", "--defined-only", str(so)], capture_output=True, text=True,
                          timeout=60)
    syms = []
    for line in proc.stdout.splitlines():
        p = line.split()
        if len(p) == 4 and p[2] in "tT":
            syms.append((int(p[0], 16), int(p[1], 16), p[3]))
    syms.sort()
    out = {}
    for i, (addr, size, name) in enumerate(syms):
        if name.endswith("_compute_") and name.startswith("dsconv_"):
            end = syms[i + 1][0] if i + 1 < len(syms) else addr + size
            out[name[:-len("_compute_")]] = (addr, end)
    return out


def inner_loop(code: list[tuple[int, str, str]]) -> list[tuple[int, str, str]] | None:
    """The innermost loop with the most integer MACs (None if no loop has any)."""
    index = {a: i for i, (a, _, _) in enumerate(code)}
    loops = []
    for i, (addr, mn, ops) in enumerate(code):
        if BRANCH.match(mn):
            t = re.search(r"\b([0-9a-f]+)\s*<", ops) or re.search(r"(?:^|,\s*)([0-9a-f]+)$", ops)
            if t:
                tgt = int(t.group(1), 16)
                if tgt < addr and tgt in index:
                    loops.append((index[tgt], i))
    inner = [(s, e) for s, e in loops
             if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in loops)]
    best, best_macs = None, 0
    for s, e in inner:
        macs = sum(macs_of(mn, ops) for _, mn, ops in code[s:e + 1])
        if macs > best_macs:
            best, best_macs = code[s:e + 1], macs
    return best


def run_mca(body: str, cpu: str, iterations: int = 200) -> dict:
    mca = find_llvm_mca()[0]
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write(body)
        path = f.name
    try:
        proc = subprocess.run([mca, "-mtriple=aarch64-linux-gnu", f"-mcpu={mca_model(cpu)}",
                               f"-iterations={iterations}", path], capture_output=True, text=True,
                              timeout=120)
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        raise McaError(f"llvm-mca failed: {proc.stderr.strip()[:400]}")
    text = proc.stdout
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", text).group(1))
    rthr = float(re.search(r"Block RThroughput:\s+([\d.]+)", text).group(1))
    ipc = float(re.search(r"IPC:\s+([\d.]+)", text).group(1))
    # resources: "[3]   - A57UnitM"; pressure per iteration: the row after its header
    names = dict(re.findall(r"^\[([\d.]+)\]\s+-\s+(\S+)", text, re.M))
    m = re.search(r"Resource pressure per iteration:\n(.*)\n(.*)\n", text)
    bottleneck, pressure = None, {}
    if m:
        cols = re.findall(r"\[([\d.]+)\]", m.group(1))
        vals = m.group(2).split()
        for c, v in zip(cols, vals):
            if v != "-":
                pressure[names.get(c, c)] = pressure.get(names.get(c, c), 0.0) + float(v)
        if pressure:
            bottleneck = max(pressure, key=pressure.get)
    return {"cycles_per_iteration": round(cycles / iterations, 3), "block_rthroughput": rthr,
            "ipc": ipc, "bottleneck": bottleneck,
            "pressure_per_iteration": {k: round(v, 2) for k, v in pressure.items()}}


def peak(cpu: str) -> dict:
    body, macs = PEAK_SNIPPETS[cpu]
    r = run_mca(body, cpu)
    return {"macs_per_cycle": round(macs / r["cycles_per_iteration"], 2),
            "cycles_per_64_macs": round(64 * r["cycles_per_iteration"] / macs, 3),
            "snippet": body.strip().splitlines()[:4]}


def proposals(cpus) -> dict:
    out = {}
    for cpu in cpus:
        body, macs = PROPOSALS[cpu]()
        r = run_mca(body, cpu)
        n = len(body.strip().splitlines())
        cyc = 64 * r["cycles_per_iteration"] / macs
        out[cpu] = {"description": " ".join(PROPOSALS[cpu].__doc__.split()), "instructions": n,
                    "macs": macs, "instructions_per_64_macs": round(64 * n / macs, 2),
                    "cycles_per_64_macs": round(cyc, 3), "bottleneck": r["bottleneck"],
                    "fraction_of_peak": round(peak(cpu)["cycles_per_64_macs"] / cyc, 3),
                    "body": body.strip().splitlines()}
    return out


def mix(loop) -> dict:
    """Instruction classes of a loop body."""
    cls = {"mac": 0, "load": 0, "store": 0, "nibble_unpack": 0, "broadcast": 0, "float": 0,
           "int_vector_other": 0, "scalar": 0}
    for _, mn, ops in loop:
        if macs_of(mn, ops):
            cls["mac"] += 1
        elif mn.startswith("ld1r") or mn == "dup":
            cls["broadcast"] += 1
        elif mn.startswith("ld"):
            cls["load"] += 1
        elif mn.startswith("st"):
            cls["store"] += 1
        elif mn in ("and", "ushr", "sshr", "shl", "bic") and "v" in ops.split(",")[0]:
            cls["nibble_unpack"] += 1
        elif mn.startswith("f") or mn in ("scvtf", "ucvtf"):
            cls["float"] += 1
        elif ops.startswith("v"):
            cls["int_vector_other"] += 1
        else:
            cls["scalar"] += 1
    return cls


def analyse(so: Path, cpus, order: list[str] | None, n: int, show: bool) -> dict:
    ks = kernels(so)
    if not ks:
        raise McaError(f"{so.name}: no dsconv_*_compute_ functions (not a DSConv library?)")
    names = [k for k in (order or []) if k in ks] or sorted(ks)
    path, version = find_llvm_mca()
    result = {"library": so.name, "llvm_mca": f"{os.path.basename(path)} (LLVM {version})",
              "models": {c: mca_model(c) for c in cpus},
              "peak": {c: peak(c) for c in cpus}, "kernels": {}}
    for name in names[:n]:
        lo, hi = ks[name]
        loop = inner_loop(disassemble(so, lo, hi))
        if loop is None:
            result["kernels"][name] = {"error": "no loop with integer MACs found"}
            continue
        macs = sum(macs_of(mn, ops) for _, mn, ops in loop)
        body = "".join(f"{mn} {ops}\n" for _, mn, ops in loop if not BRANCH.match(mn))
        entry = {"loop_start": f"{loop[0][0]:#x}", "instructions": len(loop), "macs": macs,
                 "instructions_per_64_macs": round(64 * len(loop) / macs, 2), "mix": mix(loop),
                 "cpus": {}}
        for cpu in cpus:
            if cpu == "cortex-a72" and any(mn.endswith("dot") for _, mn, _ in loop):
                entry["cpus"][cpu] = {"error": "the loop uses sdot/udot, which the A72 lacks "
                                               "(analyse the rpi4 library for the A72)"}
                continue
            r = run_mca(body, cpu)
            cyc = 64 * r["cycles_per_iteration"] / macs
            r["cycles_per_64_macs"] = round(cyc, 3)
            r["fraction_of_peak"] = round(result["peak"][cpu]["cycles_per_64_macs"] / cyc, 3)
            entry["cpus"][cpu] = r
        if show:
            entry["loop"] = [f"{a:#x}: {mn} {ops}" for a, mn, ops in loop]
        result["kernels"][name] = entry
    return result


def table(res: dict, cpus) -> str:
    lines = [f"{res['library']}: inner loops under {res['llvm_mca']} (steady state, L1 hits)"]
    for c in cpus:
        p = res["peak"][c]
        lines.append(f"  {c} (model -mcpu={res['models'][c]}) int8 peak: {p['macs_per_cycle']} MACs/cycle = {p['cycles_per_64_macs']} "
                     f"cycles per 64 MACs")
    hdr = f"  {'kernel':<30} {'insns':>5} {'MACs':>5} {'ins/64MAC':>9}"
    for c in cpus:
        hdr += f" | {c + ' cyc/64MAC':>20} {'peak':>5} {'bottleneck':>12}"
    lines.append(hdr)
    for name, e in res["kernels"].items():
        if "error" in e:
            lines.append(f"  {name:<30} {e['error']}")
            continue
        row = f"  {name:<30} {e['instructions']:>5} {e['macs']:>5} {e['instructions_per_64_macs']:>9}"
        for c in cpus:
            r = e["cpus"].get(c)
            if r is None or "error" in r:
                row += f" | {'(not for this core)':>39}"
                continue
            row += f" | {r['cycles_per_64_macs']:>20} {r['fraction_of_peak']:>5.2f} {r['bottleneck'] or '-':>12}"
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("library", help="an aarch64 DSConv .so (dsconv-tvm compile --target rpi5|rpi4)")
    p.add_argument("--cpu", nargs="+", choices=CPUS, default=list(CPUS))
    p.add_argument("--counts", default=None, help="tools/arm_count.py JSON of the same library: "
                                                  "analyse the kernels with the most instructions first")
    p.add_argument("--kernels", type=int, default=4, help="how many kernels (default 4)")
    p.add_argument("--show-loop", action="store_true", help="include the loop's disassembly")
    p.add_argument("--proposals", action="store_true",
                   help="also analyse the instruction sequences proposed for the ARM kernels")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    order = None
    if a.counts:
        per = json.loads(Path(a.counts).read_text())["variants"]["dsconv"]["per_layer"]
        order = [k for k, _ in sorted(per.items(), key=lambda kv: -kv[1]) if k.startswith("dsconv_")]
    try:
        res = analyse(Path(a.library), a.cpu, order, a.kernels, a.show_loop)
    except McaError as exc:
        print(f"arm_mca: error: {exc}", file=sys.stderr)
        return 2
    print(table(res, a.cpu))
    if a.proposals:
        res["proposals"] = proposals(a.cpu)
        for cpu, r in res["proposals"].items():
            print(f"  proposed {cpu} sequence: {r['instructions_per_64_macs']} instructions and "
                  f"{r['cycles_per_64_macs']} cycles per 64 MACs ({r['fraction_of_peak']:.2f} of peak, "
                  f"bottleneck {r['bottleneck']})")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
