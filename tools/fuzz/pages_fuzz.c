/* libFuzzer harness for the reader's C checks, migrate.stream._pages (its source is the
 * string in migrate/stream/_build_pages.py; tools/fuzz_c.py writes it to pages_impl.c).
 * Page entries: the entry table comes from the input, in a heap block of its exact size,
 * so ASan sees any access past it. hvm_check_entries is compared with a reference
 * (sort-based) on every input: the same first bad entry and reason, the same data count
 * and highest pfn. (The page loops of save and restore are the data plane's: see
 * placement_fuzz.c.) Context records: hvm_scan_records walks records made from the
 * input (their CRCs mostly right, so the walk goes on; VCPU_MSRS bodies mostly shaped
 * after an MSR_POLICY from the input), under a type table from the input, in a heap
 * block of the records' exact size; every record it passes is checked again here by the
 * reader's rules (see scan() below). The records' meaning is compared
 * with the Python reader's by tests/stream/test_context_scan.py and tools/fuzz_stream.py.
 * Device state (inputs starting 0xD5): hvm_device_bodies reads the rest of the input as
 * the stub's state buffer (its header mostly made valid, so the walk goes on), in a heap
 * block of its exact size; what it gives is checked for shape here, and a second run into
 * an output buffer cut short must give the same or refuse (see devices() below). Its
 * bytes are compared with the Python parser's by tests/test_devstate_bodies.py. */
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
#define hvm_record_crc harness_record_crc
#define hvm_scan_records harness_unused_scan_records
#define hvm_device_bodies harness_unused_device_bodies
#include "pages_impl.c"
#undef hvm_check_entries
#undef hvm_crc32
#undef hvm_frame_records
#undef hvm_record_crc
#undef hvm_scan_records
#undef hvm_device_bodies
int32_t hvm_device_bodies(const uint8_t *buf, size_t len, uint32_t max, uint8_t *out, size_t cap,
                          uint32_t *ends, uint32_t *instances, uint8_t *names);
int hvm_check_entries(const uint8_t *entries, uint32_t count, uint32_t data_type,
                      uint32_t *bad, uint32_t *n_data, uint64_t *max_pfn);
uint32_t hvm_scan_records(const uint8_t *buf, size_t len, const uint32_t *types,
                          const uint32_t *sizes, const uint8_t *platform, const uint8_t *rules,
                          uint32_t n_types, uint32_t max_vcpu_id, uint32_t max,
                          const uint64_t *const *policies, const int32_t *policy_counts,
                          uint8_t *kinds, uint32_t *vms, uint32_t *vcpus, uint32_t *lengths);

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

/* A VM's MSR_POLICY from the input: none, or up to 6 MSRs (ascending indices, some of them
 * feature MSRs with a value), in the scan's form: index | MSR_FEATURE_BIT, value. */
#define POLICY_MAX 6
static int32_t make_policy(struct input *in, uint64_t *policy)
{
    uint8_t how = (uint8_t)take(in, 1);
    if (how & 0x80)
        return -1;
    int32_t n = how % (POLICY_MAX + 1);
    uint32_t index = 0;
    for (int32_t i = 0; i < n; i++) {
        index += 1 + (uint32_t)take(in, 1);
        int feature = (int)(take(in, 1) & 1);
        policy[2 * i] = index | (feature ? MSR_FEATURE_BIT : 0);
        policy[2 * i + 1] = feature ? take(in, 1) : 0;
    }
    return n;
}

/* A VCPU_MSRS body for a VM's policy: mostly its MSRs in order, values from the input,
 * now and then one thing bent. Returns the body's length. */
static uint32_t msrs_body(struct input *in, uint8_t *body, uint32_t vm, const uint64_t *policy, int32_t count)
{
    uint8_t how = (uint8_t)take(in, 1);
    uint32_t n = count >= 0 ? (uint32_t)count : (uint32_t)take(in, 1) % 8;
    if (how & 0x80)
        n = (uint32_t)take(in, 1) % 8;
    memset(body, 0, 16 + 16 * n);
    body[0] = (uint8_t)vm;
    body[8] = (uint8_t)n;
    uint32_t index = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *e = body + 16 + 16 * i;
        index = count >= 0 && i < (uint32_t)count ? (uint32_t)policy[2 * i] : index + 1 + (uint32_t)take(in, 1) % 3;
        if (how & 0x40 && i == n - 1)
            index = (uint32_t)take(in, 2);
        for (int j = 0; j < 4; j++)
            e[j] = (uint8_t)(index >> (8 * j));
        uint64_t value = count >= 0 && i < (uint32_t)count && policy[2 * i] & MSR_FEATURE_BIT && !(how & 0x20)
            ? policy[2 * i + 1] : take(in, 1);
        put64(e + 8, value);
        if (how & 0x10 && i == 0)
            e[4] = 1;
    }
    if (how & 0x08)
        body[12] = 1;
    return 16 + 16 * n;
}

/* the reader's VCPU_MSRS rules, written again: the body's shape, then the policy */
static int msrs_ok(const uint8_t *body, uint32_t length, const uint64_t *policy, int32_t count)
{
    if (length < 16 || get32(body + 12) || get32(body + 8) > 1024 || length != 16 + 16 * get32(body + 8))
        return 0;
    uint32_t n = get32(body + 8);
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *e = body + 16 + 16 * i;
        if (get32(e + 4) || (i && get32(e) <= get32(e - 16)))
            return 0;
    }
    if (count < 0)
        return 1;
    if (n != (uint32_t)count)
        return 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *e = body + 16 + 16 * i;
        if (get32(e) != (uint32_t)policy[2 * i])
            return 0;
        if (policy[2 * i] & MSR_FEATURE_BIT && get64(e + 8) != policy[2 * i + 1])
            return 0;
    }
    return 1;
}

/* A run of context records from the input, scanned; what the scan passed, checked again. */
#define SCAN_TYPES 4
#define SCAN_MAX 64
static void scan(struct input *in)
{
    uint32_t types[SCAN_TYPES], sizes[SCAN_TYPES], n_types = 1 + (uint32_t)take(in, 1) % SCAN_TYPES;
    uint8_t platform[SCAN_TYPES], rules[SCAN_TYPES];
    for (uint32_t k = 0; k < n_types; k++) {
        uint8_t how = (uint8_t)take(in, 1);
        types[k] = 0x10 + k;
        rules[k] = how % 4;
        platform[k] = (how >> 2) & 1;
        /* XCRS's rule holds only at 208 bytes; the others at any size, 0 included (MSRS's
         * size comes from its count) */
        sizes[k] = rules[k] == RULE_XCRS && (how & 8) ? 208 : (uint32_t)take(in, 2) % 600;
    }
    uint64_t policy[2][2 * POLICY_MAX];
    int32_t counts[2] = {make_policy(in, policy[0]), make_policy(in, policy[1])};
    const uint64_t *policies[2] = {policy[0], policy[1]};
    uint32_t nrec = (uint32_t)take(in, 1) % 80;
    size_t len = 0;
    uint8_t *buf = malloc(nrec * (16 + 608) + 16);
    for (uint32_t r = 0; r < nrec && in->n; r++) {
        uint8_t how = (uint8_t)take(in, 1);
        uint32_t k = how % n_types, length = how & 0x80 ? (uint32_t)take(in, 2) % 600 : sizes[k];
        uint8_t *rec = buf + len;
        if (rules[k] == RULE_MSRS && !(how & 0x80)) {   /* at most 16 + 16 * 7 bytes */
            uint32_t vm = how & 0x20 ? 1 : 0;
            length = msrs_body(in, rec + 16, vm, policy[vm], counts[vm]);
        } else {
            uint32_t padded = (length + 7) & ~7u;
            for (uint32_t i = 0; i < padded; i++)       /* body: the input, then zeros */
                rec[16 + i] = i < length && in->n ? (uint8_t)take(in, 1) : 0;
            if (length >= 8 && !(how & 0x40)) {        /* a plausible VM and vCPU id most of the time */
                memset(rec + 16, 0, 8);
                rec[16] = how & 0x20 ? 1 : 0;
            }
        }
        uint32_t padded = (length + 7) & ~7u;
        uint32_t head[4] = {types[k], length, how & 0x10 ? (uint32_t)take(in, 1) : 0, 0};
        head[3] = harness_record_crc(head[0], rec + 16, length) ^ (how & 0x08 ? 1u : 0u);
        memcpy(rec, head, 16);
        len += 16 + padded;
    }
    uint8_t *exact = malloc(len ? len : 1);         /* ASan: one byte past the records is outside */
    memcpy(exact, buf, len);
    free(buf);
    uint8_t kinds[SCAN_MAX];
    uint32_t vms[SCAN_MAX], vcpus[SCAN_MAX], lengths[SCAN_MAX], max = 1 + (uint32_t)take(in, 1) % SCAN_MAX;
    uint32_t n = hvm_scan_records(exact, len, types, sizes, platform, rules, n_types, 4095, max,
                                  policies, counts, kinds, vms, vcpus, lengths);
    CHECK(n <= max);
    size_t at = 0;
    for (uint32_t i = 0; i < n; i++) {              /* each passed record obeys the rules */
        const uint8_t *rec = exact + at, *body = rec + 16;
        CHECK(len - at >= 16);
        uint32_t k = kinds[i], length = get32(rec + 4);
        CHECK(k < n_types && get32(rec) == types[k] && length == lengths[i] && length >= 8 && !get32(rec + 8));
        CHECK(rules[k] == RULE_MSRS || length == sizes[k]);
        uint32_t padded = (length + 7) & ~7u;
        CHECK(len - at - 16 >= padded);
        CHECK(harness_record_crc(types[k], body, length) == get32(rec + 12));
        for (uint32_t j = length; j < padded; j++)
            CHECK(body[j] == 0);
        CHECK(vms[i] == get32(body) && vms[i] <= 1 && vcpus[i] == get32(body + 4));
        CHECK(platform[k] ? vcpus[i] == 0 : vcpus[i] <= 4095);
        if (rules[k] == RULE_XCRS) {
            uint32_t nr = get32(body + 8);
            CHECK(length == 208 && nr <= 16 && !get32(body + 12));
            for (uint32_t j = 16 + 12 * nr; j < length; j++)
                CHECK(body[j] == 0);
        } else if (rules[k] == RULE_PDPTRS) {
            CHECK(length >= 16 && !(get64(body + 8) & ~1ull));
        } else if (rules[k] == RULE_MSRS) {
            CHECK(msrs_ok(body, length, policies[vms[i]], counts[vms[i]]));
        }
        at += 16 + padded;
    }
    free(exact);
}

#define DS_MAX 64

/* hvm_device_bodies on the input as a state buffer: each body a fixmap of 5 keys ending
 * inside the output, in order; each name 1..23 bytes with a NUL; the same bodies (or a
 * refusal) with an output buffer cut short */
static void devices(struct input *in)
{
    size_t len = in->n;
    uint8_t *buf = malloc(len ? len : 1);
    memcpy(buf, in->p, len);
    if (len >= 16 && (buf[0] & 1)) {       /* mostly a valid header: magic, total, version */
        uint32_t head[4] = {0x42545344u, (uint32_t)len, buf[8] % 8, 1};
        memcpy(buf, head, 16);
    }
    size_t cap = 2 * 0x8000;
    uint8_t *out = malloc(cap), *names = malloc(24 * DS_MAX);
    uint32_t ends[DS_MAX], instances[DS_MAX];
    int32_t n = hvm_device_bodies(buf, len, DS_MAX, out, cap, ends, instances, names);
    CHECK(n >= -1 && n <= DS_MAX);
    uint32_t at = 0;
    for (int32_t i = 0; i < n; i++) {
        CHECK(ends[i] > at && ends[i] <= cap && out[at] == 0x85);
        size_t name = strnlen((const char *)names + 24 * i, 24);
        CHECK(name >= 1 && name <= 23);
        at = ends[i];
    }
    if (n > 0) {
        size_t short_cap = at - 1 - (len ? buf[len - 1] % at : 0);
        uint8_t *again = malloc(short_cap ? short_cap : 1), *names2 = malloc(24 * DS_MAX);
        uint32_t ends2[DS_MAX], instances2[DS_MAX];
        CHECK(hvm_device_bodies(buf, len, DS_MAX, again, short_cap, ends2, instances2, names2) == -1);
        free(again);
        free(names2);
    }
    free(buf);
    free(out);
    free(names);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct input in = { data, size };
    if (size && data[0] == 0xD5) {          /* device state: devices() */
        in.p++, in.n--;
        devices(&in);
        return 0;
    }
    if (size && data[0] == 0xC5) {          /* context records: scan() */
        in.p++, in.n--;
        scan(&in);
        return 0;
    }
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
