/* A small virtio-mmio (version 2) network driver, polled from ring 3
 * (specs/guest-boot.md, "virtio-net driver").  Two split virtqueues of 64
 * entries: 0 receives, 1 transmits; each entry owns one buffer of VNET_BUF
 * bytes in .bss.  By default the driver batches notifications (it publishes
 * buffers and notifies once per vnet_flush, and only if the device asks, with
 * EVENT_IDX or the used ring's NO_NOTIFY flag) and suppresses interrupts;
 * the VNET_OPT_* options turn each of these off for comparison. */
#include "rt.h"

#define NQ 64
#define R(off) (*(volatile uint32_t *)(boot->net_base + (off)))
#define C8(off) (*(volatile uint8_t *)(boot->net_base + 0x100 + (off)))

#define F_CSUM          (1ULL << 0)
#define F_GUEST_CSUM    (1ULL << 1)
#define F_MTU           (1ULL << 3)
#define F_MAC           (1ULL << 5)
#define F_EVENT_IDX     (1ULL << 29)
#define F_VERSION_1     (1ULL << 32)
#define D_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1
#define mfence() __asm__ volatile("mfence" ::: "memory")

struct vdesc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct vq {
    struct vdesc desc[NQ];
    struct { uint16_t flags, idx, ring[NQ], used_event; } avail;
    uint8_t pad[4096 - 16 * NQ - 2 * (NQ + 3)];
    struct { uint16_t flags, idx; struct { uint32_t id, len; } ring[NQ]; uint16_t avail_event; } used;
} __attribute__((aligned(4096)));

static struct vq rxq, txq;
static uint8_t rx_bufs[NQ][VNET_BUF] __attribute__((aligned(4096)));
static uint8_t tx_bufs[NQ][VNET_BUF] __attribute__((aligned(4096)));
static uint16_t rx_used_seen, rx_avail, rx_published;   /* shadows of the rings' indices */
static uint16_t tx_used_seen, tx_avail, tx_published;
static uint64_t options;
uint8_t vnet_mac[6];
uint16_t vnet_mtu;
uint64_t vnet_features, vnet_kicks;

static void setup_queue(uint32_t sel, struct vq *q)
{
    uint64_t d = (uint64_t)&q->desc, a = (uint64_t)&q->avail, u = (uint64_t)&q->used;
    R(0x030) = sel;
    R(0x038) = NQ;
    R(0x080) = (uint32_t)d; R(0x084) = (uint32_t)(d >> 32);
    R(0x090) = (uint32_t)a; R(0x094) = (uint32_t)(a >> 32);
    R(0x0A0) = (uint32_t)u; R(0x0A4) = (uint32_t)(u >> 32);
    R(0x044) = 1;
}

/* Interrupts: wanted at the next used buffer (VNET_OPT_IRQ), else never. */
static void irq_wish(struct vq *q, uint16_t seen)
{
    if (options & VNET_OPT_IRQ) {
        q->avail.flags = 0;
        q->avail.used_event = seen;
    } else {
        q->avail.flags = AVAIL_F_NO_INTERRUPT;
        q->avail.used_event = (uint16_t)(seen - 1);
    }
}

int vnet_init(uint64_t opts)
{
    options = opts;
    if (!(boot->flags & BOOT_F_NET) || R(0x000) != 0x74726976 || R(0x004) != 2 || R(0x008) != 1)
        return -1;
    R(0x070) = 0;
    R(0x070) = 1 | 2;
    R(0x014) = 0;
    uint64_t offered = R(0x010);
    R(0x014) = 1;
    offered |= (uint64_t)R(0x010) << 32;
    uint64_t want = F_VERSION_1 | F_MAC | F_MTU;
    if (!(opts & VNET_OPT_NO_CSUM))
        want |= F_CSUM | F_GUEST_CSUM;
    if (!(opts & VNET_OPT_NO_EVENT_IDX))
        want |= F_EVENT_IDX;
    vnet_features = offered & want;
    if (!(vnet_features & F_VERSION_1) || !(vnet_features & F_MAC))
        return -1;
    R(0x024) = 0;
    R(0x020) = (uint32_t)vnet_features;
    R(0x024) = 1;
    R(0x020) = (uint32_t)(vnet_features >> 32);
    R(0x070) = 1 | 2 | 8;
    if (!(R(0x070) & 8))
        return -1;
    for (int i = 0; i < 6; i++)
        vnet_mac[i] = C8(i);
    vnet_mtu = (vnet_features & F_MTU) ? (uint16_t)(C8(10) | C8(11) << 8) : 1500;
    for (int i = 0; i < NQ; i++) {
        rxq.desc[i] = (struct vdesc){ (uint64_t)rx_bufs[i], VNET_BUF, D_WRITE, 0 };
        rxq.avail.ring[i] = (uint16_t)i;
        txq.desc[i] = (struct vdesc){ (uint64_t)tx_bufs[i], 0, 0, 0 };
    }
    rx_used_seen = rxq.used.idx;
    tx_used_seen = txq.used.idx;
    rx_avail = rx_published = (uint16_t)(rxq.avail.idx + NQ);
    tx_avail = tx_published = txq.avail.idx;
    irq_wish(&rxq, rx_used_seen);
    irq_wish(&txq, tx_used_seen);
    barrier();
    rxq.avail.idx = rx_published;
    setup_queue(0, &rxq);
    setup_queue(1, &txq);
    R(0x070) = 1 | 2 | 8 | 4;
    return 0;
}

uint8_t *vnet_rx_next(uint32_t *len, uint16_t *id)
{
    if (*(volatile uint16_t *)&rxq.used.idx == rx_used_seen)
        return 0;
    barrier();
    uint32_t i = rxq.used.ring[rx_used_seen % NQ].id;
    *len = rxq.used.ring[rx_used_seen % NQ].len;
    rx_used_seen++;
    if (i >= NQ || *len > VNET_BUF)
        i = 0, *len = 0;                /* a device gone wrong: an empty packet */
    *id = (uint16_t)i;
    return rx_bufs[i];
}

void vnet_rx_done(uint16_t id)
{
    rxq.avail.ring[rx_avail % NQ] = id;
    rx_avail++;
    if (options & VNET_OPT_KICK_EACH)
        vnet_flush();
}

static void reclaim_tx(void)
{
    tx_used_seen = *(volatile uint16_t *)&txq.used.idx;
}

uint8_t *vnet_tx_buf(void)
{
    reclaim_tx();
    while ((uint16_t)(tx_avail - tx_used_seen) >= NQ) {
        vnet_flush();                   /* the device completes transmits while notified */
        cpu_relax();
        reclaim_tx();
    }
    return tx_bufs[tx_avail % NQ];
}

void vnet_tx_send(uint32_t len)
{
    uint16_t i = tx_avail % NQ;
    txq.desc[i].len = len;
    txq.avail.ring[i] = i;
    tx_avail++;
    if (options & VNET_OPT_KICK_EACH)
        vnet_flush();
}

/* Publish what was added since the last flush; notify the device if it asks. */
static void publish(struct vq *q, uint16_t *published, uint16_t now, uint32_t queue)
{
    if (now == *published)
        return;
    uint16_t old = *published;
    barrier();
    q->avail.idx = now;
    *published = now;
    mfence();                           /* the index before the device's wish is read */
    int kick;
    if (vnet_features & F_EVENT_IDX) {
        uint16_t event = *(volatile uint16_t *)&q->used.avail_event;
        kick = (uint16_t)(now - event - 1) < (uint16_t)(now - old);
    } else {
        kick = !(*(volatile uint16_t *)&q->used.flags & USED_F_NO_NOTIFY);
    }
    if (kick || (options & VNET_OPT_KICK_EACH)) {
        R(0x050) = queue;
        vnet_kicks++;
    }
}

void vnet_flush(void)
{
    publish(&txq, &tx_published, tx_avail, 1);
    publish(&rxq, &rx_published, rx_avail, 0);
    irq_wish(&rxq, rx_used_seen);
    irq_wish(&txq, *(volatile uint16_t *)&txq.used.idx);
}
