/* A small virtio-mmio (version 2) block driver: one split virtqueue of 8
 * entries, one request at a time, completion by polling the used ring
 * (the interrupt is acknowledged by the ring-0 handler).  Runs in ring 3. */
#include "rt.h"

#define QSIZE 8
#define R(off) (*(volatile uint32_t *)(boot->virtio_base + (off)))

struct vdesc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct vq {
    struct vdesc desc[QSIZE];
    struct { uint16_t flags, idx, ring[QSIZE], used_event; } avail;
    uint8_t pad[4096 - 16 * QSIZE - 2 * (QSIZE + 3)];
    struct { uint16_t flags, idx; struct { uint32_t id, len; } ring[QSIZE]; uint16_t avail_event; } used;
} __attribute__((aligned(4096)));

static struct vq vq;
static struct { uint32_t type, reserved; uint64_t sector; } req_hdr;
static volatile uint8_t req_status;
static uint16_t last_used;
uint64_t vblk_capacity;

int vblk_init(void)
{
    if (!(boot->flags & BOOT_F_VIRTIO) || R(0x000) != 0x74726976 || R(0x004) != 2 || R(0x008) != 2)
        return -1;
    R(0x070) = 0;                               /* reset */
    R(0x070) = 1 | 2;                           /* ACKNOWLEDGE, DRIVER */
    R(0x014) = 1;
    if (!(R(0x010) & 1))                        /* VIRTIO_F_VERSION_1 */
        return -1;
    R(0x024) = 0;
    R(0x020) = 0;
    R(0x024) = 1;
    R(0x020) = 1;
    R(0x070) = 1 | 2 | 8;                       /* FEATURES_OK */
    if (!(R(0x070) & 8))
        return -1;
    R(0x030) = 0;
    if (R(0x034) < QSIZE)
        return -1;
    R(0x038) = QSIZE;
    uint64_t d = (uint64_t)&vq.desc, a = (uint64_t)&vq.avail, u = (uint64_t)&vq.used;
    R(0x080) = (uint32_t)d; R(0x084) = (uint32_t)(d >> 32);
    R(0x090) = (uint32_t)a; R(0x094) = (uint32_t)(a >> 32);
    R(0x0A0) = (uint32_t)u; R(0x0A4) = (uint32_t)(u >> 32);
    R(0x044) = 1;                               /* QueueReady */
    R(0x070) = 1 | 2 | 8 | 4;                   /* DRIVER_OK */
    vblk_capacity = R(0x100) | ((uint64_t)R(0x104) << 32);
    last_used = vq.used.idx;
    return 0;
}

/* 0: done; 1..2: the device's status byte (IOERR, UNSUPP); -1: the device
 * did not complete the request (it may need a reset). */
int vblk_io(int write, uint64_t sector, void *buf, uint32_t len)
{
    req_hdr.type = write ? 1 : 0;
    req_hdr.sector = sector;
    req_status = 0xFF;
    vq.desc[0] = (struct vdesc){ (uint64_t)&req_hdr, sizeof(req_hdr), 1, 1 };
    vq.desc[1] = (struct vdesc){ (uint64_t)buf, len, (uint16_t)(1 | (write ? 0 : 2)), 2 };
    vq.desc[2] = (struct vdesc){ (uint64_t)&req_status, 1, 2, 0 };
    vq.avail.ring[vq.avail.idx % QSIZE] = 0;
    barrier();
    vq.avail.idx++;
    barrier();
    R(0x050) = 0;                               /* QueueNotify */
    for (int spins = 0; *(volatile uint16_t *)&vq.used.idx == last_used; spins++) {
        if (spins > 1000000 || (R(0x070) & 0x40))
            return -1;
        cpu_relax();
    }
    last_used++;
    barrier();
    return req_status;
}
