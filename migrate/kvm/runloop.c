/*
 * The vCPU run loop and bitmap helpers of migrate.kvm, compiled into the
 * cffi extension module migrate.kvm._kvm (see _build.py).
 *
 * hvm_run() enters KVM_RUN over and over without returning to Python for
 * exits it can finish itself (debug-console output is buffered here), and
 * returns for everything else.  cffi releases the GIL around the call, so
 * Python threads keep running while the guest runs.
 *
 * Pausing from another thread (hvm_kick): set run->immediate_exit, then
 * signal the vCPU thread if it is inside hvm_run.  immediate_exit closes the
 * window between the loop's check and the ioctl; the signal (a no-op handler
 * installed without SA_RESTART) breaks a KVM_RUN already in progress.  The
 * KVM_RUN made with immediate_exit set also completes a pending port/MMIO
 * read, so guest state is consistent once hvm_run has returned HVM_STOPPED.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#define HVM_STOPPED   0   /* kicked: guest state is consistent */
#define HVM_CONSOLE   1   /* console buffer wants draining */
#define HVM_EXIT      2   /* an exit for the caller: see struct hvm_exit */
#define HVM_NULL_PORT 0xED  /* accesses complete in the run loop: no-op (reads 0) */

struct hvm_exit {
    uint32_t reason;        /* KVM_EXIT_* */
    uint8_t  direction;     /* IO: KVM_EXIT_IO_IN / _OUT; MMIO: 1 = write */
    uint8_t  size;          /* IO: 1, 2 or 4; MMIO: length */
    uint16_t port;
    uint32_t count;         /* IO: repeat count */
    uint64_t address;       /* MMIO: guest physical address */
    uint8_t  data[8];       /* OUT / MMIO write data (first element) */
    uint64_t hw_reason;     /* FAIL_ENTRY / INTERNAL_ERROR / SHUTDOWN detail */
};

struct hvm_runner {
    int vcpu_fd;
    struct kvm_run *run;
    uint32_t run_size;      /* bytes mapped at run (KVM_GET_VCPU_MMAP_SIZE) */
    uint16_t console_port;
    pthread_mutex_t lock;
    int in_run;
    pthread_t thread;
    volatile int stop;
    struct hvm_exit exit;
    uint32_t console_len;
    uint8_t console[4096];
    uint32_t io_len;        /* KVM_EXIT_IO out: all size * count bytes */
    uint8_t io_data[4096];
    uint64_t exits;         /* KVM_RUN returns with an exit, those finished here included */
};

static int hvm_kick_signal(void) { return SIGRTMIN + 3; }

static void hvm_kick_handler(int sig) { (void)sig; }

int hvm_init_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = hvm_kick_handler;   /* no SA_RESTART: KVM_RUN gets EINTR */
    sigemptyset(&sa.sa_mask);
    if (sigaction(hvm_kick_signal(), &sa, NULL) < 0)
        return -errno;
    return 0;
}

int hvm_runner_init(struct hvm_runner *r, int vcpu_fd, struct kvm_run *run,
                    uint32_t run_size, uint16_t console_port)
{
    memset(r, 0, sizeof(*r));
    r->vcpu_fd = vcpu_fd;
    r->run = run;
    r->run_size = run_size;
    r->console_port = console_port;
    return -pthread_mutex_init(&r->lock, NULL);
}

void hvm_runner_destroy(struct hvm_runner *r)
{
    pthread_mutex_destroy(&r->lock);
}

/* Ask a running hvm_run to return HVM_STOPPED; sticky until hvm_unkick. */
void hvm_kick(struct hvm_runner *r)
{
    pthread_mutex_lock(&r->lock);
    r->stop = 1;
    __atomic_store_n(&r->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    if (r->in_run)
        pthread_kill(r->thread, hvm_kick_signal());
    pthread_mutex_unlock(&r->lock);
}

void hvm_unkick(struct hvm_runner *r)
{
    pthread_mutex_lock(&r->lock);
    r->stop = 0;
    __atomic_store_n(&r->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&r->lock);
}

/* A port exit's data (size * count bytes at data_offset) lies inside the mapped kvm_run
 * area, after the struct, and its size is one KVM uses: nothing is read or written
 * outside the mapping whatever the exit says (tools/fuzz/runloop_fuzz.c). */
static int io_fits(const struct hvm_runner *r)
{
    const struct kvm_run *run = r->run;
    uint64_t n = (uint64_t)run->io.size * run->io.count;
    return (run->io.size == 1 || run->io.size == 2 || run->io.size == 4)
        && run->io.data_offset >= sizeof(*run) && run->io.data_offset <= r->run_size
        && n <= r->run_size - run->io.data_offset;
}

static void fill_exit(struct hvm_runner *r)
{
    struct kvm_run *run = r->run;
    struct hvm_exit *e = &r->exit;
    memset(e, 0, sizeof(*e));
    e->reason = run->exit_reason;
    switch (run->exit_reason) {
    case KVM_EXIT_IO:
        e->direction = run->io.direction;
        e->size = run->io.size;
        e->port = run->io.port;
        e->count = run->io.count;
        if (run->io.direction == KVM_EXIT_IO_OUT) {
            uint32_t n = (uint32_t)run->io.size * run->io.count;
            if (n > sizeof(r->io_data))
                n = sizeof(r->io_data);
            memcpy(r->io_data, (uint8_t *)run + run->io.data_offset, n);
            r->io_len = n;
            memcpy(e->data, r->io_data, run->io.size <= 8 ? run->io.size : 8);
        }
        break;
    case KVM_EXIT_MMIO:
        e->direction = run->mmio.is_write;
        e->size = run->mmio.len > 8 ? 8 : run->mmio.len;
        e->address = run->mmio.phys_addr;
        memcpy(e->data, run->mmio.data, 8);
        break;
    case KVM_EXIT_FAIL_ENTRY:
        e->hw_reason = run->fail_entry.hardware_entry_failure_reason;
        break;
    case KVM_EXIT_INTERNAL_ERROR:
        e->hw_reason = run->internal.suberror;
        break;
    case KVM_EXIT_SYSTEM_EVENT:
        e->hw_reason = run->system_event.type;
        break;
    default:
        break;
    }
}

/* Returns HVM_STOPPED, HVM_CONSOLE, HVM_EXIT, or -errno. */
int hvm_run(struct hvm_runner *r)
{
    struct kvm_run *run = r->run;
    int ret;

    pthread_mutex_lock(&r->lock);
    r->thread = pthread_self();
    r->in_run = 1;
    pthread_mutex_unlock(&r->lock);

    for (;;) {
        if (ioctl(r->vcpu_fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                if (r->stop) {
                    ret = HVM_STOPPED;
                    break;
                }
                continue;
            }
            ret = -errno;
            break;
        }
        r->exits++;
        if (run->exit_reason == KVM_EXIT_IO && !io_fits(r)) {
            ret = -EPROTO;              /* a port exit this loop cannot decode */
            break;
        }
        if (run->exit_reason == KVM_EXIT_IO && run->io.port == r->console_port
            && run->io.direction == KVM_EXIT_IO_OUT && run->io.size == 1) {
            const uint8_t *p = (const uint8_t *)run + run->io.data_offset;
            uint32_t n = run->io.count, i;
            int newline = 0;
            for (i = 0; i < n; i++) {
                if (r->console_len < sizeof(r->console))
                    r->console[r->console_len++] = p[i];
                newline |= p[i] == '\n';
            }
            if (newline || r->console_len >= sizeof(r->console) - 256) {
                ret = HVM_CONSOLE;
                break;
            }
            continue;
        }
        if (run->exit_reason == KVM_EXIT_IO && run->io.port == HVM_NULL_PORT) {
            if (run->io.direction == KVM_EXIT_IO_IN)    /* benchmark port: reads 0 */
                memset((uint8_t *)run + run->io.data_offset, 0,
                       (size_t)run->io.size * run->io.count);
            continue;
        }
        fill_exit(r);
        ret = HVM_EXIT;
        break;
    }

    pthread_mutex_lock(&r->lock);
    r->in_run = 0;
    pthread_mutex_unlock(&r->lock);
    return ret;
}

/* Data for a pending port read: copied into the kvm_run page; the next
 * KVM_RUN completes the instruction. */
void hvm_complete_io_in(struct hvm_runner *r, const uint8_t *data, uint32_t len)
{
    struct kvm_run *run = r->run;
    uint32_t want;
    if (run->exit_reason != KVM_EXIT_IO || !io_fits(r))
        return;
    want = (uint32_t)run->io.size * run->io.count;
    memset((uint8_t *)run + run->io.data_offset, 0, want);
    memcpy((uint8_t *)run + run->io.data_offset, data, len < want ? len : want);
}

void hvm_complete_mmio_read(struct hvm_runner *r, const uint8_t *data, uint32_t len)
{
    memcpy(r->run->mmio.data, data, len < 8 ? len : 8);
}

/* Set bit positions of a dirty bitmap, in order, as page numbers offset by
 * base.  out must hold popcount(bitmap) entries; returns how many written. */
size_t hvm_bitmap_pfns(const uint64_t *bitmap, size_t nwords, uint64_t base,
                       uint64_t *out)
{
    size_t n = 0, w;
    for (w = 0; w < nwords; w++) {
        uint64_t word = bitmap[w];
        while (word) {
            out[n++] = base + w * 64 + (uint64_t)__builtin_ctzll(word);
            word &= word - 1;
        }
    }
    return n;
}

/* OR bitmap from into bitmap into (nwords 64-bit words each); the bits now set in into */
size_t hvm_bitmap_or(uint64_t *into, const uint64_t *from, size_t nwords)
{
    size_t set = 0, w;
    for (w = 0; w < nwords; w++) {
        into[w] |= from[w];
        set += (size_t)__builtin_popcountll(into[w]);
    }
    return set;
}

/* The reverse: set the bit of each of the n pfns that falls in the bitmap's nwords * 64
   pages from base (the others are skipped); how many bits were set. */
size_t hvm_pfns_bitmap(const uint64_t *pfns, size_t n, uint64_t base, uint64_t *bitmap,
                       size_t nwords)
{
    size_t set = 0, i;
    for (i = 0; i < n; i++) {
        uint64_t at = pfns[i] - base;
        if (pfns[i] < base || at >= (uint64_t)nwords * 64)
            continue;
        bitmap[at / 64] |= 1ull << (at % 64);
        set++;
    }
    return set;
}
