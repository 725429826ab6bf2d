"""cffi build of migrate.stream._pages: the reader's check of page entries in C
(specs/stream-format.md, "PAGE_DATA" and "PAGE_DATA_ZSTD"), the record CRC, and the
reader's checks of a run of HVM context records (``hvm_scan_records``, for
``hvm.BodyScan``), and the stub's device state as DEVICE_STATE bodies
(``hvm_device_bodies``, for ``migrate.stub.devstate.Encoder``: a save's pause encodes
them without building the records in Python).

Calls that run without the GIL (cffi releases it): ``hvm_check_entries``, the reader's
check of a batch's entries in stream order (type, reserved field, duplicate pfn),
reporting the first bad entry, the number of data pages and the highest pfn; and
``hvm_crc32``, zlib's CRC-32 by carry-less multiplication where the CPU has it (about 4x
zlib's speed here; crc32_fold.h, shared with the data plane). The page loops of save
and restore are the data plane's (migrate/dataplane).
"""
from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef("""
#define HVM_BAD_TYPE ...
#define HVM_BAD_RESERVED ...
#define HVM_DUPLICATE ...
#define HVM_BAD_COUNT ...
int hvm_check_entries(const uint8_t *entries, uint32_t count, uint32_t data_type,
                      uint32_t *bad, uint32_t *n_data, uint64_t *max_pfn);
uint32_t hvm_crc32(uint32_t crc, const uint8_t *p, size_t len);
uint32_t hvm_record_crc(uint32_t type, const uint8_t *body, uint32_t len);
size_t hvm_frame_records(const uint32_t *types, const uint32_t *lens, uint32_t n,
                         const uint8_t *bodies, uint8_t *out);
#define RULE_NONE ...
#define RULE_XCRS ...
#define RULE_PDPTRS ...
#define RULE_MSRS ...
#define MSR_FEATURE_BIT ...
uint32_t hvm_scan_records(const uint8_t *buf, size_t len, const uint32_t *types,
                          const uint32_t *sizes, const uint8_t *platform, const uint8_t *rules,
                          uint32_t n_types, uint32_t max_vcpu_id, uint32_t max,
                          const uint64_t *const *policies, const int32_t *policy_counts,
                          uint8_t *kinds, uint32_t *vms, uint32_t *vcpus, uint32_t *lengths);
int32_t hvm_device_bodies(const uint8_t *buf, size_t len, uint32_t max, uint8_t *out, size_t cap,
                          uint32_t *ends, uint32_t *instances, uint8_t *names);
""")
ffibuilder.set_source("migrate.stream._pages", r"""
#include <stdint.h>
#include <string.h>
#include "crc32_fold.h"

/* zlib's crc32, by carry-less multiplication where the CPU has it (the record CRC) */
uint32_t hvm_crc32(uint32_t crc, const uint8_t *p, size_t len)
{
    return crc32_update(crc, p, len);
}

/* the record header's fields are little-endian on the wire; these helpers build it in
 * memory as uint32s */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the record CRC assumes a little-endian host");

/* a record's CRC: over type, body_length and a zero reserved field, then the body */
uint32_t hvm_record_crc(uint32_t type, const uint8_t *body, uint32_t len)
{
    uint32_t head[3] = {type, len, 0};
    return crc32_update(crc32_update(0, (const uint8_t *)head, 12), body, len);
}

/* n records framed (header, body, zero padding to 8 bytes; framing.frame's rule) one
 * after another into out, from their bodies laid end to end; returns the bytes written
 * (the caller sizes out: 16 + length rounded up to 8, for each) */
size_t hvm_frame_records(const uint32_t *types, const uint32_t *lens, uint32_t n,
                         const uint8_t *bodies, uint8_t *out)
{
    uint8_t *at = out;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t head[4] = {types[i], lens[i], 0, hvm_record_crc(types[i], bodies, lens[i])};
        uint32_t padded = (lens[i] + 7) & ~7u;
        memcpy(at, head, 16);
        memcpy(at + 16, bodies, lens[i]);
        memset(at + 16 + lens[i], 0, padded - lens[i]);
        at += 16 + padded;
        bodies += lens[i];
    }
    return (size_t)(at - out);
}

#define MAX_COUNT 1024          /* MAX_PAGES_PER_BATCH */
#define T_ZERO 1

#define HVM_BAD_TYPE 1
#define HVM_BAD_RESERVED 2
#define HVM_DUPLICATE 3
#define HVM_BAD_COUNT 6

static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Duplicate pfns: none while the pfns ascend (the writer's order); otherwise an
 * open-addressing set of the pfns seen so far. */
#define SLOTS 2048
static int seen_before(uint64_t *slots, uint8_t *used, uint64_t pfn)
{
    uint64_t h = (pfn * 0x9E3779B97F4A7C15ull) >> 53;     /* 11 bits */
    while (used[h]) {
        if (slots[h] == pfn)
            return 1;
        h = (h + 1) & (SLOTS - 1);
    }
    used[h] = 1;
    slots[h] = pfn;
    return 0;
}

int hvm_check_entries(const uint8_t *entries, uint32_t count, uint32_t data_type,
                      uint32_t *bad, uint32_t *n_data, uint64_t *max_pfn)
{
    uint64_t slots[SLOTS];
    uint8_t used[SLOTS];
    int ascending = 1, hashed = 0;
    uint64_t top = 0;
    uint32_t data = 0;
    if (count > MAX_COUNT) {
        *bad = 0;
        return HVM_BAD_COUNT;
    }
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *e = entries + 16 * (uint64_t)i;
        uint64_t pfn = get64(e);
        uint32_t type = get32(e + 8);
        *bad = i;
        if (type != T_ZERO && type != data_type)
            return HVM_BAD_TYPE;
        if (get32(e + 12))
            return HVM_BAD_RESERVED;
        if (ascending && i > 0 && pfn <= top) {
            ascending = 0;              /* from here on, remember every pfn */
            memset(used, 0, sizeof used);
            for (uint32_t j = 0; j < i; j++)
                seen_before(slots, used, get64(entries + 16 * (uint64_t)j));
            hashed = 1;
        }
        if (hashed && seen_before(slots, used, pfn))
            return HVM_DUPLICATE;
        if (i == 0 || pfn > top)
            top = pfn;
        data += type == data_type;
    }
    *n_data = data;
    *max_pfn = top;
    return 0;
}

/* The value rules of a type (the table's rules[]): none, VCPU_XCRS's, VCPU_PDPTRS's,
 * VCPU_MSRS's (specs/stream-format.md, "HVM context records" and "Ordering") */
#define RULE_NONE 0
#define RULE_XCRS 1
#define RULE_PDPTRS 2
#define RULE_MSRS 3
#define MAX_XCRS 16
#define MAX_MSRS 1024
#define MSR_FEATURE_BIT (1ull << 32)

/* VCPU_MSRS: vm, vcpu_id, count, reserved, then count entries of index u32, reserved u32,
 * value u64 in strictly ascending index order, nothing after them. With the VM's
 * MSR_POLICY (policy: per entry the index, MSR_FEATURE_BIT if a feature MSR, then its
 * value; count -1: the stream has none), exactly its MSRs, and a feature MSR's value
 * the policy's. */
static int msrs_hold(const uint8_t *body, uint32_t length, const uint64_t *policy, int32_t policy_count)
{
    if (length < 16)
        return 0;
    uint32_t count = get32(body + 8);
    if (get32(body + 12) || count > MAX_MSRS || length != 16 + 16 * count)
        return 0;
    if (policy_count >= 0 && count != (uint32_t)policy_count)
        return 0;
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *e = body + 16 + 16 * (size_t)i;
        uint32_t index = get32(e);
        if (get32(e + 4) || (i && index <= get32(e - 16)))
            return 0;
        if (policy_count >= 0) {
            uint64_t want = policy[2 * (size_t)i];
            if (index != (uint32_t)want || (want & MSR_FEATURE_BIT && get64(e + 8) != policy[2 * (size_t)i + 1]))
                return 0;
        }
    }
    return 1;
}

static int rules_hold(uint32_t rule, const uint8_t *body, uint32_t length)
{
    if (rule == RULE_XCRS) {        /* nr_xcrs, flags, then 16 entries of xcr u32 and value u64 */
        if (length != 16 + 12 * MAX_XCRS)
            return 0;
        uint32_t nr = get32(body + 8);
        if (nr > MAX_XCRS || get32(body + 12))
            return 0;
        for (uint32_t i = 16 + 12 * nr; i < length; i++)
            if (body[i])
                return 0;
        return 1;
    }
    if (rule == RULE_PDPTRS)        /* flags u64: only bit 0 is defined */
        return length >= 16 && !(get64(body + 8) & ~1ull);
    return rule == RULE_NONE;
}

/* The records at the start of buf that pass every check the reader makes of a record of
 * one of the n_types given types (each with its exact body size, whether it is a
 * platform record, and its value rules) before the ordering rules: the whole record in
 * buf, reserved zero, the type's exact body length (VCPU_MSRS: the length its count
 * gives), the CRC, zero padding, a VM id of 0 or 1, a vcpu_id of 0 for a platform record
 * or at most max_vcpu_id for a vCPU's, and the type's value rules (VCPU_MSRS's against
 * the MSR_POLICY of its VM: policies[vm], policy_counts[vm] entries, -1 for none). Stops
 * at the first record that is anything else (the reader then checks that one itself),
 * and after max records. Returns how many passed, with each one's index in the table,
 * VM, vcpu_id and body length. */
uint32_t hvm_scan_records(const uint8_t *buf, size_t len, const uint32_t *types,
                          const uint32_t *sizes, const uint8_t *platform, const uint8_t *rules,
                          uint32_t n_types, uint32_t max_vcpu_id, uint32_t max,
                          const uint64_t *const *policies, const int32_t *policy_counts,
                          uint8_t *kinds, uint32_t *vms, uint32_t *vcpus, uint32_t *lengths)
{
    size_t at = 0;
    uint32_t n = 0;
    while (n < max && len - at >= 16) {
        const uint8_t *rec = buf + at, *body = rec + 16;
        uint32_t type = get32(rec), length = get32(rec + 4), k;
        for (k = 0; k < n_types && types[k] != type; k++)
            ;
        if (k == n_types || get32(rec + 8) || length < 8
                || (rules[k] == RULE_MSRS ? length > 16 + 16 * MAX_MSRS : length != sizes[k]))
            break;
        size_t padded = ((size_t)length + 7) & ~(size_t)7;
        if (len - at - 16 < padded)
            break;
        if (hvm_record_crc(type, body, length) != get32(rec + 12))
            break;
        int nonzero = 0;
        for (size_t i = length; i < padded; i++)
            nonzero |= body[i];
        uint32_t vm = get32(body), vcpu = get32(body + 4);
        if (nonzero || vm > 1 || (platform[k] ? vcpu != 0 : vcpu > max_vcpu_id))
            break;
        if (rules[k] == RULE_MSRS ? !msrs_hold(body, length, policies[vm], policy_counts[vm])
                                  : !rules_hold(rules[k], body, length))
            break;
        kinds[n] = (uint8_t)k;
        vms[n] = vm;
        vcpus[n] = vcpu;
        lengths[n] = length;
        n++;
        at += 16 + padded;
    }
    return n;
}

/* ---- the stub's device state as DEVICE_STATE bodies ---------------------------------- */

#define DS_MAGIC 0x42545344u    /* specs/device-state.md, "Binary form in stub memory" */
#define DS_VERSION 1
#define DS_NAME 24
#define DS_HEADER 16
#define DS_RECORD 48
#define DS_FIELD 32
#define DS_STATE_SIZE 0x8000     /* the stub's state buffer: what parse reads of it */
#define DS_MAX_FIELDS (DS_STATE_SIZE / DS_FIELD)

/* a name's length: 1 to 23 ASCII bytes before a NUL, else -1 */
static int ds_name(const uint8_t *raw)
{
    for (int i = 0; i < DS_NAME; i++) {
        if (raw[i] == 0)
            return i ? i : -1;
        if (raw[i] & 0x80)
            return -1;
    }
    return -1;
}

/* msgpack, as msgpack-python packs (use_bin_type): the shortest form of each value */
struct mp {
    uint8_t *at, *end;
    int over;
};

static void mp_put(struct mp *m, const void *src, size_t n)
{
    if ((size_t)(m->end - m->at) < n) {
        m->over = 1;
        return;
    }
    memcpy(m->at, src, n);
    m->at += n;
}

static void mp_tagged(struct mp *m, uint8_t tag, uint64_t v, int bytes)     /* big-endian */
{
    uint8_t b[9] = {tag};
    for (int i = 0; i < bytes; i++)
        b[1 + i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
    mp_put(m, b, 1 + (size_t)bytes);
}

static void mp_uint(struct mp *m, uint64_t v)
{
    if (v < 0x80) {
        uint8_t b = (uint8_t)v;
        mp_put(m, &b, 1);
    } else if (v <= 0xff) {
        mp_tagged(m, 0xcc, v, 1);
    } else if (v <= 0xffff) {
        mp_tagged(m, 0xcd, v, 2);
    } else if (v <= 0xffffffffu) {
        mp_tagged(m, 0xce, v, 4);
    } else {
        mp_tagged(m, 0xcf, v, 8);
    }
}

static void mp_str(struct mp *m, const void *s, int n)       /* n < 32: a fixstr */
{
    uint8_t b = (uint8_t)(0xa0 | n);
    mp_put(m, &b, 1);
    mp_put(m, s, (size_t)n);
}

static void mp_map(struct mp *m, uint32_t n)
{
    if (n < 16) {
        uint8_t b = (uint8_t)(0x80 | n);
        mp_put(m, &b, 1);
    } else if (n <= 0xffff) {
        mp_tagged(m, 0xde, n, 2);
    } else {
        mp_tagged(m, 0xdf, n, 4);
    }
}

static void mp_bin(struct mp *m, const uint8_t *s, uint32_t n)
{
    if (n <= 0xff)
        mp_tagged(m, 0xc4, n, 1);
    else if (n <= 0xffff)
        mp_tagged(m, 0xc5, n, 2);
    else
        mp_tagged(m, 0xc6, n, 4);
    mp_put(m, s, n);
}

/* The stub's state buffer (len bytes, at most max records) as DEVICE_STATE bodies
 * (specs/stream-format.md), each what msgpack-python packs for the record
 * {"device", "instance", "version", "min_version", "fields"}, laid end to end in out (cap
 * bytes; ends[i]: where body i ends), with each record's instance and device name (NUL-padded
 * to 24 bytes in names). Checks what migrate/stub/devstate.py's parse checks and what a
 * reader checks of a DEVICE_STATE body (names, 1 <= min_version <= version, unique field
 * names). Returns the number of records, or -1 for anything else (or out too small): the
 * caller then takes the slow path, which says why. */
int32_t hvm_device_bodies(const uint8_t *buf, size_t len, uint32_t max, uint8_t *out, size_t cap,
                          uint32_t *ends, uint32_t *instances, uint8_t *names)
{
    if (len > DS_STATE_SIZE)
        len = DS_STATE_SIZE;
    if (len < DS_HEADER)
        return -1;
    uint32_t total = get32(buf + 4), nrec = get32(buf + 8);
    if (get32(buf) != DS_MAGIC || get32(buf + 12) != DS_VERSION || total < DS_HEADER || total > len
            || nrec > max)
        return -1;
    struct mp m = {out, out + cap, 0};
    size_t off = DS_HEADER;
    size_t field_at[DS_MAX_FIELDS];
    for (uint32_t r = 0; r < nrec; r++) {
        if (total - off < DS_RECORD)
            return -1;
        const uint8_t *rec = buf + off;
        uint32_t rec_len = get32(rec), nfields = get32(rec + 4);
        uint32_t instance = get32(rec + 32), version = get32(rec + 36), min_version = get32(rec + 40);
        int dev_len = ds_name(rec + 8);
        if (rec_len < DS_RECORD || rec_len > total - off || rec_len % 8 || get32(rec + 44) || dev_len < 0
                || min_version < 1 || min_version > version || nfields > (rec_len - DS_RECORD) / DS_FIELD)
            return -1;
        mp_map(&m, 5);
        mp_str(&m, "device", 6);
        mp_str(&m, rec + 8, dev_len);
        mp_str(&m, "instance", 8);
        mp_uint(&m, instance);
        mp_str(&m, "version", 7);
        mp_uint(&m, version);
        mp_str(&m, "min_version", 11);
        mp_uint(&m, min_version);
        mp_str(&m, "fields", 6);
        mp_map(&m, nfields);
        size_t end = off + rec_len, at = off + DS_RECORD;
        for (uint32_t f = 0; f < nfields; f++) {
            if (end - at < DS_FIELD)
                return -1;
            const uint8_t *field = buf + at;
            int name_len = ds_name(field);
            uint32_t kind = get32(field + 24), length = get32(field + 28);
            size_t body = at + DS_FIELD;
            if (name_len < 0 || kind > 1 || (kind == 0 && length != 8)
                    || (((uint64_t)length + 7) & ~(uint64_t)7) > end - body)
                return -1;
            for (uint32_t g = 0; g < f; g++)        /* each name once (the bytes up to its NUL) */
                if (!memcmp(buf + field_at[g], field, (size_t)name_len + 1))
                    return -1;
            field_at[f] = at;
            mp_str(&m, field, name_len);
            if (kind == 0)
                mp_uint(&m, get64(buf + body));
            else
                mp_bin(&m, buf + body, length);
            at = body + (((size_t)length + 7) & ~(size_t)7);
        }
        if (at != end || m.over)
            return -1;
        ends[r] = (uint32_t)(m.at - out);
        instances[r] = instance;
        memset(names + (size_t)DS_NAME * r, 0, DS_NAME);
        memcpy(names + (size_t)DS_NAME * r, rec + 8, (size_t)dev_len);
        off = end;
    }
    return off == total ? (int32_t)nrec : -1;
}
""", extra_compile_args=["-O3"], include_dirs=[str(Path(__file__).resolve().parent)],
    libraries=["z", "pthread"])
