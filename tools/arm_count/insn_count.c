/* insn_count: a QEMU TCG plugin (user mode) counting executed guest instructions per translation
 * block, so that a host tool can attribute them to address ranges (the functions of a library).
 *
 *   qemu-aarch64 -plugin ./insn_count.so,out=FILE[,marker_nr=62] PROGRAM ...
 *
 * Every translated block gets a 64-bit counter, incremented inline (no helper call) each time the
 * block starts executing; a block of n instructions executed c times counts n*c instructions.
 * The guest delimits phases with a marker system call that has no effect: lseek(-1, MAGIC|k, 0)
 * (fd -1 fails with EBADF; the plugin sees the call before the kernel does).  At each marker, and
 * at exit, the plugin appends to FILE the counts accumulated since the previous marker:
 *
 *   M <k>                      a marker (k = 0..65535; "M exit" at exit)
 *   <vaddr hex> <n> <count>    a block starting at vaddr, n instructions, executed count times
 *   T <instructions>           the phase's total
 *
 * Counters are plain (non-atomic) adds shared by all guest threads, so with several threads
 * executing the same block at once a few increments may be lost; run measured code on one thread.
 * A block left early (a fault in its middle) still counts all its instructions.
 * Written for dsconv-tvm against QEMU's documented plugin API (see plugin_api.h). */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin_api.h"

DSCONV_PLUGIN_EXPORT int qemu_plugin_version = DSCONV_PLUGIN_API_VERSION;

#define MARKER_MAGIC 0x445343560000ull   /* "DSCV" << 16; the low 16 bits carry k */
#define CHUNK 65536

struct block {
    uint64_t count;     /* incremented by the generated code */
    uint64_t seen;      /* count at the previous dump */
    uint64_t vaddr;
    uint64_t ninsns;
};

static struct block **chunks;
static size_t n_chunks, cap_chunks, n_blocks;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static FILE *out;
static int64_t marker_nr = 62;       /* __NR_lseek on aarch64 */

static struct block *new_block(void)
{
    if (n_blocks == n_chunks * CHUNK) {
        if (n_chunks == cap_chunks) {
            cap_chunks = cap_chunks ? 2 * cap_chunks : 64;
            chunks = realloc(chunks, cap_chunks * sizeof *chunks);
            if (!chunks) abort();
        }
        chunks[n_chunks] = calloc(CHUNK, sizeof(struct block));
        if (!chunks[n_chunks]) abort();
        n_chunks++;
    }
    struct block *b = &chunks[n_blocks / CHUNK][n_blocks % CHUNK];
    n_blocks++;
    return b;
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    pthread_mutex_lock(&lock);
    struct block *b = new_block();
    b->vaddr = qemu_plugin_tb_vaddr(tb);
    b->ninsns = qemu_plugin_tb_n_insns(tb);
    pthread_mutex_unlock(&lock);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &b->count, 1);
}

static void dump(const char *label)
{
    uint64_t total = 0;
    pthread_mutex_lock(&lock);
    fprintf(out, "M %s\n", label);
    for (size_t i = 0; i < n_blocks; i++) {
        struct block *b = &chunks[i / CHUNK][i % CHUNK];
        uint64_t now = b->count, d = now - b->seen;
        if (d) {
            fprintf(out, "%" PRIx64 " %" PRIu64 " %" PRIu64 "\n", b->vaddr, b->ninsns, d);
            total += d * b->ninsns;
            b->seen = now;
        }
    }
    fprintf(out, "T %" PRIu64 "\n", total);
    fflush(out);
    pthread_mutex_unlock(&lock);
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1,
                       uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6,
                       uint64_t a7, uint64_t a8)
{
    (void)id; (void)vcpu; (void)a3; (void)a4; (void)a5; (void)a6; (void)a7; (void)a8;
    if (num != marker_nr || (uint32_t)a1 != 0xffffffffu || (a2 & ~0xffffull) != MARKER_MAGIC)
        return;
    char label[16];
    snprintf(label, sizeof label, "%u", (unsigned)(a2 & 0xffff));
    dump(label);
}

static void at_exit_dump(qemu_plugin_id_t id, void *p)
{
    (void)id; (void)p;
    dump("exit");
    fclose(out);
    out = NULL;
}

DSCONV_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                             int argc, char **argv)
{
    (void)info;
    const char *path = NULL;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            path = argv[i] + 4;
        } else if (strncmp(argv[i], "marker_nr=", 10) == 0) {
            marker_nr = strtoll(argv[i] + 10, NULL, 0);
        } else {
            fprintf(stderr, "insn_count: unknown argument %s (expected out=FILE, marker_nr=N)\n",
                    argv[i]);
            return -1;
        }
    }
    if (!path) {
        fprintf(stderr, "insn_count: missing argument out=FILE\n");
        return -1;
    }
    out = fopen(path, "w");
    if (!out) {
        perror(path);
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, at_exit_dump, NULL);
    return 0;
}
