/* Device state records in stub memory (specs/device-state.md): a small
 * self-describing binary form the stub writes and reads, and the host turns
 * into msgpack records of the stream.  The reader trusts nothing. */
#ifndef HVM_DEVSTATE_H
#define HVM_DEVSTATE_H
#include <stdint.h>

#define DS_MAGIC        0x42545344u     /* "DSTB" */
#define DS_VERSION      1u
#define DS_NAME         24
#define DS_MAX_RECORDS  64
#define DS_KIND_U64     0
#define DS_KIND_BYTES   1

struct ds_header { uint32_t magic, total_len, nrecords, version; };
struct ds_rec_header {
    uint32_t rec_len, nfields;
    char device[DS_NAME];
    uint32_t instance, version, min_version, pad;
};
struct ds_field_header { char name[DS_NAME]; uint32_t kind, len; };

struct ds_writer { uint8_t *buf; uint32_t cap, len, rec; int err; };
struct ds_reader { const uint8_t *buf; uint32_t total, off, left; };
struct ds_record {
    const char *device;
    uint32_t instance, version, min_version, nfields;
    const uint8_t *fields;          /* nfields fields, validated */
    uint32_t fields_len;
};

static inline uint32_t ds_pad8(uint32_t n) { return (n + 7) & ~7u; }

static inline void ds_copy_name(char *dst, const char *src)
{
    uint32_t i = 0;
    for (; i + 1 < DS_NAME && src[i]; i++)
        dst[i] = src[i];
    for (; i < DS_NAME; i++)
        dst[i] = 0;
}

static inline void *ds_take(struct ds_writer *w, uint32_t n)
{
    if (w->err || n > w->cap - w->len) {
        w->err = 1;
        return 0;
    }
    uint8_t *p = w->buf + w->len;
    for (uint32_t i = 0; i < n; i++)
        p[i] = 0;
    w->len += n;
    return p;
}

static inline void ds_begin(struct ds_writer *w, uint8_t *buf, uint32_t cap)
{
    w->buf = buf;
    w->cap = cap;
    w->len = 0;
    w->rec = 0;
    w->err = 0;
    ds_take(w, sizeof(struct ds_header));
}

static inline void ds_close_record(struct ds_writer *w)
{
    if (w->rec && !w->err)
        ((struct ds_rec_header *)(w->buf + w->rec))->rec_len = w->len - w->rec;
}

static inline void ds_record(struct ds_writer *w, const char *device, uint32_t instance,
                             uint32_t version, uint32_t min_version)
{
    ds_close_record(w);
    uint32_t at = w->len;
    struct ds_rec_header *h = ds_take(w, sizeof(*h));
    if (!h)
        return;
    w->rec = at;
    ds_copy_name(h->device, device);
    h->instance = instance;
    h->version = version;
    h->min_version = min_version;
    ((struct ds_header *)w->buf)->nrecords++;
}

static inline void ds_field(struct ds_writer *w, const char *name, uint32_t kind,
                            const void *value, uint32_t len)
{
    struct ds_field_header *f = ds_take(w, sizeof(*f));
    uint8_t *v = f ? ds_take(w, ds_pad8(len)) : 0;
    if (!v || !w->rec)
        return;
    ds_copy_name(f->name, name);
    f->kind = kind;
    f->len = len;
    for (uint32_t i = 0; i < len; i++)
        v[i] = ((const uint8_t *)value)[i];
    ((struct ds_rec_header *)(w->buf + w->rec))->nfields++;
}

static inline void ds_u64(struct ds_writer *w, const char *name, uint64_t v)
{
    ds_field(w, name, DS_KIND_U64, &v, 8);
}

static inline void ds_bytes(struct ds_writer *w, const char *name, const void *p, uint32_t len)
{
    ds_field(w, name, DS_KIND_BYTES, p, len);
}

/* Returns the total length, or -1 if the buffer was too small. */
static inline int ds_end(struct ds_writer *w)
{
    ds_close_record(w);
    if (w->err)
        return -1;
    struct ds_header *h = (struct ds_header *)w->buf;
    h->magic = DS_MAGIC;
    h->version = DS_VERSION;
    h->total_len = w->len;
    return (int)w->len;
}

static inline int ds_name_ok(const char *name)
{
    for (uint32_t i = 0; i < DS_NAME; i++)
        if (!name[i])
            return i > 0;
    return 0;
}

static inline int ds_name_is(const char *a, const char *b)
{
    uint32_t i = 0;
    for (; i < DS_NAME && a[i] && a[i] == b[i]; i++)
        ;
    return i < DS_NAME && a[i] == b[i];
}

static inline int ds_open(struct ds_reader *r, const uint8_t *buf, uint32_t cap)
{
    const struct ds_header *h = (const void *)buf;
    if (h->magic != DS_MAGIC || h->version != DS_VERSION || h->total_len < sizeof(*h)
        || h->total_len > cap || h->nrecords > DS_MAX_RECORDS)
        return -1;
    r->buf = buf;
    r->total = h->total_len;
    r->off = sizeof(*h);
    r->left = h->nrecords;
    return 0;
}

/* 1: a record, 0: the end, -1: malformed.  Every field is checked here. */
static inline int ds_next(struct ds_reader *r, struct ds_record *rec)
{
    if (!r->left)
        return r->off == r->total ? 0 : -1;
    if (r->total - r->off < sizeof(struct ds_rec_header))
        return -1;
    const struct ds_rec_header *h = (const void *)(r->buf + r->off);
    if (h->rec_len < sizeof(*h) || h->rec_len > r->total - r->off || (h->rec_len & 7)
        || !ds_name_ok(h->device) || h->pad)
        return -1;
    uint32_t off = sizeof(*h), end = h->rec_len;
    for (uint32_t i = 0; i < h->nfields; i++) {
        if (end - off < sizeof(struct ds_field_header))
            return -1;
        const struct ds_field_header *f = (const void *)(r->buf + r->off + off);
        if (!ds_name_ok(f->name) || f->kind > DS_KIND_BYTES
            || (f->kind == DS_KIND_U64 && f->len != 8)
            || f->len > end - off - sizeof(*f) || ds_pad8(f->len) > end - off - sizeof(*f))
            return -1;
        off += sizeof(*f) + ds_pad8(f->len);
    }
    if (off != end)
        return -1;
    rec->device = h->device;
    rec->instance = h->instance;
    rec->version = h->version;
    rec->min_version = h->min_version;
    rec->nfields = h->nfields;
    rec->fields = r->buf + r->off + sizeof(*h);
    rec->fields_len = end - sizeof(*h);
    r->off += end;
    r->left--;
    return 1;
}

static inline const struct ds_field_header *ds_find(const struct ds_record *rec, const char *name)
{
    uint32_t off = 0;
    for (uint32_t i = 0; i < rec->nfields; i++) {
        const struct ds_field_header *f = (const void *)(rec->fields + off);
        if (ds_name_is(f->name, name))
            return f;
        off += sizeof(*f) + ds_pad8(f->len);
    }
    return 0;
}

static inline int ds_get_u64(const struct ds_record *rec, const char *name, uint64_t *v)
{
    const struct ds_field_header *f = ds_find(rec, name);
    if (!f || f->kind != DS_KIND_U64)
        return -1;
    const uint8_t *p = (const uint8_t *)(f + 1);
    *v = 0;
    for (int i = 7; i >= 0; i--)
        *v = (*v << 8) | p[i];
    return 0;
}

static inline int ds_get_bytes(const struct ds_record *rec, const char *name,
                               const uint8_t **p, uint32_t *len)
{
    const struct ds_field_header *f = ds_find(rec, name);
    if (!f || f->kind != DS_KIND_BYTES)
        return -1;
    *p = (const uint8_t *)(f + 1);
    *len = f->len;
    return 0;
}

#endif
