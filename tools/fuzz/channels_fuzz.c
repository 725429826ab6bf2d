/* libFuzzer harness for the data plane's channel receiver (migrate/dataplane/dataplane.c:
 * dp_receiver_*, channel_main, on_sync, barrier, place_batch; compiled apart with coverage
 * by tools/fuzz_c.py): what a relocation's destination does with the bytes of its data
 * channels (specs/stream-format.md "Channel streams"). Plain channels, no TLS.
 *
 * An input is a setup and the byte streams of one to three channels:
 *
 *   byte 0    bits 0-1 channels - 1 (3: one); bit 2 open the receiver only once the first
 *             bytes were written (else before the channels are added); bits 3-4 the stub
 *             space (0 none, 1 checked and dropped, 2 memory, 3 a memfd); bit 5 recompute
 *             every record's CRC before sending; bit 6 recompute every CHANNEL_SYNC's
 *             round, counts, offset and digest; bit 7 the guest's pfns from 2^40 on
 *   byte 1    bits 0-1 guest ranges - 1 (3: three); bits 2-4 which of them are memfds;
 *             bits 5-6 the end: 0, 1 wait for every FINAL sync, then close; 2 close at once
 *             once the bytes are written (the channels may be reading); 3 the same while
 *             another thread waits for the FINAL syncs; bit 7 the handoff on channel 0
 *             (specs/relocation.md): what follows its FINAL sync is held back until every
 *             FINAL was read and the handoff taken (as a source sends GO only after READY),
 *             then read as GO
 *   2..4      pages of each guest range, 1 + b % 8
 *   5         the gaps between ranges, 1 + 2 bits each
 *   6..7      the guest's first pfn (u16)
 *   8         stub pages, 1 + b % 4; its first pfn b >> 2
 *   9..       a u24 length for each channel but the last, then the streams back to back
 *
 * The guest's memory is a model: ranges of guard-paged mappings (a write past a range
 * faults), some written through a memfd whose pages around the range's part are sentinels.
 * The streams go through socketpairs the receiver reads; then it waits for every FINAL sync
 * (a hang is a failure) and closes. After each input:
 *
 * - the verdict equals that of a checker here, written from the spec: accepted exactly when
 *   every channel is well formed (header, framing, CRC, padding, types, batches, zstd
 *   frames, syncs and their digests, nothing after FINAL), all end at the same round, and
 *   no pfn comes twice in one round over all channels;
 * - accepted: each channel's summary is the checker's (rounds, records, pages, bytes,
 *   digest, FINAL), and memory holds the last round's copy of every page;
 * - refused: the error is one line naming a channel; with one channel, memory holds
 *   exactly the batches before the refused record (nothing of it, all of those);
 * - closed early: any error is one line naming a channel; with one channel, memory holds
 *   the first k well-formed batches for some k;
 * - the handoff: taken whenever every FINAL was read and nothing failed, and it outlives
 *   the receiver's close; the bytes after channel 0's FINAL are GO (its PAUSED flag) exactly
 *   when their first 16 are one, else one line naming channel 0;
 * - always: the sentinels around every range are intact; every 64 inputs, no more file
 *   descriptors or threads than before the first. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>
#include <zlib.h>
#include <zstd.h>

struct dp_receiver;
struct dp_channel_summary {
    uint32_t index, rounds, final, reserved;
    uint64_t records, pages, bytes;
    uint8_t digest[16];
};
struct dp_receiver *dp_receiver_new(int nchannels, uint32_t version, const uint8_t token[32], void *tls_ctx,
                                    double timeout, double handshake, char *err, size_t errlen);
int dp_receiver_set_space(struct dp_receiver *r, uint32_t space, uint32_t n, const uint64_t *first,
                          const uint64_t *count, uint8_t *const *base, const int *fds, const uint64_t *fd_offs,
                          char *err, size_t errlen);
void dp_receiver_open(struct dp_receiver *r);
int dp_receiver_add(struct dp_receiver *r, int index, int fd, char *err, size_t errlen);
int dp_receiver_wait(struct dp_receiver *r, uint32_t round, int final, double timeout, char *err, size_t errlen);
void dp_receiver_summary(struct dp_receiver *r, struct dp_channel_summary *out, double *place_seconds,
                         uint64_t *placed_bytes);
void dp_receiver_close(struct dp_receiver *r);
void dp_receiver_free(struct dp_receiver *r);
int dp_receiver_error(struct dp_receiver *r, char *err, size_t errlen);
struct dp_handoff;
void dp_receiver_set_handoff(struct dp_receiver *r);
struct dp_handoff *dp_receiver_handoff(struct dp_receiver *r, char *err, size_t errlen);
int dp_handoff_fd(struct dp_handoff *h);
int dp_handoff_go(struct dp_handoff *h, int *paused, char *err, size_t errlen);
void dp_handoff_free(struct dp_handoff *h);

#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "channels_fuzz: check failed: %s (line %d)\n", \
                                                #cond, __LINE__); abort(); } } while (0)

#define PAGE 4096u
#define MAXP 8u                         /* pages of a range at most */
#define SLOTS 4u                        /* three guest ranges, the stub's */
#define MAXCH 3
#define VERSION 2u
#define HDR 48u
#define SYNC_LEN 56u
#define MAX_BATCH 1024u
#define MAX_WINDOW (4u << 20)
#define MAX_PAGE_BODY (8u + 16u * MAX_BATCH + ZSTD_COMPRESSBOUND(MAX_BATCH * PAGE))
#define SENTINEL 0xA5
#define TIMEOUT 5.0

static const uint8_t MAGIC[8] = {0x89, 'H', 'V', 'M', 'C', 'H', 'A', 'N'};
static uint8_t token[32];

static uint32_t get32(const uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t get64(const uint8_t *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++, v >>= 8) p[i] = (uint8_t)v; }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++, v >>= 8) p[i] = (uint8_t)v; }
static uint32_t padded(uint32_t n) { return (n + 7) & ~7u; }

/* -- the model memory ----------------------------------------------------------------
 * A slot is either an anonymous mapping [guard][MAXP pages][guard], the range at its top
 * (ending at the guard) and the pages below it sentinels; or a memfd of MAXP + 2 pages
 * mapped between guards, the range's part ending before its last page, every other page
 * a sentinel. */
struct slot {
    uint8_t *anon;                      /* MAXP pages */
    int fd;
    uint8_t *view;                      /* the memfd's MAXP + 2 pages */
    uint8_t model[MAXP * PAGE];
    /* this input's range */
    int use_fd;
    uint64_t first, count;
    uint8_t *base;
    uint64_t fd_off;
};
static struct slot slots[SLOTS];

static uint8_t *guarded(size_t pages)
{
    uint8_t *p = mmap(NULL, (pages + 2) * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(p != MAP_FAILED);
    return p + PAGE;
}

static void slots_init(void)
{
    for (unsigned s = 0; s < SLOTS; s++) {
        struct slot *sl = &slots[s];
        sl->anon = guarded(MAXP);
        CHECK(mprotect(sl->anon, MAXP * PAGE, PROT_READ | PROT_WRITE) == 0);
        sl->fd = memfd_create("channels-fuzz", MFD_CLOEXEC);
        CHECK(sl->fd >= 0 && ftruncate(sl->fd, (MAXP + 2) * PAGE) == 0);
        sl->view = guarded(MAXP + 2);
        CHECK(mmap(sl->view, (MAXP + 2) * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, sl->fd, 0)
              == sl->view);
    }
}

/* lay range `s` out for this input: zero range, sentinels around it, zero model */
static void slot_set(struct slot *sl, uint64_t first, uint64_t count, int use_fd)
{
    sl->first = first;
    sl->count = count;
    sl->use_fd = use_fd;
    if (use_fd) {
        sl->fd_off = (MAXP + 1 - count) * PAGE;
        sl->base = sl->view + sl->fd_off;
        memset(sl->view, SENTINEL, (MAXP + 2) * PAGE);
    } else {
        sl->fd_off = 0;
        sl->base = sl->anon + (MAXP - count) * PAGE;
        memset(sl->anon, SENTINEL, MAXP * PAGE);
    }
    memset(sl->base, 0, count * PAGE);
    memset(sl->model, 0, count * PAGE);
}

static int all_sentinel(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != SENTINEL)
            return 0;
    return 1;
}

static void slot_check_sentinels(const struct slot *sl)
{
    if (sl->use_fd) {
        CHECK(all_sentinel(sl->view, sl->fd_off));
        CHECK(all_sentinel(sl->base + sl->count * PAGE, PAGE));
    } else {
        CHECK(all_sentinel(sl->anon, sl->base - sl->anon));
    }
}

/* -- the setup -------------------------------------------------------------------------- */
struct setup {
    int nch, open_late, stub_mode, fix_crc, fix_sync, end, handoff;
    unsigned nguest;                    /* slots 0..nguest-1; slot 3 the stub's */
};

/* -- the checker: a channel stream as specs/stream-format.md reads it ------------------- */
struct batch { const uint8_t *body; uint32_t len, type, round; };

struct verdict {
    int ok;                             /* the whole channel is well formed */
    uint32_t syncs;                     /* CHANNEL_SYNCs read (rounds ended) */
    int final;
    uint64_t records, pages, bytes;     /* at the FINAL sync */
    uint8_t digest[16];
    struct batch *batches;              /* the well-formed batches before the first error */
    uint32_t nbatches;
};

static const struct slot *slot_of(const struct setup *su, uint32_t space, uint64_t pfn)
{
    unsigned lo = space == 0 ? 0 : SLOTS - 1, hi = space == 0 ? su->nguest : SLOTS;
    if (space == 1 && su->stub_mode == 0)
        return NULL;
    for (unsigned s = lo; s < hi; s++)
        if (pfn >= slots[s].first && pfn - slots[s].first < slots[s].count)
            return &slots[s];
    return NULL;
}

/* a page's position in one bitmap over every slot */
static unsigned slot_pos(const struct slot *sl, uint64_t pfn)
{
    return (unsigned)((sl - slots) * MAXP + (pfn - sl->first));
}

static ZSTD_DCtx *dctx;
static uint8_t scratch[MAX_BATCH * PAGE];

/* RFC 8878 3.1.1.1: a frame as the spec allows it; 1 with its content in scratch */
static int zstd_ok(const uint8_t *d, size_t n, size_t expect)
{
    if (n < 6 || get32(d) != 0xFD2FB528u)
        return 0;
    uint8_t fhd = d[4];
    unsigned fcs_code = fhd >> 6, single = (fhd >> 5) & 1, did_code = fhd & 3;
    static const unsigned did_size[4] = {0, 1, 2, 4};
    unsigned fcs_size = fcs_code == 0 ? single : 1u << fcs_code;
    size_t at = 5 + !single;
    if (n < at + did_size[did_code] + fcs_size || !fcs_size)
        return 0;                       /* no content size */
    uint64_t did = 0, fcs = 0;
    for (unsigned i = 0; i < did_size[did_code]; i++)
        did |= (uint64_t)d[at + i] << (8 * i);
    at += did_size[did_code];
    for (unsigned i = 0; i < fcs_size; i++)
        fcs |= (uint64_t)d[at + i] << (8 * i);
    if (fcs_size == 2)
        fcs += 256;
    if (did || fcs != expect)
        return 0;
    if (!single) {
        uint64_t base = 1ull << (10 + (d[5] >> 3));
        if (base + base / 8 * (d[5] & 7) > MAX_WINDOW)
            return 0;
    }
    if (ZSTD_findFrameCompressedSize(d, n) != n)   /* an error is never n */
        return 0;
    size_t got = ZSTD_decompressDCtx(dctx, scratch, expect, d, n);
    return !ZSTD_isError(got) && got == expect;
}

/* a PAGE_DATA(_ZSTD) body: 1 if it is well formed for the receiver's memory */
static int batch_ok(const struct setup *su, uint32_t type, const uint8_t *b, uint32_t len)
{
    if (len < 8)
        return 0;
    uint32_t space = get32(b), n = get32(b + 4);
    if (space > 1 || n < 1 || n > MAX_BATCH || len < 8 + 16 * (uint64_t)n)
        return 0;
    uint32_t data_type = type == 3 ? 0 : 2, ndata = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *e = b + 8 + 16 * i;
        uint32_t pt = get32(e + 8);
        if ((pt != 1 && pt != data_type) || get32(e + 12) || !slot_of(su, space, get64(e)))
            return 0;
        ndata += pt == data_type;
    }
    size_t datalen = len - 8 - 16 * (size_t)n, expect = (size_t)ndata * PAGE;
    if (type == 3 || !ndata)
        return datalen == (type == 3 ? expect : 0);
    return zstd_ok(b + 8 + 16 * (size_t)n, datalen, expect);
}

/* each pfn once a round: mark the batch's pfns in `seen`; 0 at a second one */
static int mark(const struct setup *su, const struct batch *bt, uint8_t *seen)
{
    uint32_t space = get32(bt->body), n = get32(bt->body + 4);
    for (uint32_t i = 0; i < n; i++) {
        uint64_t pfn = get64(bt->body + 8 + 16 * i);
        unsigned pos = slot_pos(slot_of(su, space, pfn), pfn);
        if (seen[pos])
            return 0;
        seen[pos] = 1;
    }
    return 1;
}

static void judge(const struct setup *su, int index, const uint8_t *p, size_t n, struct verdict *v)
{
    memset(v, 0, sizeof *v);
    v->batches = malloc((n / 16 + 1) * sizeof *v->batches);
    CHECK(v->batches);
    if (n < HDR || memcmp(p, MAGIC, 8) || get32(p + 8) != VERSION || get32(p + 12) != (uint32_t)index ||
        memcmp(p + 16, token, 32))
        return;
    size_t off = HDR;
    uint64_t records = 0, pages = 0;
    uint8_t seen[SLOTS * MAXP] = {0};   /* this channel's pfns of the current round */
    for (;;) {
        if (n - off < 16)
            return;
        const uint8_t *h = p + off, *body = h + 16;
        uint32_t type = get32(h), len = get32(h + 4);
        if (get32(h + 8) || len > (type == 0x50 ? SYNC_LEN : MAX_PAGE_BODY) || n - off - 16 < padded(len))
            return;
        uint32_t crc = (uint32_t)crc32(crc32(0, h, 12), body, len);
        if (crc != get32(h + 12))
            return;
        for (uint32_t i = len; i < padded(len); i++)
            if (body[i])
                return;
        if (type == 0x50) {
            XXH128_canonical_t c;
            XXH128_canonicalFromHash(&c, XXH3_128bits(p, off));
            uint32_t flags = len == SYNC_LEN ? get32(body + 4) : 0;
            if (len != SYNC_LEN || flags > 1 || get64(body + 48) || get32(body) != v->syncs ||
                get64(body + 8) != records || get64(body + 16) != pages || get64(body + 24) != off ||
                memcmp(body + 32, c.digest, 16))
                return;
            v->syncs++;
            memset(seen, 0, sizeof seen);
            if (flags) {
                v->final = 1;
                v->records = records;
                v->pages = pages;
                v->bytes = off;
                memcpy(v->digest, c.digest, 16);
                off += 16 + SYNC_LEN;
                break;
            }
        } else {
            if ((type != 3 && type != 4) || !batch_ok(su, type, body, len))
                return;
            struct batch *bt = &v->batches[v->nbatches++];
            *bt = (struct batch){body, len, type, v->syncs};
            if (!mark(su, bt, seen)) {
                v->nbatches--;
                return;
            }
            pages += get32(body + 4);
        }
        records++;
        off += 16 + padded(len);
    }
    v->ok = off == n || (su->handoff && index == 0);    /* nothing after FINAL, but the handoff */
}

/* the streams as a whole: every channel well formed, the same rounds, each pfn once a
 * round over all channels */
static int judge_all(const struct setup *su, struct verdict *v)
{
    for (int c = 0; c < su->nch; c++)
        if (!v[c].ok || v[c].syncs != v[0].syncs)
            return 0;
    for (uint32_t round = 0; round < v[0].syncs; round++) {
        uint8_t seen[SLOTS * MAXP] = {0};
        for (int c = 0; c < su->nch; c++)
            for (uint32_t b = 0; b < v[c].nbatches; b++)
                if (v[c].batches[b].round == round && !mark(su, &v[c].batches[b], seen))
                    return 0;
    }
    return 1;
}

/* apply a batch to the model memory (the stub's dropped space has none) */
static void apply(const struct setup *su, const struct batch *bt)
{
    uint32_t space = get32(bt->body), n = get32(bt->body + 4), d = 0, data_type = bt->type == 3 ? 0 : 2, ndata = 0;
    if (space == 1 && su->stub_mode == 1)
        return;
    const uint8_t *data = bt->body + 8 + 16 * (size_t)n;
    for (uint32_t i = 0; i < n; i++)
        ndata += get32(bt->body + 8 + 16 * i + 8) == data_type;
    if (bt->type == 4 && ndata) {
        CHECK(ZSTD_decompressDCtx(dctx, scratch, (size_t)ndata * PAGE, data, bt->len - 8 - 16 * (size_t)n)
              == (size_t)ndata * PAGE);
        data = scratch;
    }
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *e = bt->body + 8 + 16 * i;
        uint64_t pfn = get64(e);
        struct slot *sl = (struct slot *)slot_of(su, space, pfn);
        uint8_t *page = sl->model + (pfn - sl->first) * PAGE;
        if (get32(e + 8) == 1)
            memset(page, 0, PAGE);
        else
            memcpy(page, data + (size_t)PAGE * d++, PAGE);
    }
}

/* -- fixing CRCs and syncs, as a structure-aware writer would ------------------------------ */
static void fix(const struct setup *su, uint8_t *p, size_t n)
{
    uint64_t records = 0, pages = 0;
    uint32_t syncs = 0;
    for (size_t off = HDR; n >= off + 16;) {
        uint8_t *h = p + off, *body = h + 16;
        uint32_t type = get32(h), len = get32(h + 4);
        if (len > MAX_PAGE_BODY || n - off - 16 < padded(len))
            break;
        if (type == 0x50 && len == SYNC_LEN && su->fix_sync) {
            XXH128_canonical_t c;
            XXH128_canonicalFromHash(&c, XXH3_128bits(p, off));
            put32(body, syncs);
            put64(body + 8, records);
            put64(body + 16, pages);
            put64(body + 24, off);
            memcpy(body + 32, c.digest, 16);
        }
        if (su->fix_crc)
            put32(h + 12, (uint32_t)crc32(crc32(0, h, 12), body, len));
        syncs += type == 0x50;
        pages += (type == 3 || type == 4) && len >= 8 ? get32(body + 4) : 0;
        records++;
        off += 16 + padded(len);
    }
}

/* -- leaks ---------------------------------------------------------------------------------- */
static int entries(const char *dir)
{
    DIR *d = opendir(dir);
    CHECK(d);
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;                           /* in /proc/self/fd, one more: opendir's */
}

/* The threads, once those joined a moment ago are gone from /proc/self/task: the kernel
 * wakes pthread_join as a thread's memory goes, a little before it unlists the task. A
 * leaked thread stays; a joined one is gone within the 100 ms given here. */
static int tasks_settled(int most)
{
    int n = entries("/proc/self/task");
    for (int i = 0; i < 100 && n > most; i++) {
        usleep(1000);
        n = entries("/proc/self/task");
    }
    return n;
}

/* -- closing early ------------------------------------------------------------------------ */
struct wait_args {
    struct dp_receiver *r;
    int rc;
    char err[600];
};

static void *wait_main(void *arg)
{
    struct wait_args *w = arg;
    w->rc = dp_receiver_wait(w->r, 0, 1, TIMEOUT, w->err, sizeof w->err);
    return NULL;
}

static void check_error(const char *e)
{
    CHECK(e[0] && strlen(e) < 599 && !strchr(e, '\n') && !strchr(e, '\r'));
    CHECK(strncmp(e, "channel ", 8) == 0);
}

static int memory_is_model(const struct setup *su)
{
    for (unsigned s = 0; s < SLOTS; s++)
        if ((s < su->nguest || s == SLOTS - 1) && memcmp(slots[s].base, slots[s].model, slots[s].count * PAGE))
            return 0;
    return 1;
}

static void early_end(const struct setup *su, struct dp_receiver *r, pthread_t waiter, struct wait_args *w,
                      int pair[][2], uint8_t **stream, const size_t *len)
{
    if (su->end == 3) {                 /* close while the waiter may be in dp_receiver_wait; free
                                         * once it is out (as the Python wrapper does: its waits
                                         * hold a reference) */
        dp_receiver_close(r);
        CHECK(pthread_join(waiter, NULL) == 0);
        if (w->rc < 0)
            check_error(w->err);
        dp_receiver_free(r);
    } else {
        dp_receiver_close(r);
        char e[600];
        if (dp_receiver_error(r, e, sizeof e))
            check_error(e);
        dp_receiver_free(r);
    }
    for (int c = 0; c < su->nch; c++) {
        close(pair[c][0]);
        close(pair[c][1]);
    }
    for (unsigned s = 0; s < SLOTS; s++)
        if (s < su->nguest || s == SLOTS - 1)
            slot_check_sentinels(&slots[s]);
    if (su->nch == 1) {                 /* the first k batches, for some k */
        struct verdict v;
        judge(su, 0, stream[0], len[0], &v);
        int match = memory_is_model(su);
        for (uint32_t b = 0; b < v.nbatches && !match; b++) {
            apply(su, &v.batches[b]);
            match = memory_is_model(su);
        }
        CHECK(match);
        free(v.batches);
    }
    for (int c = 0; c < su->nch; c++)
        free(stream[c]);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    for (int i = 0; i < 32; i++)
        token[i] = (uint8_t)i;
    slots_init();
    dctx = ZSTD_createDCtx();
    CHECK(dctx);
    return 0;
}

static uint64_t take(const uint8_t **p, size_t *n, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes && *n; i++, (*n)--)
        v |= (uint64_t)*(*p)++ << (8 * i);
    return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static long inputs;
    static int fds0, tasks0;
    if (inputs == 0) {
        fds0 = entries("/proc/self/fd");
        tasks0 = entries("/proc/self/task");
    }
    if (++inputs % 64 == 0) {
        CHECK(entries("/proc/self/fd") <= fds0);
        CHECK(tasks_settled(tasks0) <= tasks0);
    }
    if (size < 10)
        return 0;
    struct setup su;
    uint8_t b0 = data[0], b1 = data[1];
    su.nch = 1 + (b0 & 3) % 3;
    su.open_late = b0 >> 2 & 1;
    su.stub_mode = b0 >> 3 & 3;
    su.fix_crc = b0 >> 5 & 1;
    su.fix_sync = b0 >> 6 & 1;
    su.nguest = 1 + (b1 & 3) % 3;
    su.end = b1 >> 5 & 3;
    su.handoff = b1 >> 7 & 1;
    uint64_t at = (data[6] | (uint64_t)data[7] << 8) + (b0 & 0x80 ? 1ull << 40 : 0);
    for (unsigned s = 0; s < su.nguest; s++) {
        uint64_t count = 1 + data[2 + s] % MAXP;
        slot_set(&slots[s], at, count, b1 >> (2 + s) & 1);
        at += count + 1 + (data[5] >> (2 * s) & 3);
    }
    slot_set(&slots[SLOTS - 1], data[8] >> 2, 1 + data[8] % 4, su.stub_mode == 3);

    /* the streams */
    const uint8_t *p = data + 9;
    size_t left = size - 9, len[MAXCH];
    for (int c = 0; c < su.nch - 1; c++)
        len[c] = take(&p, &left, 3);
    uint8_t *stream[MAXCH];
    for (int c = 0; c < su.nch; c++) {
        if (c == su.nch - 1 || len[c] > left)
            len[c] = left;
        stream[c] = malloc(len[c] + 1);
        CHECK(stream[c]);
        memcpy(stream[c], p, len[c]);
        p += len[c];
        left -= len[c];
        fix(&su, stream[c], len[c]);
    }

    /* the receiver */
    char err[600];
    struct dp_receiver *r = dp_receiver_new(su.nch, VERSION, token, NULL, TIMEOUT, TIMEOUT, err, sizeof err);
    CHECK(r);
    size_t hold = 0;                    /* the handoff: channel 0's bytes after its FINAL, held back */
    if (su.handoff) {
        dp_receiver_set_handoff(r);
        struct verdict v0;
        judge(&su, 0, stream[0], len[0], &v0);
        if (v0.final)
            hold = len[0] - (v0.bytes + 16 + SYNC_LEN);
        free(v0.batches);
    }
    uint64_t first[3], count[3], offs[3];
    uint8_t *base[3];
    int fds[3];
    for (unsigned s = 0; s < su.nguest; s++) {
        first[s] = slots[s].first;
        count[s] = slots[s].count;
        base[s] = slots[s].base;
        fds[s] = slots[s].use_fd ? slots[s].fd : -1;
        offs[s] = slots[s].fd_off;
    }
    CHECK(dp_receiver_set_space(r, 0, su.nguest, first, count, base, fds, offs, err, sizeof err) == 0);
    if (su.stub_mode) {
        struct slot *st = &slots[SLOTS - 1];
        int fd = st->use_fd ? st->fd : -1;
        CHECK(dp_receiver_set_space(r, 1, 1, &st->first, &st->count, su.stub_mode == 1 ? NULL : &st->base,
                                    &fd, &st->fd_off, err, sizeof err) == 0);
    }
    if (!su.open_late)
        dp_receiver_open(r);
    int pair[MAXCH][2];
    for (int c = 0; c < su.nch; c++) {
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair[c]) == 0);
        CHECK(fcntl(pair[c][0], F_SETFL, O_NONBLOCK) == 0);
        CHECK(dp_receiver_add(r, c, pair[c][1], err, sizeof err) == 0);
    }
    pthread_t waiter;
    struct wait_args wait_args = {r, 0, ""};
    if (su.end == 3)
        CHECK(pthread_create(&waiter, NULL, wait_main, &wait_args) == 0);

    /* write every stream (the receiver reads them meanwhile), then end them */
    size_t sent[MAXCH] = {0};
    int done[MAXCH] = {0}, pending = su.nch;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (pending) {
        struct pollfd pf[MAXCH];
        for (int c = 0; c < su.nch; c++)
            pf[c] = (struct pollfd){done[c] ? -1 : pair[c][0], POLLOUT, 0};
        int ready = poll(pf, su.nch, 100);
        CHECK(ready >= 0 || errno == EINTR);
        for (int c = 0; c < su.nch; c++) {
            if (done[c] || !pf[c].revents)
                continue;
            size_t upto = len[c] - (c ? 0 : hold);
            ssize_t w = sent[c] < upto ? send(pair[c][0], stream[c] + sent[c], upto - sent[c], MSG_NOSIGNAL) : 0;
            if (w > 0)
                sent[c] += w;
            if (sent[c] == upto || (w < 0 && errno != EAGAIN && errno != EINTR)) {
                if (c || !hold)
                    shutdown(pair[c][0], SHUT_WR);
                done[c] = 1;
                pending--;
            }
            clock_gettime(CLOCK_MONOTONIC, &t0);
        }
        if (su.open_late)
            dp_receiver_open(r);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        CHECK(t1.tv_sec - t0.tv_sec < 2 * TIMEOUT);     /* a receiver that reads nothing */
    }
    dp_receiver_open(r);
    if (su.end >= 2) {                  /* closed while the channels may still be reading */
        early_end(&su, r, waiter, &wait_args, pair, stream, len);
        return 0;
    }
    int rc = dp_receiver_wait(r, 0, 1, TIMEOUT, err, sizeof err);
    if (rc == 0)
        fprintf(stderr, "channels_fuzz: no FINAL within %g s and no error\n", TIMEOUT);
    CHECK(rc != 0);
    struct dp_handoff *h = NULL;
    if (su.handoff && rc == 1) {
        char why[600];
        h = dp_receiver_handoff(r, why, sizeof why);
        CHECK(h || dp_receiver_error(r, why, sizeof why));
    }
    if (hold) {                         /* GO, after the handoff was taken */
        for (size_t at = len[0] - hold; h && at < len[0];) {
            ssize_t w = send(pair[0][0], stream[0] + at, len[0] - at, MSG_NOSIGNAL);
            if (w > 0)
                at += w;
            else if (w < 0 && errno == EAGAIN)
                poll(&(struct pollfd){pair[0][0], POLLOUT, 0}, 1, 100);
            else
                break;
        }
        shutdown(pair[0][0], SHUT_WR);
    }
    dp_receiver_close(r);
    if (h) {                            /* it outlives the receiver's close */
        const uint8_t *go = stream[0] + len[0] - hold;
        int want = hold >= 16 && !memcmp(go, "\x89HVMGO!1", 8) && get32(go + 8) <= 1 && !get32(go + 12);
        int paused = -1, g;
        char why[600];
        for (int tries = 0; (g = dp_handoff_go(h, &paused, why, sizeof why)) == 0 && tries < 50; tries++)
            poll(&(struct pollfd){dp_handoff_fd(h), POLLIN, 0}, 1, 100);
        if (want)
            CHECK(g == 1 && paused == (int)get32(go + 8));
        else
            CHECK(g == -1 && strncmp(why, "channel 0: ", 11) == 0 && !strchr(why, '\n'));
        dp_handoff_free(h);
    }
    char later[600];
    int failed = dp_receiver_error(r, later, sizeof later) != 0;
    CHECK(rc == 1 || failed);
    if (rc < 0)
        CHECK(strcmp(err, later) == 0);
    struct dp_channel_summary sum[MAXCH];
    double place_seconds;
    uint64_t placed_bytes;
    dp_receiver_summary(r, sum, &place_seconds, &placed_bytes);
    dp_receiver_free(r);
    for (int c = 0; c < su.nch; c++) {
        close(pair[c][0]);
        close(pair[c][1]);
    }

    /* the verdict against the checker's */
    struct verdict v[MAXCH];
    for (int c = 0; c < su.nch; c++)
        judge(&su, c, stream[c], len[c], &v[c]);
    int ok = judge_all(&su, v);
    if (getenv("CHANNELS_FUZZ_VERBOSE"))
        fprintf(stderr, "channels_fuzz: %s%s\n", failed ? "refused: " : "accepted", failed ? later : "");
    if (ok == failed)
        fprintf(stderr, "channels_fuzz: the receiver %s, the checker %s (%s)\n", failed ? "refused" : "accepted",
                ok ? "accepts" : "refuses", failed ? later : "");
    CHECK(ok != failed);
    if (ok) {
        uint64_t data_pages = 0;
        for (int c = 0; c < su.nch; c++) {
            CHECK(sum[c].index == (uint32_t)c && sum[c].final == 1 && sum[c].rounds == v[c].syncs);
            CHECK(sum[c].records == v[c].records && sum[c].pages == v[c].pages && sum[c].bytes == v[c].bytes);
            CHECK(memcmp(sum[c].digest, v[c].digest, 16) == 0);
            for (uint32_t b = 0; b < v[c].nbatches; b++) {
                const uint8_t *body = v[c].batches[b].body;
                for (uint32_t i = 0, n = get32(body + 4); i < n; i++)
                    data_pages += get32(body + 8 + 16 * i + 8) != 1;
            }
        }
        CHECK(placed_bytes == data_pages * PAGE);
        for (uint32_t round = 0; round < v[0].syncs; round++)
            for (int c = 0; c < su.nch; c++)
                for (uint32_t b = 0; b < v[c].nbatches; b++)
                    if (v[c].batches[b].round == round)
                        apply(&su, &v[c].batches[b]);
    } else {
        CHECK(later[0] && strlen(later) < sizeof later - 1 && !strchr(later, '\n') && !strchr(later, '\r'));
        CHECK(strncmp(later, "channel ", 8) == 0);
        if (su.nch == 1)                /* what came before the refused record, and only that */
            for (uint32_t b = 0; b < v[0].nbatches; b++)
                apply(&su, &v[0].batches[b]);
    }
    for (unsigned s = 0; s < SLOTS; s++) {
        if (s >= su.nguest && s != SLOTS - 1)
            continue;
        slot_check_sentinels(&slots[s]);
        if (ok || su.nch == 1 || (s == SLOTS - 1 && su.stub_mode < 2))     /* no memory: untouched */
            CHECK(memcmp(slots[s].base, slots[s].model, slots[s].count * PAGE) == 0);
    }
    for (int c = 0; c < su.nch; c++) {
        free(v[c].batches);
        free(stream[c]);
    }
    return 0;
}
