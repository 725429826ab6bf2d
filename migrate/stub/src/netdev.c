/* The virtio-mmio network device (specs/ioreq.md, "virtio-mmio network
 * device").  Queue 0 receives, queue 1 transmits; packets reach the host
 * through the net ring's slots (env->tx_kick, NET_RX).  Nothing the guest
 * controls is trusted: every descriptor, index and header is fetched once
 * into local memory, then checked, then used. */
#include "netdev.h"

#define VQ_MAX          256
#define CHAIN_MAX       64      /* descriptors in one chain; more is malformed (a loop ends here) */
#define ETH_MIN         14
#define ETH_EXTRA       18      /* Ethernet header and one VLAN tag on top of the MTU */

#define F_CSUM          0
#define F_GUEST_CSUM    1
#define F_MTU           3
#define F_MAC           5
#define F_STATUS        16
#define F_EVENT_IDX     29
#define F_VERSION_1     32
#define OFFERED ((1ULL << F_CSUM) | (1ULL << F_GUEST_CSUM) | (1ULL << F_MTU) | (1ULL << F_MAC) \
                 | (1ULL << F_STATUS) | (1ULL << F_EVENT_IDX) | (1ULL << F_VERSION_1))

#define S_DRIVER_OK     4
#define S_FEATURES_OK   8
#define S_NEEDS_RESET   0x40

#define D_NEXT          1
#define D_WRITE         2
#define D_INDIRECT      4
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1
#define HDR_F_NEEDS_CSUM 1
#define HDR_F_DATA_VALID 2

#define RXQ 0
#define TXQ 1

#define barrier() __asm__ volatile("" ::: "memory")
#define mfence() __asm__ volatile("mfence" ::: "memory")

struct vdesc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct seg { uint64_t addr; uint32_t len; };

struct vq {
    uint32_t num, ready;
    uint64_t desc, avail, used;
    uint16_t last_avail, used_idx;
};

struct netdev {
    uint32_t status, dev_features_sel, drv_features_sel, queue_sel;
    uint64_t driver_features;
    struct vq q[2];
    uint32_t isr, config_generation, irq_level, rx_starved;
    uint8_t mac[6];
    uint16_t mtu;
    uint64_t rx_packets, tx_packets, rx_dropped, tx_dropped, errors;
};

static struct netdev nd;
static struct netdev_env env;

static void copy(uint8_t *d, const uint8_t *s, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        d[i] = s[i];
}

static int has(int feature) { return (nd.driver_features >> feature) & 1; }

static void update_irq(void)
{
    uint32_t level = nd.isr != 0;
    if (level != nd.irq_level) {
        nd.irq_level = level;
        env.set_irq((int)level);
    }
}

static void publish_offloads(void)
{
    env.ring->guest_csum = (nd.status & S_DRIVER_OK) && has(F_GUEST_CSUM);
}

static void reset(void)
{
    struct netdev keep = nd;
    for (uint32_t i = 0; i < sizeof(nd); i++)
        ((uint8_t *)&nd)[i] = 0;
    copy(nd.mac, keep.mac, 6);
    nd.mtu = keep.mtu;
    nd.rx_packets = keep.rx_packets;
    nd.tx_packets = keep.tx_packets;
    nd.rx_dropped = keep.rx_dropped;
    nd.tx_dropped = keep.tx_dropped;
    nd.errors = keep.errors;
    nd.irq_level = keep.irq_level;      /* so that a raised line is lowered */
    update_irq();
    publish_offloads();
}

void netdev_init(const struct netdev_env *e)
{
    env = *e;
    for (uint32_t i = 0; i < sizeof(nd); i++)
        ((uint8_t *)&nd)[i] = 0;
    for (int i = 0; i < 6; i++)
        nd.mac[i] = env.ring->mac[i];
    uint16_t mtu = env.ring->mtu;
    nd.mtu = mtu < 68 || mtu > 9000 ? 1500 : mtu;
    publish_offloads();
}

/* A guest range as a device pointer, or 0 unless it lies inside one range of
 * guest RAM (below the 32-bit MMIO hole, or from 4 GiB on). */
static uint8_t *gptr(uint64_t gpa, uint64_t len)
{
    const uint64_t high = 1ULL << 32;
    if (gpa <= env.guest_size && len <= env.guest_size - gpa)
        return env.guest + gpa;
    if (gpa >= high && gpa - high <= env.guest_high_size && len <= env.guest_high_size - (gpa - high))
        return env.guest + gpa;
    return 0;
}

static void fail(const char *why, uint64_t what)
{
    env.log(why, what, 1);
    nd.status |= S_NEEDS_RESET;
    nd.isr |= 2;
    nd.errors++;
    update_irq();
}

static int live(void)
{
    return (nd.status & S_DRIVER_OK) && !(nd.status & S_NEEDS_RESET);
}

/* The queue's rings inside guest RAM and aligned as virtio requires. */
static int vq_ok(const struct vq *q)
{
    return q->num && !(q->desc & 15) && !(q->avail & 1) && !(q->used & 3)
        && gptr(q->desc, 16ULL * q->num) && gptr(q->avail, 6 + 2ULL * q->num)
        && gptr(q->used, 6 + 8ULL * q->num);
}

static volatile uint16_t *avail_ring(const struct vq *q) { return (volatile uint16_t *)gptr(q->avail, 6 + 2ULL * q->num); }
static volatile uint16_t *used_ring(const struct vq *q) { return (volatile uint16_t *)gptr(q->used, 6 + 8ULL * q->num); }

/* The chain at `head`, each descriptor fetched once: every one device-writable
 * (write) or none, inside guest RAM, no INDIRECT, at most CHAIN_MAX of them.
 * Returns the number of segments and their total in *total, or -1. */
static int read_chain(const struct vq *q, uint16_t head, int write, struct seg *segs, uint64_t *total)
{
    volatile const struct vdesc *table = (volatile const struct vdesc *)gptr(q->desc, 16ULL * q->num);
    uint32_t idx = head, n = 0;
    uint64_t sum = 0;
    for (;;) {
        if (idx >= q->num || n == CHAIN_MAX)
            return -1;
        struct vdesc d;
        d.addr = table[idx].addr;
        d.len = table[idx].len;
        d.flags = table[idx].flags;
        d.next = table[idx].next;
        if ((d.flags & D_INDIRECT) || ((d.flags & D_WRITE) != 0) != write || !gptr(d.addr, d.len))
            return -1;
        segs[n].addr = d.addr;
        segs[n].len = d.len;
        sum += d.len;
        n++;
        if (!(d.flags & D_NEXT))
            break;
        idx = d.next;
    }
    *total = sum;
    return (int)n;
}

static void put_used(struct vq *q, volatile uint16_t *used, uint16_t head, uint32_t len)
{
    volatile uint32_t *elem = (volatile uint32_t *)(used + 2) + 2 * (q->used_idx % q->num);
    elem[0] = head;
    elem[1] = len;
    q->used_idx++;
}

/* Used elements are written; store the index, then interrupt if the driver
 * asked for it (flags, or used_event with EVENT_IDX).  The mfence orders the
 * index store before the load of the driver's wish (x86 reorders them). */
static void publish_used(struct vq *q, uint16_t old)
{
    if (q->used_idx == old)
        return;
    volatile uint16_t *used = used_ring(q), *avail = avail_ring(q);
    barrier();
    used[1] = q->used_idx;
    mfence();
    int need;
    if (has(F_EVENT_IDX)) {
        uint16_t event = avail[2 + q->num];
        need = (uint16_t)(q->used_idx - event - 1) < (uint16_t)(q->used_idx - old);
    } else {
        need = !(avail[0] & AVAIL_F_NO_INTERRUPT);
    }
    if (need) {
        nd.isr |= 1;
        update_irq();
    }
}

/* Whether the driver should notify the device of new buffers in q: with
 * EVENT_IDX avail_event = last_avail (notify) or last_avail - 1 (never, as
 * long as the driver's old index is at or past last_avail), else the used
 * ring's NO_NOTIFY flag. */
static void want_notify(struct vq *q, int on)
{
    volatile uint16_t *used = used_ring(q);
    if (has(F_EVENT_IDX))
        used[2 + 4 * q->num] = on ? q->last_avail : (uint16_t)(q->last_avail - 1);
    else
        used[0] = on ? 0 : USED_F_NO_NOTIFY;
}

/* ---- transmit ------------------------------------------------------------ */

/* Check the driver's header in place and rewrite it for the host: no GSO,
 * at most NEEDS_CSUM (with VIRTIO_NET_F_CSUM and offsets inside the frame). */
static int tx_header_ok(uint8_t *pkt, uint64_t len)
{
    uint64_t frame = len - NET_HDR_SIZE;
    uint8_t flags = pkt[0], gso = pkt[1];
    uint16_t start = (uint16_t)(pkt[6] | pkt[7] << 8), off = (uint16_t)(pkt[8] | pkt[9] << 8);
    if (gso != 0 || (flags & ~HDR_F_NEEDS_CSUM) || frame < ETH_MIN || frame > (uint64_t)nd.mtu + ETH_EXTRA)
        return 0;
    if ((flags & HDR_F_NEEDS_CSUM) && (!has(F_CSUM) || (uint64_t)start + off + 2 > frame))
        return 0;
    for (int i = 1; i < (int)NET_HDR_SIZE; i++)
        if (i < 6 || i > 9 || !flags)
            pkt[i] = 0;                 /* gso_type, hdr_len, gso_size, num_buffers: 0 */
    return 1;
}

static void flush_tx(uint32_t *nslots)
{
    if (!*nslots)
        return;
    env.ring->tx_count = *nslots;
    barrier();
    env.tx_kick();
    nd.tx_packets += *nslots;
    *nslots = 0;
}

static void tx_process(void)
{
    struct vq *q = &nd.q[TXQ];
    if (!live() || !q->ready)
        return;
    if (!vq_ok(q)) {
        fail("transmit queue outside guest RAM or misaligned", q->desc);
        return;
    }
    volatile uint16_t *avail = avail_ring(q), *used = used_ring(q);
    uint16_t old = q->used_idx;
    uint32_t nslots = 0;
    struct seg segs[CHAIN_MAX];
    for (;;) {
        uint16_t avail_idx = avail[1];
        if ((uint16_t)(avail_idx - q->last_avail) > q->num) {
            fail("transmit avail index jumped", avail_idx);
            break;
        }
        if (q->last_avail == avail_idx) {
            want_notify(q, 1);          /* every new packet: the device runs only on kicks */
            mfence();
            if (avail[1] != avail_idx)
                continue;
            break;
        }
        uint16_t head = avail[2 + q->last_avail % q->num];
        uint64_t total;
        int n = read_chain(q, head, 0, segs, &total);
        if (n < 0) {
            fail("bad transmit descriptor chain", head);
            break;
        }
        if (total < NET_HDR_SIZE + ETH_MIN || total > NET_SLOT_SIZE) {
            nd.tx_dropped++;
        } else {
            uint8_t *slot = env.tx_slots + (uint64_t)nslots * NET_SLOT_SIZE;
            uint64_t at = 0;
            for (int i = 0; i < n; i++) {
                copy(slot + at, gptr(segs[i].addr, segs[i].len), segs[i].len);
                at += segs[i].len;
            }
            if (tx_header_ok(slot, total)) {
                env.ring->tx_len[nslots++] = (uint32_t)total;
            } else {
                nd.tx_dropped++;
            }
        }
        put_used(q, used, head, 0);
        q->last_avail++;
        if (nslots == NET_SLOTS) {
            flush_tx(&nslots);
            publish_used(q, old);
            old = q->used_idx;
        }
    }
    flush_tx(&nslots);
    publish_used(q, old);
}

/* ---- receive -------------------------------------------------------------- */

static uint16_t csum_fold(const uint8_t *p, uint64_t n)
{
    uint64_t sum = 0;
    for (uint64_t i = 0; i + 1 < n; i += 2)
        sum += (uint32_t)p[i] << 8 | p[i + 1];
    if (n & 1)
        sum += (uint32_t)p[n - 1] << 8;
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)~sum;
}

/* The host's header of a received packet: no GSO; a partial checksum with
 * offsets inside the frame, completed here if the driver does not take partial
 * checksums; DATA_VALID only for a driver with GUEST_CSUM.  0: drop it. */
static int rx_header_fix(uint8_t *pkt, uint32_t len)
{
    uint32_t frame = len - NET_HDR_SIZE;
    uint8_t flags = pkt[0] & (HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID);
    uint16_t start = (uint16_t)(pkt[6] | pkt[7] << 8), off = (uint16_t)(pkt[8] | pkt[9] << 8);
    if (pkt[1] != 0)
        return 0;
    if (flags & HDR_F_NEEDS_CSUM) {
        if ((uint32_t)start + off + 2 > frame)
            return 0;
        if (!has(F_GUEST_CSUM)) {
            uint8_t *f = pkt + NET_HDR_SIZE;
            uint16_t sum = csum_fold(f + start, frame - start);
            f[start + off] = (uint8_t)(sum >> 8);
            f[start + off + 1] = (uint8_t)sum;
            flags = 0;
        }
    }
    if (!has(F_GUEST_CSUM))
        flags &= (uint8_t)~HDR_F_DATA_VALID;
    pkt[0] = flags;
    for (int i = 1; i < (int)NET_HDR_SIZE; i++)
        if (i < 6 || i > 9 || !(flags & HDR_F_NEEDS_CSUM))
            pkt[i] = 0;
    pkt[10] = 1;                        /* num_buffers */
    return 1;
}

int netdev_rx(uint32_t first, uint32_t count)
{
    if (first >= NET_SLOTS || count == 0 || count > NET_SLOTS)
        return -1;
    struct vq *q = &nd.q[RXQ];
    if (!live() || !q->ready) {
        nd.rx_dropped += count;         /* no driver: the wire drops them */
        return (int)count;
    }
    if (!vq_ok(q)) {
        fail("receive queue outside guest RAM or misaligned", q->desc);
        nd.rx_dropped += count;
        return (int)count;
    }
    volatile uint16_t *avail = avail_ring(q), *used = used_ring(q);
    uint16_t old = q->used_idx;
    uint32_t taken = 0;
    int starved = 0;
    struct seg segs[CHAIN_MAX];
    while (taken < count) {
        uint32_t slot = (first + taken) % NET_SLOTS;
        uint32_t len = env.ring->rx_len[slot];
        uint8_t *pkt = env.rx_slots + (uint64_t)slot * NET_SLOT_SIZE;
        if (len < NET_HDR_SIZE + ETH_MIN || len > NET_SLOT_SIZE || !rx_header_fix(pkt, len)) {
            nd.rx_dropped++;
            taken++;
            continue;
        }
        uint16_t avail_idx = avail[1];
        if ((uint16_t)(avail_idx - q->last_avail) > q->num) {
            fail("receive avail index jumped", avail_idx);
            nd.rx_dropped += count - taken;
            taken = count;
            break;
        }
        if (q->last_avail == avail_idx) {
            want_notify(q, 1);          /* out of buffers: tell me when there are more */
            mfence();
            if (avail[1] != avail_idx)
                continue;
            starved = 1;
            break;
        }
        uint16_t head = avail[2 + q->last_avail % q->num];
        uint64_t room;
        int n = read_chain(q, head, 1, segs, &room);
        if (n < 0) {
            fail("bad receive descriptor chain", head);
            nd.rx_dropped += count - taken;
            taken = count;
            break;
        }
        if (room < len) {               /* the buffer stays for a smaller packet */
            nd.rx_dropped++;
            taken++;
            continue;
        }
        uint32_t at = 0;
        for (int i = 0; i < n && at < len; i++) {
            uint32_t part = segs[i].len < len - at ? segs[i].len : len - at;
            copy(gptr(segs[i].addr, part), pkt + at, part);
            at += part;
        }
        put_used(q, used, head, len);
        q->last_avail++;
        nd.rx_packets++;
        taken++;
    }
    nd.rx_starved = (uint32_t)starved;
    if (!starved && live())
        want_notify(q, 0);
    publish_used(q, old);       /* also after a failure: what was delivered before it stays */
    return (int)taken;
}

static void rx_kicked(void)
{
    if (nd.rx_starved && live() && nd.q[RXQ].ready && vq_ok(&nd.q[RXQ])) {
        nd.rx_starved = 0;
        want_notify(&nd.q[RXQ], 0);
        env.rx_wanted();
    }
}

/* ---- registers ------------------------------------------------------------ */

uint64_t netdev_mmio_read(uint64_t off, uint32_t size)
{
    if (off >= 0x100) {                 /* struct virtio_net_config, 12 bytes */
        uint8_t cfg[12] = { 0 };
        copy(cfg, nd.mac, 6);
        cfg[6] = 1;                     /* status: VIRTIO_NET_S_LINK_UP */
        cfg[8] = 1;                     /* max_virtqueue_pairs */
        cfg[10] = (uint8_t)nd.mtu;
        cfg[11] = (uint8_t)(nd.mtu >> 8);
        uint64_t v = 0;
        for (uint32_t i = 0; i < size && i < 8; i++)
            if (off - 0x100 + i < sizeof(cfg))
                v |= (uint64_t)cfg[off - 0x100 + i] << (8 * i);
        return v;
    }
    uint32_t sel = nd.queue_sel;
    switch (off) {
    case 0x000: return 0x74726976;      /* "virt" */
    case 0x004: return 2;
    case 0x008: return 1;               /* network card */
    case 0x00C: return 0x554d4551;
    case 0x010: return nd.dev_features_sel < 2 ? (uint32_t)(OFFERED >> (32 * nd.dev_features_sel)) : 0;
    case 0x034: return sel < 2 ? VQ_MAX : 0;
    case 0x044: return sel < 2 ? nd.q[sel].ready : 0;
    case 0x060: return nd.isr;
    case 0x070: return nd.status;
    case 0x0FC: return nd.config_generation;
    default: return 0;
    }
}

static void set_lo(uint64_t *p, uint32_t v) { *p = (*p & ~0xFFFFFFFFULL) | v; }
static void set_hi(uint64_t *p, uint32_t v) { *p = (*p & 0xFFFFFFFFULL) | ((uint64_t)v << 32); }

void netdev_mmio_write(uint64_t off, uint32_t v)
{
    uint32_t sel = nd.queue_sel;
    struct vq *q = sel < 2 ? &nd.q[sel] : 0;
    int idle = q && !q->ready;          /* queue registers change only while not ready */
    switch (off) {
    case 0x014: nd.dev_features_sel = v; break;
    case 0x020:
        if (nd.drv_features_sel < 2) {
            uint64_t mask = 0xFFFFFFFFULL << (32 * nd.drv_features_sel);
            nd.driver_features = (nd.driver_features & ~mask)
                               | (((uint64_t)v << (32 * nd.drv_features_sel)) & OFFERED);
        }
        break;
    case 0x024: nd.drv_features_sel = v; break;
    case 0x030: nd.queue_sel = v; break;
    case 0x038: if (idle) q->num = (v && v <= VQ_MAX && !(v & (v - 1))) ? v : 0; break;
    case 0x044: if (q) q->ready = (v & 1) && q->num; break;
    case 0x050:
        if (v == TXQ)
            tx_process();
        else if (v == RXQ)
            rx_kicked();
        break;
    case 0x064: nd.isr &= ~v; update_irq(); break;
    case 0x070:
        if (v == 0) {
            reset();
            break;
        }
        if ((v & S_FEATURES_OK) && !has(F_VERSION_1))
            v &= ~(uint32_t)S_FEATURES_OK;      /* only the modern 12-byte header */
        uint32_t was = nd.status;
        nd.status = v | (nd.status & S_NEEDS_RESET);
        publish_offloads();
        if ((v & S_DRIVER_OK) && !(was & S_DRIVER_OK)) {
            nd.rx_starved = 0;
            env.rx_wanted();            /* a (re)started driver: held packets may go in */
        }
        break;
    case 0x080: if (idle) set_lo(&q->desc, v); break;
    case 0x084: if (idle) set_hi(&q->desc, v); break;
    case 0x090: if (idle) set_lo(&q->avail, v); break;
    case 0x094: if (idle) set_hi(&q->avail, v); break;
    case 0x0A0: if (idle) set_lo(&q->used, v); break;
    case 0x0A4: if (idle) set_hi(&q->used, v); break;
    default: break;
    }
}

/* ---- device state ----------------------------------------------------------- */
#define NET_FIELDS(F) \
    F(status) F(dev_features_sel) F(drv_features_sel) F(queue_sel) F(driver_features)
#define QUEUE_FIELDS(F) \
    F(num) F(ready) F(desc) F(avail) F(used) F(last_avail) F(used_idx)
#define TAIL_FIELDS(F) \
    F(isr) F(config_generation) F(irq_level) F(rx_starved) F(mtu) \
    F(rx_packets) F(tx_packets) F(rx_dropped) F(tx_dropped) F(errors)

void netdev_save(struct ds_writer *w)
{
    ds_record(w, "virtio-net", 0, 1, 1);
#define SAVE(f) ds_u64(w, #f, nd.f);
#define SAVE_Q(f) ds_u64(w, "rx_" #f, nd.q[RXQ].f); ds_u64(w, "tx_" #f, nd.q[TXQ].f);
    NET_FIELDS(SAVE)
    QUEUE_FIELDS(SAVE_Q)
    TAIL_FIELDS(SAVE)
    ds_bytes(w, "mac", nd.mac, 6);
}

/* A U64 field that fits `max`, else -1 (missing, wrong kind, too wide). */
static int get(const struct ds_record *rec, const char *name, uint64_t max, uint64_t *v)
{
    return ds_get_u64(rec, name, v) < 0 || *v > max ? -1 : 0;
}

static int load_queue(const struct ds_record *rec, const char *prefix, struct vq *q)
{
    static const char *const names[7] = { "num", "ready", "desc", "avail", "used", "last_avail", "used_idx" };
    uint64_t v[7];
    char name[DS_NAME];
    for (int i = 0; i < 7; i++) {
        int at = 0;
        for (const char *p = prefix; *p; p++)
            name[at++] = *p;
        for (const char *p = names[i]; *p && at < DS_NAME - 1; p++)
            name[at++] = *p;
        name[at] = 0;
        if (get(rec, name, i == 0 || i == 1 ? 0xFFFFFFFFULL : i >= 5 ? 0xFFFF : ~0ULL, &v[i]) < 0)
            return -1;
    }
    q->num = (uint32_t)v[0];
    q->ready = (uint32_t)v[1];
    q->desc = v[2];
    q->avail = v[3];
    q->used = v[4];
    q->last_avail = (uint16_t)v[5];
    q->used_idx = (uint16_t)v[6];
    if (q->num > VQ_MAX || (q->num & (q->num - 1)) || q->ready > 1 || (q->ready && !q->num)
        || q->used_idx != q->last_avail)
        return -1;
    return 0;
}

int netdev_load(const struct ds_record *rec)
{
    struct netdev n;
    uint64_t v;
    const uint8_t *mac;
    uint32_t maclen;
    for (uint32_t i = 0; i < sizeof(n); i++)
        ((uint8_t *)&n)[i] = 0;
#define LOAD(f) if (get(rec, #f, (uint64_t)(__typeof__(n.f))~0ULL, &v) < 0) return -1; n.f = (__typeof__(n.f))v;
    NET_FIELDS(LOAD)
    TAIL_FIELDS(LOAD)
    if (load_queue(rec, "rx_", &n.q[RXQ]) < 0 || load_queue(rec, "tx_", &n.q[TXQ]) < 0)
        return -1;
    if (ds_get_bytes(rec, "mac", &mac, &maclen) < 0 || maclen != 6)
        return -1;
    if ((n.driver_features & ~OFFERED) || n.irq_level > 1 || n.rx_starved > 1)
        return -1;
    for (int i = 0; i < 6; i++) {
        if (mac[i] != nd.mac[i]) {
            env.log("saved with another MAC address than this NIC's", 0, 0);
            return -1;
        }
    }
    if (n.mtu != nd.mtu) {
        env.log("saved with another MTU than this NIC's", n.mtu, 0);
        return -1;
    }
    copy(n.mac, nd.mac, 6);
    nd = n;
    publish_offloads();
    return 0;
}

void netdev_sync_irq(void)
{
    nd.irq_level = 2;
    update_irq();
}
