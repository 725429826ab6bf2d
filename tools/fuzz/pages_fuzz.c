/* libFuzzer harness for the reader's C check of page entries, migrate.stream._pages (its
 * source is the string in migrate/stream/_build_pages.py; tools/fuzz_c.py writes it to
 * pages_impl.c). The entry table comes from the input, in a heap block of its exact size,
 * so ASan sees any access past it. hvm_check_entries is compared with a reference
 * (sort-based) on every input: the same first bad entry and reason, the same data count
 * and highest pfn. (The page loops of save and restore are the data plane's: see
 * placement_fuzz.c.) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The helpers' definitions (constants, get64, get32) for the harness's own use,
 * not instrumented; the functions under test come from pages_impl.c compiled apart with
 * coverage, so libFuzzer's comparison tracing is spent on them, not on the checks here. */
#define hvm_check_entries harness_unused_check
#define hvm_crc32 harness_unused_crc32
#define hvm_frame_records harness_unused_frame_records
#define hvm_record_crc harness_unused_record_crc
#include "pages_impl.c"
#undef hvm_check_entries
#undef hvm_crc32
#undef hvm_frame_records
#undef hvm_record_crc
int hvm_check_entries(const uint8_t *entries, uint32_t count, uint32_t data_type,
                      uint32_t *bad, uint32_t *n_data, uint64_t *max_pfn);

#define T_NORMAL 0
#define T_COMPRESSED 2

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++, v >>= 8)
        p[i] = (uint8_t)v;
}

#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "pages_fuzz: check failed: %s (line %d)\n", \
                                                #cond, __LINE__); abort(); } } while (0)

struct input { const uint8_t *p; size_t n; };

static uint64_t take(struct input *in, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes && in->n; i++, in->n--)
        v |= (uint64_t)*in->p++ << (8 * i);
    return v;
}

/* Heap blocks of exact sizes, kept per size and reused: ASan still sees an access one byte
 * past any of them, and the harness does not pay page faults for fresh blocks each run. */
#define SIZES 1200
static void *blocks[6][SIZES];

static void *block(int kind, uint64_t units, uint64_t unit)
{
    if (units >= SIZES)
        return malloc(units * unit + 1);
    if (!blocks[kind][units])
        blocks[kind][units] = malloc(units * unit + 1);
    return blocks[kind][units];
}

static void release(void *p, uint64_t units)
{
    if (units >= SIZES)
        free(p);
}



struct key { uint64_t pfn; uint32_t at; };

static int by_pfn(const void *a, const void *b)
{
    const struct key *x = a, *y = b;
    if (x->pfn != y->pfn)
        return x->pfn < y->pfn ? -1 : 1;
    return x->at < y->at ? -1 : x->at > y->at;
}

/* The reference: (error, bad entry, data pages, highest pfn). */
static int reference(const uint8_t *e, uint32_t count, uint32_t data_type, uint32_t *bad,
                     uint32_t *n_data, uint64_t *max_pfn)
{
    if (count > MAX_COUNT) {
        *bad = 0;
        return HVM_BAD_COUNT;
    }
    uint32_t first_field = UINT32_MAX, first_dup = UINT32_MAX;
    int field_err = 0;
    uint64_t top = 0;
    uint32_t data = 0;
    struct key *keys = malloc(sizeof(*keys) * (count ? count : 1));
    for (uint32_t i = 0; i < count; i++) {
        uint64_t pfn = get64(e + 16 * (uint64_t)i);
        uint32_t type = get32(e + 16 * (uint64_t)i + 8), reserved = get32(e + 16 * (uint64_t)i + 12);
        if (first_field == UINT32_MAX && (type != T_ZERO && type != data_type)) {
            first_field = i;
            field_err = HVM_BAD_TYPE;
        } else if (first_field == UINT32_MAX && reserved) {
            first_field = i;
            field_err = HVM_BAD_RESERVED;
        }
        keys[i].pfn = pfn;
        keys[i].at = i;
        if (pfn > top)
            top = pfn;
        data += type == data_type;
    }
    qsort(keys, count, sizeof(*keys), by_pfn);
    for (uint32_t i = 1; i < count; i++)
        if (keys[i].pfn == keys[i - 1].pfn && keys[i].at < first_dup)
            first_dup = keys[i].at;
    free(keys);
    if (first_field != UINT32_MAX && first_field <= first_dup) {
        *bad = first_field;
        return field_err;
    }
    if (first_dup != UINT32_MAX) {
        *bad = first_dup;
        return HVM_DUPLICATE;
    }
    *n_data = data;
    *max_pfn = top;
    return 0;
}

static void fill_entries(struct input *in, uint8_t *e, uint32_t count, uint64_t mem_pages)
{
    uint8_t style = (uint8_t)take(in, 1);
    for (uint32_t i = 0; i < count; i++) {
        uint8_t *p = e + 16 * (uint64_t)i;
        uint64_t pfn;
        switch (style & 3) {
        case 0: pfn = i; break;                                 /* ascending, as written */
        case 1: pfn = take(in, 1) % (mem_pages + 2); break;     /* near the end, repeats */
        case 2: pfn = (uint64_t)count - i; break;               /* descending: hashed */
        default: pfn = take(in, 8); break;
        }
        uint32_t type = style & 4 ? (uint32_t)take(in, 1) % 4 : (i % 3 == 0 ? T_ZERO : (style & 8 ? T_COMPRESSED : T_NORMAL));
        uint32_t reserved = style & 16 ? (uint32_t)(take(in, 1) == 0xA5) : 0;
        if ((style & 0x60) == 0x60 && in->n) {                  /* raw bytes for this entry */
            for (int j = 0; j < 16; j++)
                p[j] = (uint8_t)take(in, 1);
            continue;
        }
        put64(p, pfn);
        for (int j = 0; j < 4; j++) {
            p[8 + j] = (uint8_t)(type >> (8 * j));
            p[12 + j] = (uint8_t)(reserved >> (8 * j));
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct input in = { data, size };
    uint8_t head = (uint8_t)take(&in, 1);
    uint32_t count = head & 0x80 ? (uint32_t)take(&in, 2) % 1100 : (uint32_t)take(&in, 1) % 24;
    uint32_t data_type = head & 0x40 ? (uint32_t)take(&in, 1) % 4 : (head & 1 ? T_COMPRESSED : T_NORMAL);
    uint64_t mem_pages = 1 + take(&in, 1) % 16;
    uint8_t *entries = block(0, count, 16);
    fill_entries(&in, entries, count, mem_pages);
    uint32_t bad = 0, n_data = 0, rbad = 0, rn = 0;
    uint64_t max_pfn = 0, rmax = 0;
    int err = hvm_check_entries(entries, count, data_type, &bad, &n_data, &max_pfn);
    int rerr = reference(entries, count, data_type, &rbad, &rn, &rmax);
    CHECK(err == rerr);
    if (err)
        CHECK(bad == rbad);
    else
        CHECK(n_data == rn && (count == 0 || max_pfn == rmax));
    release(entries, count);
    return 0;
}
