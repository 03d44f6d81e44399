"""The measured int8 peak of this CPU for the dot-product instruction the DSConv kernels use.

``measure`` compiles (gcc, once, into the benchmark cache) a small C program and runs it on ``cores``
threads at once.  Each thread measures, in its own CPU time (not wall time, so that other processes
on a shared machine do not lower it):

* the sustained clock: a chain of dependent 64-bit ``imul reg, reg`` (latency 3 cycles on every
  Intel core since Nehalem and on AMD Zen 1-5; a chain of ``add reg, imm`` is NOT usable: Golden
  Cove folds immediate adds at rename), 3 x imuls per second = cycles per second, turbo included;
* the MAC rate of each byte dot-product sequence the kernels emit (:mod:`dsconv_tvm.backends.cpu.
  intrinsics`), with as many independent accumulators as hide the latency (the pmadd sequences in
  inline assembly, ``vpdpbusd`` with intrinsics whose operands are hidden from the compiler, so that
  nothing is folded or spilled):

  ========  =======================================================  ==========  ===============
  name      one step (a tensorized call = 2 steps of vnni, 1 of pmadd)  MACs/step   kernel ISA
  ========  =======================================================  ==========  ===============
  avx2      ``vpmaddubsw`` ymm x2, ``vpaddw``, ``vpmaddwd``, ``vpaddd``  64          avx2
  avx512    the same on zmm (AVX-512BW)                               128         avx512
  vnni      ``vpdpbusd`` zmm (u8 x s8, 4 products into i32)           64          vnni
  ========  =======================================================  ==========  ===============

  plus ``avx2_maddubs`` / ``avx512_maddubs``: ``vpmaddubsw`` alone (+ ``vpaddw`` to keep it live),
  the multiply instruction's own rate, an upper bound the pmadd sequence cannot reach.

The peak of a kernel is the measured rate of *its* sequence (``peak_for``): peak GOP/s = 2 x
measured MACs/s summed over the threads.  Only sequences the CPU supports are run (checked with
``__builtin_cpu_supports``).  The 4-bit weight unpacking, the BFP quantization and the float
scaling are extra work on top of these MACs, so a DSConv kernel cannot reach 100 % of this peak.
"""

from __future__ import annotations

import json
import os
import subprocess

C_SOURCE = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
#define MUL4 "imul %0, %0\n\timul %0, %0\n\timul %0, %0\n\timul %0, %0\n\t"
#define N_ITER 20000000L
enum { CLOCK, AVX2, AVX2_MADDUBS, AVX512, AVX512_MADDUBS, VNNI, FMA512, NRES };
static const char *NAMES[NRES] = {"hz", "avx2", "avx2_maddubs", "avx512", "avx512_maddubs", "vnni", "fma512"};
typedef struct { double r[NRES]; } res_t;
static volatile int sink;

static double clock_hz(void) {
    long x = 1; double t0 = now();
    for (long i = 0; i < N_ITER; i++) __asm__ volatile(MUL4 MUL4 MUL4 MUL4 : "+r"(x));
    double t = now() - t0; sink = (int)x;
    return 3.0 * 16.0 * N_ITER / t;
}

/* the pmadd sequences in assembly (a compiler folds or spills the intrinsics' version): operands
   a0 = R0, a1 = R1, b = R2, ones = R3; six independent accumulators R4..R9; temporaries R10, R11
   (register renaming makes their reuse free).  Operand values do not change the timing. */
#define PM_STEP(R, C) "vpmaddubsw %%" R "2, %%" R "0, %%" R "10\n\t" "vpmaddubsw %%" R "2, %%" R "1, %%" R "11\n\t" \
    "vpaddw %%" R "11, %%" R "10, %%" R "10\n\t" "vpmaddwd %%" R "3, %%" R "10, %%" R "10\n\t"                      \
    "vpaddd %%" R "10, %%" R C ", %%" R C "\n\t"
#define MB_STEP(R, C) "vpmaddubsw %%" R "2, %%" R "0, %%" R "10\n\t" "vpaddw %%" R "10, %%" R C ", %%" R C "\n\t"
#define SIX(S, R) S(R, "4") S(R, "5") S(R, "6") S(R, "7") S(R, "8") S(R, "9")
#define PM_LOOP(R, BODY)                                                                                \
    long n = N_ITER; double t0 = now();                                                                  \
    __asm__ volatile("vpcmpeqb %%ymm0, %%ymm0, %%ymm0\n\t" "vpabsb %%ymm0, %%ymm1\n\t"        \
                     "vpabsb %%ymm0, %%ymm2\n\t" "vpabsw %%ymm0, %%ymm3\n\t"                     \
                     "vpxor %%ymm4, %%ymm4, %%ymm4\n\t" "vpxor %%ymm5, %%ymm5, %%ymm5\n\t"   \
                     "vpxor %%ymm6, %%ymm6, %%ymm6\n\t" "vpxor %%ymm7, %%ymm7, %%ymm7\n\t"   \
                     "vpxor %%ymm8, %%ymm8, %%ymm8\n\t" "vpxor %%ymm9, %%ymm9, %%ymm9\n\t"   \
                     "1:\n\t" BODY "dec %0\n\t" "jnz 1b\n\t" "vzeroupper\n\t"                           \
                     : "+r"(n) : : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",    \
                       "xmm8", "xmm9", "xmm10", "xmm11", "cc");                                          \
    double t = now() - t0;
static double avx2(int alone) {
    if (alone) { PM_LOOP("ymm", SIX(MB_STEP, "ymm")) return 32.0 * 6 * N_ITER / t; }
    PM_LOOP("ymm", SIX(PM_STEP, "ymm")) return 64.0 * 6 * N_ITER / t;
}
static double avx512(int alone) {
    if (alone) { PM_LOOP("zmm", SIX(MB_STEP, "zmm")) return 64.0 * 6 * N_ITER / t; }
    PM_LOOP("zmm", SIX(PM_STEP, "zmm")) return 128.0 * 6 * N_ITER / t;
}

__attribute__((target("avx512f,avx512vnni"))) static double vnni(void) {
    __m512i b = _mm512_set1_epi8(5), a0 = _mm512_set1_epi8(1), a1 = _mm512_set1_epi8(2), c[12];
    for (int k = 0; k < 12; k++) c[k] = _mm512_setzero_si512();
    double t0 = now();
    for (long i = 0; i < N_ITER; i++) {
        __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(b));
        _Pragma("GCC unroll 12") for (int k = 0; k < 12; k++) c[k] = _mm512_dpbusd_epi32(c[k], k & 1 ? a1 : a0, b);
    }
    double t = now() - t0;
    __m512i s = c[0]; for (int k = 1; k < 12; k++) s = _mm512_add_epi32(s, c[k]);
    sink = _mm512_reduce_add_epi32(s);
    return 64.0 * 12 * N_ITER / t;
}

/* the fp32 peak of the kept fp32 convs (their outer-product tiles are vfmadd231ps zmm): twelve
   independent accumulators, c = c * 1 + b (no overflow, no denormals) */
__attribute__((target("avx512f"))) static double fma512(void) {
    __m512 a = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(1e-7f), c[12];
    for (int k = 0; k < 12; k++) c[k] = _mm512_setzero_ps();
    double t0 = now();
    for (long i = 0; i < N_ITER; i++) {
        __asm__ volatile("" : "+v"(a), "+v"(b));
        _Pragma("GCC unroll 12") for (int k = 0; k < 12; k++) c[k] = _mm512_fmadd_ps(c[k], a, b);
    }
    double t = now() - t0;
    __m512 s = c[0]; for (int k = 1; k < 12; k++) s = _mm512_add_ps(s, c[k]);
    sink = (int)_mm512_reduce_add_ps(s);
    return 16.0 * 12 * N_ITER / t;
}

static void *work(void *p) {
    res_t *r = (res_t *)p;
    for (int k = 0; k < NRES; k++) r->r[k] = -1;
    r->r[CLOCK] = clock_hz();
    if (__builtin_cpu_supports("avx2")) { r->r[AVX2] = avx2(0); r->r[AVX2_MADDUBS] = avx2(1); }
    if (__builtin_cpu_supports("avx512bw")) { r->r[AVX512] = avx512(0); r->r[AVX512_MADDUBS] = avx512(1); }
    if (__builtin_cpu_supports("avx512vnni")) r->r[VNNI] = vnni();
    if (__builtin_cpu_supports("avx512f")) r->r[FMA512] = fma512();
    return 0;
}

int main(int argc, char **argv) {
    int k = argc > 1 ? atoi(argv[1]) : 1;
    pthread_t th[64]; res_t r[64];
    if (k < 1 || k > 64) return 2;
    for (int i = 0; i < k; i++) pthread_create(&th[i], 0, work, &r[i]);
    printf("[");
    for (int i = 0; i < k; i++) {
        pthread_join(th[i], 0);
        printf("%s{", i ? ", " : "");
        int first = 1;
        for (int j = 0; j < NRES; j++) if (r[i].r[j] >= 0) { printf("%s\"%s\": %.6g", first ? "" : ", ", NAMES[j], r[i].r[j]); first = 0; }
        printf("}");
    }
    printf("]\n");
    return 0;
}
"""

#: the instruction sequence each kernel ISA (``intrinsics.isa_of``) emits, and its description
SEQUENCES = {
    "avx2": "vpmaddubsw ymm x2 + vpaddw + vpmaddwd + vpaddd (64 MACs)",
    "avx512": "vpmaddubsw zmm x2 + vpaddw + vpmaddwd + vpaddd (128 MACs)",
    "vnni": "vpdpbusd zmm (64 MACs)",
    "avx2_maddubs": "vpmaddubsw ymm + vpaddw (32 MACs)",
    "avx512_maddubs": "vpmaddubsw zmm + vpaddw (64 MACs)",
    "fma512": "vfmadd231ps zmm (16 fp32 multiply-adds; the fp32 convs' peak)",
}

#: nominal MACs/cycle/core from instruction tables (for comparison only: the peak is measured)
NOMINAL_MACS_PER_CYCLE = {"avx2": 64, "avx512": 128, "vnni": 128}

TIMEOUT_S = 120


def kernel_isa(spec) -> str | None:
    """The dot-product sequence the target's DSConv kernels compile to (avx2 | avx512 | vnni |
    sdot | neon | None), exactly as the schedule picks it."""
    from dsconv_tvm.backends.cpu import intrinsics

    return intrinsics.isa_of(spec.tvm_target())


def _probe(cache_dir: str) -> str:
    import hashlib

    # keyed by the source: a cached probe of another version is never run
    exe = os.path.join(cache_dir, "int8_peak_probe_" + hashlib.sha256(C_SOURCE.encode()).hexdigest()[:10])
    if not os.path.exists(exe):
        os.makedirs(cache_dir, exist_ok=True)
        src = exe + ".c"
        with open(src + ".tmp", "w") as f:
            f.write(C_SOURCE)
        os.replace(src + ".tmp", src)
        subprocess.run(["gcc", "-O3", "-pthread", src, "-o", exe + ".tmp"], check=True, timeout=TIMEOUT_S)
        os.replace(exe + ".tmp", exe)
    return exe


def measure(cores: int, cache_dir: str) -> dict:
    """Run the microbenchmark on ``cores`` threads at once: the sustained clock (the slowest
    thread's) and, for every sequence this CPU has, the MAC rate summed over the threads."""
    out = subprocess.run([_probe(cache_dir), str(cores)], check=True, capture_output=True, text=True,
                         timeout=TIMEOUT_S).stdout
    threads = json.loads(out)
    clock = min(t["hz"] for t in threads)
    rates = {}
    for name in SEQUENCES:
        if all(name in t for t in threads):
            g = sum(t[name] for t in threads) / 1e9
            rates[name] = {"gmacs": g, "macs_per_cycle_per_core": g * 1e9 / clock / cores,
                           "sequence": SEQUENCES[name]}
    return {"clock_hz": clock, "cores": cores, "sequences": rates, "threads": threads}


def peak_for(isa: str | None, measured: dict) -> dict:
    """The int8 peak of kernels using ``isa`` (from :func:`measure`): 2 x the measured MAC rate
    of their own instruction sequence, all threads together."""
    seq = measured["sequences"].get(isa or "")
    if seq is None:
        raise ValueError(f"no measurement of the {isa!r} dot-product sequence on this CPU "
                         f"(measured: {', '.join(measured['sequences']) or 'none'})")
    nominal = NOMINAL_MACS_PER_CYCLE.get(isa)
    return {"isa": isa, "sequence": seq["sequence"], "cores": measured["cores"],
            "clock_hz": measured["clock_hz"], "macs_per_cycle_per_core": seq["macs_per_cycle_per_core"],
            "peak_gops": 2.0 * seq["gmacs"], "nominal_macs_per_cycle_per_core": nominal,
            "measured": measured["sequences"], "source": "measured (tools/bench_peak.py)"}


def main(argv=None) -> int:
    import argparse
    import platform
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="x86", help="target whose kernel ISA is the peak (default x86: this host)")
    ap.add_argument("--cores", type=int, default=None, help="threads (default: every allowed core)")
    ap.add_argument("--repeat", type=int, default=5, help="runs; the median peak is kept (default 5)")
    ap.add_argument("-o", "--output", default=None, help="write the JSON here")
    args = ap.parse_args(argv)
    from dsconv_tvm.target import get_target

    cores = sorted(os.sched_getaffinity(0))[:args.cores] if args.cores else sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores)
    cache = os.path.join(os.path.expanduser("~"), ".cache", "dsconv-tvm", "bench")
    isa = kernel_isa(get_target(args.target))
    runs = [measure(len(cores), cache) for _ in range(args.repeat)]
    peaks = sorted((peak_for(isa, m) for m in runs), key=lambda p: p["peak_gops"])
    best = peaks[len(peaks) // 2]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    res = {"cpu": cpu, "machine": platform.machine(), "target": args.target, "kernel_isa": isa,
           "peak": best, "runs_peak_gops": [p["peak_gops"] for p in peaks],
           "load_average": os.getloadavg()}
    text = json.dumps(res, indent=1)
    if args.output:
        from dsconv_tvm.fileio import atomic_write_text
        atomic_write_text(args.output, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
