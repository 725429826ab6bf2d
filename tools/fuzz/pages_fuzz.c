/* libFuzzer harness for the C page helpers of migrate.stream._pages (their source is the
 * string in migrate/stream/_build_pages.py; tools/fuzz_c.py writes it to pages_impl.c).
 * The entry table, the data and the memory sizes come from the input; memory, the written
 * map and the data are heap blocks of their exact sizes, so ASan sees any access past them.
 *
 * hvm_check_entries is compared with a reference (sort-based) on every input: the same
 * first bad entry and reason, the same data count and highest pfn. hvm_scatter_pages must
 * leave memory untouched when it refuses a batch and otherwise hold exactly the batch's
 * pages (the last copy wins, ZERO clears an earlier copy). hvm_gather_pages must find
 * exactly the non-zero pages and copy them. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The helpers' definitions (constants, get64, page_is_zero...) for the harness's own use,
 * not instrumented; the functions under test come from pages_impl.c compiled apart with
 * coverage, so libFuzzer's comparison tracing is spent on them, not on the checks here. */
#define hvm_gather_pages harness_unused_gather
#define hvm_check_entries harness_unused_check
#define hvm_scatter_pages harness_unused_scatter
#include "pages_impl.c"
#undef hvm_gather_pages
#undef hvm_check_entries
#undef hvm_scatter_pages
int64_t hvm_gather_pages(const uint8_t *mem, uint64_t mem_pages, const uint64_t *pfns,
                         uint32_t count, uint32_t data_type, uint8_t *entries, uint8_t *data);
int hvm_check_entries(const uint8_t *entries, uint32_t count, uint32_t data_type,
                      uint32_t *bad, uint32_t *n_data, uint64_t *max_pfn);
int64_t hvm_scatter_pages(uint8_t *mem, uint64_t mem_pages, uint8_t *written,
                          const uint8_t *entries, uint32_t count, uint32_t data_type,
                          const uint8_t *data, uint64_t data_len, uint32_t *bad);

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

static const uint8_t zero_page_bytes[4096];

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

    /* scatter: data of the length the input says (usually the right one) */
    uint64_t data_len = head & 0x20 ? take(&in, 2) : 4096ULL * (err ? 1 : n_data);
    uint8_t *pages = data_len % 4096 ? malloc(data_len + 1) : block(1, data_len / 4096, 4096);
    if (data_len <= 4096 * mem_pages)           /* a scatter that can succeed: known content */
        for (uint64_t i = 0; i < data_len; i += 4096)
            memset(pages + i, (int)(i / 4096 + 1), data_len - i < 4096 ? data_len - i : 4096);
    uint8_t *mem = block(2, mem_pages, 4096);
    uint8_t *before = block(3, mem_pages, 4096);
    uint8_t *written = block(4, mem_pages, 1);
    for (uint64_t p = 0; p < mem_pages; p++) {          /* some pages hold an earlier copy */
        written[p] = (p * 7 + head) % 3 == 0;
        memset(mem + p * 4096, written[p] ? 0xEE : 0, 4096);
    }
    memcpy(before, mem, mem_pages * 4096);
    uint32_t sbad = 0;
    int64_t zero = hvm_scatter_pages(mem, mem_pages, written, entries, count, data_type, pages, data_len, &sbad);
    if (zero < 0) {
        CHECK(memcmp(mem, before, mem_pages * 4096) == 0);     /* nothing written */
    } else {
        CHECK(!err && data_len == 4096ULL * n_data && (data_type == T_NORMAL || data_type == T_COMPRESSED));
        uint8_t *model_written = calloc(mem_pages, 1);      /* the batch applied in order */
        for (uint64_t p = 0; p < mem_pages; p++)
            model_written[p] = (p * 7 + head) % 3 == 0;
        uint64_t at = 0, zeros = 0;
        for (uint32_t i = 0; i < count; i++) {
            uint64_t pfn = get64(entries + 16 * (uint64_t)i);
            CHECK(pfn < mem_pages);
            if (get32(entries + 16 * (uint64_t)i + 8) == T_ZERO) {
                zeros++;
                if (model_written[pfn])
                    memset(before + pfn * 4096, 0, 4096);
                model_written[pfn] = 0;
            } else {
                memcpy(before + pfn * 4096, pages + at, 4096);
                model_written[pfn] = 1;
                at += 4096;
            }
        }
        CHECK((uint64_t)zero == zeros);
        CHECK(memcmp(mem, before, mem_pages * 4096) == 0);
        CHECK(memcmp(written, model_written, mem_pages) == 0);
        free(model_written);
    }

    /* gather: pfns from the entries, memory as scattered */
    uint32_t gather = count < 16 ? count : 16;
    uint64_t *pfns = malloc(sizeof(uint64_t) * (gather ? gather : 1));
    for (uint32_t i = 0; i < gather; i++)
        pfns[i] = get64(entries + 16 * (uint64_t)i);
    uint8_t *out_entries = block(5, gather, 16);
    uint8_t *out_data = malloc(4096 * (uint64_t)gather + 1);
    int64_t got = hvm_gather_pages(mem, mem_pages, pfns, gather, T_NORMAL, out_entries, head & 2 ? NULL : out_data);
    if (got >= 0) {
        int64_t nonzero = 0;
        for (uint32_t i = 0; i < gather; i++) {
            CHECK(pfns[i] < mem_pages && get64(out_entries + 16 * (uint64_t)i) == pfns[i]);
            int zero_page = memcmp(mem + pfns[i] * 4096, zero_page_bytes, 4096) == 0;
            CHECK(get32(out_entries + 16 * (uint64_t)i + 8) == (zero_page ? T_ZERO : T_NORMAL));
            if (!zero_page) {
                if (!(head & 2))
                    CHECK(memcmp(out_data + 4096 * nonzero, mem + pfns[i] * 4096, 4096) == 0);
                nonzero++;
            }
        }
        CHECK(got == nonzero);
    } else {
        CHECK(-1 - got < gather && pfns[-1 - got] >= mem_pages);
    }
    release(entries, count);
    if (data_len % 4096)
        free(pages);
    else
        release(pages, data_len / 4096);
    free(pfns);
    free(out_data);
    return 0;
}
