"""The int8 peak of this CPU for the instructions the DSConv kernels use, and the sustained clock.

``measure_clock`` compiles (gcc, once, into the benchmark cache) a tiny C program that times, on
``cores`` threads at once, (a) a chain of dependent 64-bit ``imul reg, reg`` (latency 3 cycles on every
Intel core since Nehalem and on AMD Zen; a chain of ``add reg, imm`` is NOT usable: Golden Cove
folds immediate adds at rename and "runs" them at 4+ per cycle), so 3 x imuls per second of the
thread's CPU time = the sustained clock under an all-core load, turbo included; CPU time, not wall
time, so that other processes on a shared machine do not lower it, and (b) a stream of independent ``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd``
groups (the AVX2 u8 x s8 -> i32 dot product the x86-avx2 kernels use), giving the int8 MAC rate
that instruction mix really reaches here.  ``int8_peak`` turns the clock into the peak.
"""

from __future__ import annotations

import json
import os
import subprocess

C_SOURCE = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
typedef struct { double hz, macs; } res_t;
#define MUL4 "imul %0, %0\n\timul %0, %0\n\timul %0, %0\n\timul %0, %0\n\t"

static void *work(void *p) {
    res_t *r = (res_t *)p;
    long iters = 20000000, x = 1;
    double t0 = now();
    for (long i = 0; i < iters; i++) __asm__ volatile(MUL4 MUL4 MUL4 MUL4 : "+r"(x));
    r->hz = 3.0 * 16.0 * iters / (now() - t0) + 0.0 * (x & 1);
    __m256i b = _mm256_set1_epi8(5), one = _mm256_set1_epi16(1);
    __m256i a0 = _mm256_set1_epi8(1), a1 = _mm256_set1_epi8(2), a2 = _mm256_set1_epi8(3),
            a3 = _mm256_set1_epi8(4);
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
    long n = 40000000;
    t0 = now();
    for (long i = 0; i < n; i++) {
        __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3));
#define STEP(a, c) c = _mm256_add_epi32(c, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), one));
        STEP(a0, c0) STEP(a1, c1) STEP(a2, c2) STEP(a3, c3)
    }
    double t = now() - t0;
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3));
    r->macs = (4.0 * 32.0 * n) / t + 0.0 * _mm256_extract_epi32(s, 0);
    return 0;
}

int main(int argc, char **argv) {
    int k = argc > 1 ? atoi(argv[1]) : 1;
    pthread_t th[64]; res_t r[64];
    for (int i = 0; i < k; i++) pthread_create(&th[i], 0, work, &r[i]);
    printf("[");
    for (int i = 0; i < k; i++) { pthread_join(th[i], 0); printf("%s{\"hz\": %.6g, \"macs\": %.6g}", i ? ", " : "", r[i].hz, r[i].macs); }
    printf("]\n");
    return 0;
}
"""

# MACs per cycle per core of the int8 dot-product instruction sequence of each kernel flavour
MACS_PER_CYCLE = {"avx2": 64, "avxvnni": 64, "avx512vnni": 64}


def int8_peak(isa: str, clock_hz: float, cores: int) -> dict:
    """Peak int8 operations per second (1 MAC = 2 ops) of ``cores`` cores at ``clock_hz``.

    Derivation (instruction throughputs from uops.info / Intel's optimization manual for
    Skylake .. Golden Cove cores -- this machine reports AMX and AVX512-FP16, i.e. a Sapphire Rapids
    (Golden Cove) Xeon although LLVM calls it rocketlake; Zen 2/3 are the same for AVX2):

    * ``avx2`` (what the x86-avx2 target, mcpu haswell, compiles to): one 256-bit ``vpmaddubsw``
      multiplies 32 u8 x s8 pairs (= 32 MACs) and adds neighbours into 16 i16; ``vpmaddwd`` with a
      vector of ones widens them into 8 i32; ``vpaddd`` accumulates.  ``vpmaddubsw`` and ``vpmaddwd``
      both issue only on ports 0 and 1 (reciprocal throughput 0.5 cycle each), ``vpaddd`` on ports
      0/1/5.  The peak of the multiply instruction itself: 2 ``vpmaddubsw`` per cycle = **64 MACs /
      cycle / core = 128 int8 ops / cycle / core** -- the number we report against (strict).  What
      an instruction mix can reach below it: the textbook sequence (one ``vpmaddwd`` per
      ``vpmaddubsw``) 32 MACs / cycle; the DSConv avx2 intrinsic adds two ``vpmaddubsw`` results
      in i16 before one ``vpmaddwd`` (exact for <= 6-bit weights), 3 port-0/1 uops per 64 MACs ->
      at most 42.7 MACs / cycle = 67 % of this peak.
    * ``avxvnni`` (256-bit ``vpdpbusd``, ports 0/1, 0.5 cycle): 32 MACs per instruction, 2 per cycle
      -> 64 MACs / cycle / core.
    * ``avx512vnni`` (512-bit ``vpdpbusd``: 64 MACs; client Ice/Rocket Lake fuse ports 0+1 for
      512-bit ops, one per cycle) -> 64 MACs / cycle / core.

    peak ops/s = 2 x MACs/cycle x ``clock_hz`` (the sustained all-core clock, measured) x ``cores``.
    The 4-bit weight unpacking, the BFP quantization and the float scaling are extra work on top of
    these MACs, so a DSConv kernel cannot reach 100 % of this peak.
    """
    if isa not in MACS_PER_CYCLE:
        raise ValueError(f"unknown int8 instruction set {isa!r}; known: {', '.join(MACS_PER_CYCLE)}")
    macs = MACS_PER_CYCLE[isa]
    return {"isa": isa, "macs_per_cycle_per_core": macs, "clock_hz": clock_hz, "cores": cores,
            "peak_gops": 2.0 * macs * clock_hz * cores / 1e9}


def isa_of_target(spec) -> str:
    """The int8 dot-product flavour the target's LLVM flags allow (what the kernels compile to)."""
    if spec.has_feature("avx512vnni"):
        return "avx512vnni"
    if spec.has_feature("avxvnni"):
        return "avxvnni"
    return "avx2"


def measure_clock(cores: int, cache_dir: str) -> dict:
    """Run the C microbenchmark on ``cores`` threads at once: the sustained clock (the slowest
    thread's) and the measured AVX2 vpmaddubsw+vpmaddwd MAC rate (sum over threads)."""
    exe = os.path.join(cache_dir, "int8_peak_probe")
    src = exe + ".c"
    if not os.path.exists(exe):
        with open(src + ".tmp", "w") as f:
            f.write(C_SOURCE.replace("#include <time.h>", "#include <time.h>\n#include <stdlib.h>"))
        os.replace(src + ".tmp", src)
        subprocess.run(["gcc", "-O2", "-mavx2", "-pthread", src, "-o", exe + ".tmp"], check=True)
        os.replace(exe + ".tmp", exe)
    out = subprocess.run([exe, str(cores)], check=True, capture_output=True, text=True).stdout
    threads = json.loads(out)
    return {"clock_hz": min(t["hz"] for t in threads),
            "measured_avx2_gmacs": sum(t["macs"] for t in threads) / 1e9,
            "threads": threads}
