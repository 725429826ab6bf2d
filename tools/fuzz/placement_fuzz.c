/* libFuzzer harness for the data plane's placement of page batches (dp_target_decode and
 * dp_target_write in migrate/dataplane/dataplane.c, compiled apart with coverage by
 * tools/fuzz_c.py): what a restore does with every PAGE_DATA and PAGE_DATA_ZSTD body of a
 * stream, before and while it writes guest memory. An input sets up one to three memory
 * ranges (heap blocks of their exact size, so ASan sees any write past them) and then
 * places up to eight batch bodies: entries and pages from the input, zstd frames
 * compressed here and then damaged as a hostile writer would (skippable frames, a
 * dictionary id, a large window, bad checksums, extra bytes, flipped bits), or raw bytes.
 *
 * After every call the memory is compared with a model: a refused batch changes nothing;
 * an accepted one leaves each of its data pages in place (the last copy wins) and zeroes a
 * page that held data when a ZERO entry comes for it. A refusal's message is one line. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

struct dp_target;
struct dp_target *dp_target_new(int slots, char *err, size_t errlen);
int dp_target_set_space(struct dp_target *t, uint32_t space, uint32_t n, const uint64_t *first,
                        const uint64_t *count, uint8_t *const *base, const int *fds, const uint64_t *fd_offs,
                        char *err, size_t errlen);
int dp_target_decode(struct dp_target *t, int slot, uint32_t type, const uint8_t *body, uint32_t len,
                     char *err, size_t errlen);
int dp_target_write(struct dp_target *t, int slot, uint64_t turn, uint32_t *npages, uint32_t *nzero,
                    char *err, size_t errlen);
void dp_target_free(struct dp_target *t);

#define PAGE 4096
#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "placement_fuzz: check failed: %s (line %d)\n", \
                                                #cond, __LINE__); abort(); } } while (0)

struct input { const uint8_t *p; size_t n; };

static uint64_t take(struct input *in, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes && in->n; i++, in->n--)
        v |= (uint64_t)*in->p++ << (8 * i);
    return v;
}

static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++, v >>= 8) p[i] = (uint8_t)v; }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++, v >>= 8) p[i] = (uint8_t)v; }

#define MAX_RANGES 3
#define MAX_ENTRIES 48
static uint64_t first[MAX_RANGES], count[MAX_RANGES];
static uint8_t *mem[MAX_RANGES], *model[MAX_RANGES], *written[MAX_RANGES];
static uint32_t nranges;

static int where(uint64_t pfn, uint64_t *at)        /* the range of pfn, or -1 */
{
    for (uint32_t r = 0; r < nranges; r++)
        if (pfn >= first[r] && pfn - first[r] < count[r]) {
            *at = pfn - first[r];
            return (int)r;
        }
    return -1;
}

static uint64_t pick_pfn(struct input *in)
{
    uint8_t b = (uint8_t)take(in, 1);
    if (b >= 0xF0)
        return take(in, 8);                 /* anywhere */
    uint32_t r = b % nranges;
    return first[r] + take(in, 1) % (count[r] + (b & 0x40 ? 2 : 0));   /* sometimes just past */
}

/* The pfn of the entry before e, plus one: runs of consecutive pages. */
static uint64_t get_pfn_prev_impl(const uint8_t *e)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | e[i - 16];
    return v + 1;
}

static size_t make_body(struct input *in, uint8_t *body, size_t cap, uint32_t *type)
{
    uint8_t how = (uint8_t)take(in, 1);
    *type = how & 1 ? 4 : 3;
    if ((how & 0x0E) == 0x0E) {             /* raw bytes */
        size_t n = take(in, 2) % cap;
        for (size_t i = 0; i < n && in->n; i++)
            body[i] = (uint8_t)take(in, 1);
        return n;
    }
    uint32_t n = 1 + (uint32_t)take(in, 1) % MAX_ENTRIES, data_type = *type == 3 ? 0 : 2, ndata = 0;
    put32(body, how & 0x10 ? (uint32_t)take(in, 1) % 3 : 0);
    put32(body + 4, how & 0x20 ? (uint32_t)take(in, 2) : n);
    static uint8_t pages[MAX_ENTRIES * PAGE];
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *e = body + 8 + 16 * i;
        uint8_t kind = (uint8_t)take(in, 1);
        uint32_t ptype = kind & 0x80 ? kind % 4 : (kind & 1 ? 1 : data_type);
        put64(e, (how & 0x40) && i ? get_pfn_prev_impl(e) : pick_pfn(in));
        put32(e + 8, ptype);
        put32(e + 12, kind == 0x7F ? 1 : 0);
        if (ptype == data_type)
            memset(pages + (size_t)PAGE * ndata++, (int)(take(in, 1) | 1), PAGE);
    }
    size_t at = 8 + 16 * (size_t)n;
    if (*type == 3) {
        size_t len = (size_t)PAGE * ndata;
        if (how & 0x80)
            len = take(in, 2) % (len + PAGE);
        memcpy(body + at, pages, len < cap - at ? len : cap - at);
        return at + (len < cap - at ? len : cap - at);
    }
    if (!ndata)
        return at;
    static ZSTD_CCtx *cctx;                 /* one context: creating one per batch is slow */
    if (!cctx)
        cctx = ZSTD_createCCtx();
    ZSTD_CCtx_reset(cctx, ZSTD_reset_session_and_parameters);
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, (how >> 2) & 1);
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, take(in, 1) != 0x55);
    size_t z = ZSTD_compress2(cctx, body + at, cap - at - 64, pages, (size_t)PAGE * ndata);
    CHECK(!ZSTD_isError(z));
    uint8_t *f = body + at;
    switch (take(in, 1) % 10) {             /* what a hostile writer does to the frame */
    case 0:                                 /* a skippable frame first */
        memmove(f + 12, f, z);
        put32(f, 0x184D2A50);
        put32(f + 4, 4);
        z += 12;
        break;
    case 1:                                 /* a dictionary id */
        if ((f[4] & 0x20) && !(f[4] & 3)) {
            memmove(f + 6, f + 5, z - 5);
            f[4] |= 1;
            f[5] = 7;
            z++;
        }
        break;
    case 2:                                 /* a window descriptor */
        if (f[4] & 0x20) {
            memmove(f + 6, f + 5, z - 5);
            f[4] &= (uint8_t)~0x20;
            f[5] = (uint8_t)take(in, 1);
            z++;
        }
        break;
    case 3:                                 /* bytes after it */
        f[z++] = (uint8_t)take(in, 1);
        break;
    case 4: case 5: {                       /* a flipped bit */
        size_t bit = take(in, 2) % (z * 8);
        f[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        break;
    }
    case 6:                                 /* cut short */
        z -= take(in, 1) % z;
        break;
    default:
        break;
    }
    return at + z;
}

/* Blocks of exact sizes kept per (range, pages) and reused: ASan still sees a write past
 * one, and the harness does not pay for fresh pages on every input. */
static uint8_t *blocks[3][MAX_RANGES][16];

static uint8_t *block(int kind, uint32_t r, uint64_t pages)
{
    if (!blocks[kind][r][pages])
        blocks[kind][r][pages] = malloc(kind == 2 ? pages : pages * PAGE);
    return blocks[kind][r][pages];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct input in = { data, size };
    char err[256];
    static struct dp_target *t;             /* one target, its spaces set again per input */
    if (!t)
        t = dp_target_new(1, err, sizeof err);
    CHECK(t);
    uint8_t head = (uint8_t)take(&in, 1);
    nranges = 1 + head % MAX_RANGES;
    uint64_t at = head & 0x80 ? take(&in, 8) : 0;
    for (uint32_t r = 0; r < nranges; r++) {
        first[r] = at;
        count[r] = 1 + take(&in, 1) % 12;
        at += count[r] + 1 + take(&in, 1) % 4;
        mem[r] = block(0, r, count[r]);
        model[r] = block(1, r, count[r]);
        written[r] = block(2, r, count[r]);
        memset(written[r], 0, count[r]);
        memset(mem[r], 0, count[r] * PAGE);
        memset(model[r], 0, count[r] * PAGE);
    }
    uint8_t *const bases[MAX_RANGES] = { mem[0], mem[1], mem[2] };
    int fds[MAX_RANGES] = { -1, -1, -1 };
    uint64_t offs[MAX_RANGES] = { 0 };
    int ok = dp_target_set_space(t, 0, nranges, first, count, bases, fds, offs, err, sizeof err) == 0;
    static uint8_t body[8 + 16 * 1100 + (MAX_ENTRIES + 2) * PAGE];
    for (int b = 0; ok && b < 8 && in.n; b++) {
        uint32_t type, npages = 0, nzero = 0;
        size_t len = make_body(&in, body, sizeof body, &type);
        int rc = dp_target_decode(t, 0, type, body, (uint32_t)len, err, sizeof err);
        if (rc == 0)                        /* checked completely: now written, in the next turn */
            rc = dp_target_write(t, 0, UINT64_MAX, &npages, &nzero, err, sizeof err);
        if (rc == 0) {                      /* apply the batch to the model */
            uint32_t n = (uint32_t)(body[4] | body[5] << 8 | body[6] << 16 | (uint32_t)body[7] << 24);
            uint32_t zeros = 0, d = 0;
            CHECK(npages == n && n >= 1 && n <= 1024);
            static uint8_t pages[1024 * PAGE];
            size_t plen = (size_t)PAGE * n;
            if (type == 3) {
                memcpy(pages, body + 8 + 16 * (size_t)n, len - 8 - 16 * (size_t)n);
            } else if (len > 8 + 16 * (size_t)n) {
                size_t got = ZSTD_decompress(pages, plen, body + 8 + 16 * (size_t)n, len - 8 - 16 * (size_t)n);
                CHECK(!ZSTD_isError(got));
            }
            for (uint32_t i = 0; i < n; i++) {
                const uint8_t *e = body + 8 + 16 * (size_t)i;
                uint64_t pfn = 0, off;
                for (int k = 7; k >= 0; k--)
                    pfn = pfn << 8 | e[k];
                int r = where(pfn, &off);
                CHECK(r >= 0);
                if (e[8] == 1) {
                    zeros++;
                    if (written[r][off])
                        memset(model[r] + off * PAGE, 0, PAGE);
                    written[r][off] = 0;
                } else {
                    memcpy(model[r] + off * PAGE, pages + (size_t)PAGE * d++, PAGE);
                    written[r][off] = 1;
                }
            }
            CHECK(nzero == zeros);
        } else {
            CHECK(strchr(err, '\n') == NULL && err[0]);
        }
        for (uint32_t r = 0; r < nranges; r++)
            CHECK(memcmp(mem[r], model[r], count[r] * PAGE) == 0);
    }
    return 0;
}
