/*
 * A paused VM's state as stream record bodies, in one call (migrate/capture.py builds
 * the steps once per VM; specs/stream-format.md, "HVM context records").
 *
 * Each step is one state ioctl into a zeroed scratch buffer (its first prefill_len bytes
 * set first: the MSR indices, the irqchip id), which must return expect_rc (-1: any
 * value >= 0). A step with a nonzero type opens a record body with the (vm, vcpu_id)
 * prefix; a step of type 0 adds to the body before it (PIC: master, then slave). Its
 * segments follow: (offset, length) pairs of the buffer, copied as they are (the kernel
 * struct and the stream are both little-endian; padding and reserved fields are not in
 * any segment), or length zero bytes where offset is HVM_CAP_ZERO.
 *
 * Returns the bytes written to out, the length of each body in lens; or -errno, with
 * *failed the index of the step (EIO: the ioctl returned other than expect_rc, ENOSPC:
 * out or scratch is too small, EINVAL: a segment outside the buffer). cffi releases the
 * GIL around the call.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>

#define HVM_CAP_ZERO 0xFFFFFFFFu

struct hvm_cap_step {
    int32_t fd;
    uint32_t size;              /* bytes of the ioctl's struct */
    unsigned long request;
    int32_t expect_rc;
    uint32_t type;              /* record type; 0: more of the previous body */
    uint32_t vm;
    uint32_t vcpu_id;
    uint32_t prefill_len;
    const uint8_t *prefill;
    uint32_t nseg;
    const uint32_t *seg;        /* nseg (offset, length) pairs */
};

static void put32(uint8_t *p, uint32_t v)
{
    memcpy(p, &v, 4);           /* x86: little-endian, as the stream */
}

long hvm_capture(const struct hvm_cap_step *steps, uint32_t n, uint8_t *scratch,
                 uint32_t scratch_len, uint8_t *out, uint64_t cap, uint32_t *lens,
                 uint32_t *failed)
{
    uint64_t at = 0, body = 0;
    int32_t record = -1;
    for (uint32_t i = 0; i < n; i++) {
        const struct hvm_cap_step *s = &steps[i];
        *failed = i;
        if (s->size > scratch_len || s->prefill_len > s->size)
            return -ENOSPC;
        if (s->type == 0 && record < 0)
            return -EINVAL;
        memset(scratch, 0, s->size);
        memcpy(scratch, s->prefill, s->prefill_len);
        int rc = ioctl(s->fd, s->request, scratch);
        if (rc < 0)
            return -errno;
        if (s->expect_rc >= 0 && rc != s->expect_rc)
            return -EIO;
        if (s->type) {
            if (record >= 0)
                lens[record] = (uint32_t)(at - body);
            record++;
            body = at;
            if (at + 8 > cap)
                return -ENOSPC;
            put32(out + at, s->vm);
            put32(out + at + 4, s->vcpu_id);
            at += 8;
        }
        for (uint32_t k = 0; k < s->nseg; k++) {
            uint32_t off = s->seg[2 * k], len = s->seg[2 * k + 1];
            if (at + len > cap)
                return -ENOSPC;
            if (off == HVM_CAP_ZERO) {
                memset(out + at, 0, len);
            } else {
                if ((uint64_t)off + len > s->size)
                    return -EINVAL;
                memcpy(out + at, scratch + off, len);
            }
            at += len;
        }
    }
    if (record >= 0)
        lens[record] = (uint32_t)(at - body);
    return (long)at;
}

/*
 * The other way: record bodies into a never-run VM (migrate/capture.py builds the steps).
 * Each step zeroes a scratch buffer of `size` bytes, or fills it with the VM's current
 * values through get_request when that is nonzero (KVM_SET_SREGS2 of the PDPTRs keeps the
 * rest of the registers as KVM_SET_SREGS left them), sets its first prefill_len bytes
 * from prefill (the irqchip id), copies each segment, (struct offset, body offset,
 * length) triples, from the body, and makes the set ioctl, whose result it keeps in
 * `result`; a step with `expect` >= 0 needs that result (KVM_SET_MSRS says how many MSRs
 * it set: ERANGE if not all). Returns 0, or -errno with *failed the index of the step
 * (EINVAL: a segment outside the body or the buffer).
 */
struct hvm_apply_step {
    int32_t fd;
    uint32_t size;
    unsigned long request;
    unsigned long get_request;  /* 0: start from zeroes */
    uint32_t prefill_len;
    const uint8_t *prefill;
    const uint8_t *body;
    uint32_t body_len;
    uint32_t nseg;
    const uint32_t *seg;        /* nseg (struct offset, body offset, length) triples */
    int32_t expect;             /* -1, or the result the ioctl must give */
    int32_t result;             /* what the ioctl gave */
};

int hvm_apply(struct hvm_apply_step *steps, uint32_t n, uint8_t *scratch,
              uint32_t scratch_len, uint32_t *failed)
{
    for (uint32_t i = 0; i < n; i++) {
        const struct hvm_apply_step *s = &steps[i];
        *failed = i;
        steps[i].result = -1;
        if (s->size > scratch_len || s->prefill_len > s->size)
            return -ENOSPC;
        if (s->get_request) {
            if (ioctl(s->fd, s->get_request, scratch) < 0)
                return -errno;
        } else {
            memset(scratch, 0, s->size);
        }
        memcpy(scratch, s->prefill, s->prefill_len);
        for (uint32_t k = 0; k < s->nseg; k++) {
            uint32_t to = s->seg[3 * k], from = s->seg[3 * k + 1], len = s->seg[3 * k + 2];
            if ((uint64_t)to + len > s->size || (uint64_t)from + len > s->body_len)
                return -EINVAL;
            memcpy(scratch + to, s->body + from, len);
        }
        int rc = ioctl(s->fd, s->request, scratch);
        steps[i].result = rc;
        if (rc < 0)
            return -errno;
        if (s->expect >= 0 && rc != s->expect)
            return -ERANGE;
    }
    return 0;
}
