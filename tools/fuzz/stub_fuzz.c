/* libFuzzer harness for the stub's device model (migrate/stub/src/stub.c), built on the
 * host with ASan and UBSan by tools/fuzz_c.py.  The guest controls every ioreq, every
 * virtio descriptor chain and every UART register write this code parses: an input is a
 * sequence of operations a guest (or a hostile saved state) can cause.
 *
 * The device model is compiled into this file (so its static state can be reset between
 * inputs) against tools/fuzz/rt.h.  The stub's fixed physical addresses are mapped here:
 * the ioreq page, its data page, the block ring, the state buffer and the bounce buffers
 * at 0x400000, and the guest-RAM window at 0x10000000, WINDOW bytes followed by a
 * PROT_NONE guard, so any access outside the window faults.  The block back end is a fake
 * that checks every request the stub queues (op, length, bounce buffer, sector range).
 *
 * Invariants checked after every operation (a violation aborts, so libFuzzer reports it):
 * UART registers hold only what a write can produce and its FIFO indices stay in range;
 * virtio-blk's queue size is 0 or a power of two up to 64, a ready queue has a size, every
 * request taken is in the used ring; IRQ hypercalls name the device's line; SAVE then LOAD
 * then SAVE gives the same bytes.
 *
 * The virtio-net device (netdev.c, compiled apart by tools/fuzz_c.py) is present in
 * inputs whose first byte says so: its registers, a driver's queue set-up, transmit
 * chains, receive buffers and packets the host delivers (NET_RX) are operations too, and
 * the fake back end checks each transmit kick (count and lengths of the TX slots).
 *
 * Adding a device: map its memory in LLVMFuzzerInitialize, set it up in
 * LLVMFuzzerTestOneInput, give it operations (its registers, its queues, what its back end
 * delivers), check its hypercalls in fuzz_out and its invariants in check_invariants();
 * SAVE/LOAD/SAVE identity covers its saved state. The rest is shared. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "stub.c"

#define WINDOW      0x10000UL           /* bytes of guest RAM in the window */
#define GUARD       0x100000UL
#define LOW_BASE    STUB_IOREQ_PAGE
#define LOW_SIZE    (STUB_NET_RX + NET_SLOTS * (uint64_t)NET_SLOT_SIZE - STUB_IOREQ_PAGE)
#define VIRTIO_BASE 0xD0000000UL
#define VIRTIO_IRQ  5
#define NET_BASE    0xD0001000UL
#define NET_IRQ     6
#define MAX_DISK    256                 /* sectors */

#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "stub_fuzz: invariant broken: %s (line %d)\n", \
                                                #cond, __LINE__); abort(); } } while (0)

struct input { const uint8_t *p; size_t n; };

static uint64_t take(struct input *in, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes && in->n; i++, in->n--)
        v |= (uint64_t)*in->p++ << (8 * i);
    return v;
}

static uint8_t disk[MAX_DISK * 512];
static uint8_t backend_mode;           /* 0 answer, 1 EIO, 2 no answer, 3 wrong id */
static uint32_t irq_levels;
static uint8_t saved[STUB_STATE_SIZE], again[STUB_STATE_SIZE];
static uint32_t tx_kicks;
static struct { uint64_t desc, avail, used; uint32_t num; } netq[2];   /* the harness's driver's queues */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc; (void)argv;
    void *low = mmap((void *)LOW_BASE, LOW_SIZE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    void *win = mmap((void *)STUB_WINDOW_BASE, WINDOW, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    void *guard = mmap((void *)(STUB_WINDOW_BASE + WINDOW), GUARD, PROT_NONE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE | MAP_NORESERVE, -1, 0);
    if (low != (void *)LOW_BASE || win != (void *)STUB_WINDOW_BASE || guard == MAP_FAILED) {
        fprintf(stderr, "stub_fuzz: cannot map the stub's memory at its fixed addresses\n");
        exit(1);
    }
    return 0;
}

/* ---- the host side of the stub's hypercalls ---------------------------------------- */
static void serve_block(void)          /* as migrate/stub/blockback.py serves the ring */
{
    uint32_t prod = ring->req_prod, done = ring->rsp_prod;
    if (backend_mode == 2 || prod - done > BLK_RING_SIZE)
        return;                                         /* a host that does not answer */
    for (; done != prod; done++) {
        volatile struct blk_req *rq = &ring->req[done % BLK_RING_SIZE];
        volatile struct blk_rsp *rsp = &ring->rsp[done % BLK_RING_SIZE];
        uint32_t op = rq->op, len = rq->len;
        uint64_t sector = rq->sector;
        CHECK(op <= BLK_OP_FLUSH);                      /* every request the stub makes is sound */
        CHECK(rq->id == done);
        if (op != BLK_OP_FLUSH) {
            CHECK(rq->buf == STUB_BOUNCE);
            CHECK(len % 512 == 0 && len <= STUB_BOUNCE_SIZE);
            CHECK(sector <= vblk.capacity && len / 512 <= vblk.capacity - sector);
            if (op == BLK_OP_READ)
                memcpy((void *)STUB_BOUNCE, disk + sector * 512, len);
            else
                memcpy(disk + sector * 512, (void *)STUB_BOUNCE, len);
        }
        rsp->id = backend_mode == 3 ? rq->id + 1 : rq->id;
        rsp->status = backend_mode == 1 ? BLK_EIO : BLK_OK;
    }
    ring->rsp_prod = prod;
}

void fuzz_out(uint16_t port, uint32_t value, int width)
{
    if (port == STUB_PORT_IRQ) {
        uint32_t irq = value & 0x7FFFFFFFu;
        CHECK(width == 4 && (irq == UART_IRQ || irq == VIRTIO_IRQ || (net_base && irq == NET_IRQ)));
        irq_levels = (irq_levels & ~(1u << irq)) | ((value >> 31) << irq);
    } else if (port == STUB_PORT_BLK) {
        CHECK(width == 1);
        serve_block();
    } else if (port == STUB_PORT_NET_TX) {             /* as migrate/stub/netback.py takes them */
        volatile struct net_ring *nr = (volatile struct net_ring *)STUB_NET_RING;
        CHECK(net_base && width == 1 && nr->tx_count >= 1 && nr->tx_count <= NET_SLOTS);
        for (uint32_t i = 0; i < nr->tx_count; i++)
            CHECK(nr->tx_len[i] >= NET_HDR_SIZE + 14 && nr->tx_len[i] <= NET_SLOT_SIZE);
        tx_kicks++;
    } else if (port == STUB_PORT_NET_RXBUF) {
        CHECK(net_base && width == 1);
    } else {
        CHECK(!"a hypercall on an unknown port");
    }
}

void fuzz_outs(uint16_t port, const void *p, uint64_t n)
{
    CHECK(port == STUB_PORT_CONSOLE);
    CHECK((const uint8_t *)p == uart.tx && n > 0 && n <= TXBUF_SIZE);
}

/* ---- invariants --------------------------------------------------------------------- */
static void check_invariants(void)
{
    CHECK(uart.rx_count <= FIFO_SIZE && uart.rx_head < FIFO_SIZE && uart.tx_len < TXBUF_SIZE);
    CHECK(!(uart.ier & ~0x0F) && !(uart.mcr & ~0x1F) && !(uart.fcr & ~0xC9) && !(uart.lsr_err & ~0x02));
    CHECK(uart.thr_ipending <= 1 && uart.irq_level <= 1);
    CHECK(uart.irq_level == ((irq_levels >> UART_IRQ) & 1));
    CHECK(vblk.queue_num <= VQ_MAX && !(vblk.queue_num & (vblk.queue_num - 1)));
    CHECK(!vblk.queue_ready || vblk.queue_num);
    CHECK(vblk.last_avail == vblk.used_idx);
    CHECK(!(vblk.driver_features & ~vblk_features()));
    CHECK(vblk.irq_level == (vblk.isr != 0) && vblk.irq_level == ((irq_levels >> VIRTIO_IRQ) & 1));
}

/* ---- operations ---------------------------------------------------------------------- */
static volatile struct ioreq *slot(void)
{
    volatile struct ioreq *r = &iopage->vcpu[0];
    memset((void *)r, 0, sizeof(*r));
    return r;
}

static uint8_t pick_size(struct input *in)
{
    static const uint8_t sizes[] = { 1, 2, 4, 8, 1, 4, 3, 0 };
    uint8_t b = (uint8_t)take(in, 1);
    return b & 0x80 ? b : sizes[b & 7];
}

static void fill_io_data(struct input *in, uint64_t count)
{
    for (uint64_t i = 0; i < count && i < 4096 && in->n; i++)
        io_data[i] = (uint8_t)take(in, 1);
}

static void op_pio(struct input *in)
{
    volatile struct ioreq *r = slot();
    uint8_t b = (uint8_t)take(in, 1);
    r->type = IOREQ_TYPE_PIO;
    r->addr = b & 0x80 ? take(in, 2) : UART_BASE + (b & 7) + (b & 0x40 ? 8 : 0);
    r->size = pick_size(in);
    r->dir = (uint8_t)(take(in, 1) % 3);
    r->data_is_ptr = (b & 0x20) != 0;
    r->count = b & 0x10 ? (uint32_t)take(in, 4) : (uint32_t)(take(in, 1) % 24);
    if (!r->data_is_ptr && !(b & 0x08))
        r->count = 1;
    r->data = r->data_is_ptr ? (b & 0x04 ? take(in, 8) : STUB_IOREQ_DATA) : take(in, 1);
    if (r->data_is_ptr)
        fill_io_data(in, r->count);
    r->result = (uint8_t)serve(r);
    CHECK(r->result <= IOREQ_ESTATE);
}

static void op_mmio(struct input *in)
{
    volatile struct ioreq *r = slot();
    uint8_t b = (uint8_t)take(in, 1);
    r->type = IOREQ_TYPE_MMIO;
    r->addr = b & 0x80 ? take(in, 8) : VIRTIO_BASE + take(in, 2) % 0x240;
    r->size = b & 0x40 ? pick_size(in) : 4;
    r->dir = (uint8_t)(take(in, 1) % 3);
    r->count = b & 0x20 ? (uint32_t)take(in, 2) : 1;
    r->data_is_ptr = (b & 0x10) != 0;
    r->data = b & 0x08 ? take(in, 8) : take(in, 4);
    r->result = (uint8_t)serve(r);
    CHECK(r->result <= IOREQ_ESTATE);
}

static void mmio_write(uint64_t off, uint32_t value)
{
    volatile struct ioreq *r = slot();
    r->type = IOREQ_TYPE_MMIO;
    r->addr = VIRTIO_BASE + off;
    r->size = 4;
    r->count = 1;
    r->dir = IOREQ_DIR_WRITE;
    r->data = value;
    CHECK(serve(r) == IOREQ_OK);
}

static void op_setup(struct input *in)          /* a driver's queue set-up, in one step */
{
    uint8_t b = (uint8_t)take(in, 1);
    uint32_t num = b & 0x80 ? (uint32_t)take(in, 4) : 1u << (b % 7);
    uint64_t desc = b & 0x40 ? take(in, 8) : (take(in, 1) * 256) % WINDOW;
    uint64_t avail = b & 0x20 ? take(in, 8) : (take(in, 1) * 256) % WINDOW;
    uint64_t used = b & 0x10 ? take(in, 8) : (take(in, 1) * 256) % WINDOW;
    mmio_write(0x070, 0);
    mmio_write(0x070, 1 | 2 | 8);
    mmio_write(0x024, 1);
    mmio_write(0x020, (uint32_t)take(in, 1));
    mmio_write(0x030, 0);
    mmio_write(0x038, num);
    mmio_write(0x080, (uint32_t)desc);
    mmio_write(0x084, (uint32_t)(desc >> 32));
    mmio_write(0x090, (uint32_t)avail);
    mmio_write(0x094, (uint32_t)(avail >> 32));
    mmio_write(0x0A0, (uint32_t)used);
    mmio_write(0x0A4, (uint32_t)(used >> 32));
    mmio_write(0x044, 1);
    mmio_write(0x070, 1 | 2 | 4 | 8);
}

static void put(uint64_t gpa, const void *p, uint64_t len)      /* guest memory, clipped */
{
    if (gpa < WINDOW)
        memcpy((uint8_t *)STUB_WINDOW_BASE + gpa, p, len < WINDOW - gpa ? len : WINDOW - gpa);
}

static void op_desc(struct input *in)           /* one descriptor of the table */
{
    uint8_t b = (uint8_t)take(in, 1);
    struct vdesc d;
    uint32_t idx = (uint32_t)take(in, 1) % 72;
    d.addr = b & 0x80 ? take(in, 8) : take(in, 2) % WINDOW;
    d.len = b & 0x40 ? (uint32_t)take(in, 4) : (uint32_t)take(in, 2);
    d.flags = b & 0x20 ? (uint16_t)take(in, 2) : (uint16_t)(take(in, 1) & 7);
    d.next = b & 0x10 ? (uint16_t)take(in, 2) : (uint16_t)(take(in, 1) % 72);
    put(vblk.desc + 16ULL * idx, &d, sizeof(d));
}

static void op_avail(struct input *in)          /* the avail ring: its index or an entry */
{
    uint8_t b = (uint8_t)take(in, 1);
    uint16_t v = (uint16_t)take(in, 2);
    if (b & 1)
        put(vblk.avail + 2, &v, 2);
    else
        put(vblk.avail + 4 + 2ULL * ((b >> 1) % 72), &v, 2);
}

static void op_request(struct input *in)        /* a whole well-formed chain, then notify */
{
    uint8_t b = (uint8_t)take(in, 1);
    uint32_t head = (uint32_t)take(in, 1) % 64, n = 2 + (b & 3);
    uint8_t hdr[16] = { 0 };
    hdr[0] = (uint8_t)(take(in, 1) % 6);        /* IN, OUT, ?, ?, FLUSH, ? */
    uint64_t sector = b & 0x80 ? take(in, 8) : take(in, 1);
    memcpy(hdr + 8, &sector, 8);
    uint64_t hdr_at = 0x8000, data_at = 0x9000;
    put(hdr_at, hdr, sizeof(hdr));
    for (uint32_t i = 0; i < n; i++) {
        struct vdesc d = { data_at + 0x1000 * i, (uint32_t)(512 * (take(in, 1) % 9)), 0, 0 };
        if (i == 0) {
            d.addr = hdr_at;
            d.len = 16;
        } else if (i == n - 1) {
            d.len = 1;
            d.flags = DESC_F_WRITE;
        } else if (hdr[0] == 0) {
            d.flags = DESC_F_WRITE;
        }
        if (i + 1 < n) {
            d.flags |= DESC_F_NEXT;
            d.next = (uint16_t)((head + i + 1) % 64);
        }
        put(vblk.desc + 16ULL * ((head + i) % 64), &d, sizeof(d));
    }
    uint16_t idx = 0;                           /* the ring's idx, where it lies in the window */
    if (vblk.avail <= WINDOW - 4)
        memcpy(&idx, (uint8_t *)STUB_WINDOW_BASE + vblk.avail + 2, 2);
    uint16_t entry = (uint16_t)head;
    if (vblk.queue_num)
        put(vblk.avail + 4 + 2ULL * (idx % vblk.queue_num), &entry, 2);
    idx++;
    put(vblk.avail + 2, &idx, 2);
    mmio_write(0x050, 0);
}

static void op_save_load(void)
{
    CHECK(save_state() > 0);                    /* the state always fits */
    memcpy(saved, (void *)STUB_STATE_BUF, STUB_STATE_SIZE);
    CHECK(load_state() == 0);                   /* what SAVE wrote, LOAD accepts */
    CHECK(save_state() > 0);
    memcpy(again, (void *)STUB_STATE_BUF, STUB_STATE_SIZE);
    CHECK(memcmp(saved, again, STUB_STATE_SIZE) == 0);  /* and nothing changed */
}

static void op_load_bytes(struct input *in)     /* a hostile state buffer */
{
    uint8_t b = (uint8_t)take(in, 1);
    if (b & 1) {                                /* this stub's own state, a few bytes changed */
        CHECK(save_state() > 0);
        for (int i = 0; i < 1 + (b >> 5); i++) {
            uint32_t at = (uint32_t)take(in, 2) % 1024;
            ((uint8_t *)STUB_STATE_BUF)[at] = (uint8_t)take(in, 1);
        }
    } else {                                    /* bytes from the input */
        size_t n = take(in, 2) % 2048;
        memset((void *)STUB_STATE_BUF, 0, STUB_STATE_SIZE);
        for (size_t i = 0; i < n && in->n; i++)
            ((uint8_t *)STUB_STATE_BUF)[i] = (uint8_t)take(in, 1);
    }
    volatile struct ioreq *r = slot();
    r->type = IOREQ_TYPE_LOAD;
    r->size = 1;
    r->result = (uint8_t)serve(r);
    CHECK(r->result == IOREQ_OK || r->result == IOREQ_ESTATE);
}

static void op_input(struct input *in)
{
    volatile struct ioreq *r = slot();
    r->type = IOREQ_TYPE_INPUT;
    r->size = 1;
    r->count = (uint32_t)(take(in, 1) & 0x80 ? take(in, 4) : take(in, 1) % 32);
    fill_io_data(in, r->count);
    CHECK(serve(r) == IOREQ_OK && r->data <= r->count);
}

static void op_raw(struct input *in)            /* every field from the input */
{
    volatile struct ioreq *r = slot();
    r->addr = take(in, 8);
    r->data = take(in, 8);
    r->count = (uint32_t)take(in, 4);
    r->size = (uint8_t)take(in, 1);
    r->dir = (uint8_t)take(in, 1);
    r->type = (uint8_t)take(in, 1);
    r->data_is_ptr = (uint8_t)take(in, 1);
    if (r->type == IOREQ_TYPE_SAVE || r->type == IOREQ_TYPE_LOAD)
        r->type = IOREQ_TYPE_MMIO;              /* those have their own operations */
    r->result = (uint8_t)serve(r);
    CHECK(r->result <= IOREQ_ESTATE);
}

/* ---- virtio-net ---------------------------------------------------------------------- */
static void net_write(uint64_t off, uint32_t value)
{
    if (!net_base)
        return;                                 /* no network device in this input */
    volatile struct ioreq *r = slot();
    r->type = IOREQ_TYPE_MMIO;
    r->addr = NET_BASE + off;
    r->size = 4;
    r->count = 1;
    r->dir = IOREQ_DIR_WRITE;
    r->data = value;
    CHECK(serve(r) == IOREQ_OK);
}

static void op_net_mmio(struct input *in)
{
    volatile struct ioreq *r = slot();
    uint8_t b = (uint8_t)take(in, 1);
    r->type = IOREQ_TYPE_MMIO;
    r->addr = NET_BASE + take(in, 2) % 0x240;
    r->size = b & 0x40 ? pick_size(in) : 4;
    r->dir = (uint8_t)(take(in, 1) % 3);
    r->count = 1;
    r->data = b & 0x08 ? take(in, 8) : take(in, 4);
    r->result = (uint8_t)serve(r);
    CHECK(r->result <= IOREQ_ESTATE);
}

static void op_net_setup(struct input *in)      /* a driver: features, both queues, DRIVER_OK */
{
    uint8_t b = (uint8_t)take(in, 1);
    net_write(0x070, 0);
    net_write(0x070, 1 | 2);
    net_write(0x024, 0);
    net_write(0x020, (uint32_t)take(in, 4));
    net_write(0x024, 1);
    net_write(0x020, b & 1 ? 1 : (uint32_t)take(in, 1));       /* VERSION_1, mostly */
    net_write(0x070, 1 | 2 | 8);
    for (uint32_t q = 0; q < 2; q++) {
        netq[q].num = b & 0x80 ? (uint32_t)take(in, 2) : 1u << (take(in, 1) % 9);
        netq[q].desc = b & 0x40 ? take(in, 8) : 0x1000 + 0x4000ULL * q + (take(in, 1) % 4) * 0x10;
        netq[q].avail = netq[q].desc + 0x1000;
        netq[q].used = netq[q].desc + 0x2000 + (b & 0x20 ? take(in, 1) : 0);
        net_write(0x030, q);
        net_write(0x038, netq[q].num);
        net_write(0x080, (uint32_t)netq[q].desc);
        net_write(0x084, (uint32_t)(netq[q].desc >> 32));
        net_write(0x090, (uint32_t)netq[q].avail);
        net_write(0x094, (uint32_t)(netq[q].avail >> 32));
        net_write(0x0A0, (uint32_t)netq[q].used);
        net_write(0x0A4, (uint32_t)(netq[q].used >> 32));
        net_write(0x044, 1);
    }
    net_write(0x070, 1 | 2 | 4 | 8);
}

static void net_chain(struct input *in, uint32_t q, int write)  /* one chain, made available */
{
    uint32_t num = netq[q].num ? netq[q].num : 1, n = 1 + (uint32_t)take(in, 1) % 3;
    uint32_t head = (uint32_t)take(in, 1) % num;
    uint64_t buf = 0xA000 + 0x1800ULL * q;
    if (!write) {                               /* a packet: header, then an Ethernet frame */
        uint8_t pkt[96] = { 0 };
        for (size_t i = 0; i < sizeof(pkt) && in->n; i++)
            pkt[i] = i < 12 && !(in->p[0] & 1) ? 0 : (uint8_t)take(in, 1);
        put(buf, pkt, sizeof(pkt));
    }
    for (uint32_t i = 0; i < n; i++) {
        struct vdesc d;
        d.addr = buf + 0x200ULL * i;
        d.len = (uint32_t)(take(in, 1) & 0x80 ? take(in, 4) : (write ? 0x600 : 12 + 14 + take(in, 1) % 80));
        d.flags = (uint16_t)((write ? DESC_F_WRITE : 0) | (i + 1 < n ? DESC_F_NEXT : 0));
        d.next = (uint16_t)((head + i + 1) % num);
        if (take(in, 1) == 0xA5)
            d.flags ^= DESC_F_INDIRECT;
        put(netq[q].desc + 16ULL * ((head + i) % num), &d, sizeof(d));
    }
    uint16_t idx = 0, entry = (uint16_t)head;
    if (netq[q].avail <= WINDOW - 4)            /* (no overflow: avail is the guest's) */
        memcpy(&idx, (uint8_t *)STUB_WINDOW_BASE + netq[q].avail + 2, 2);
    put(netq[q].avail + 4 + 2ULL * (idx % num), &entry, 2);
    idx++;
    put(netq[q].avail + 2, &idx, 2);
}

static void op_net_tx(struct input *in)
{
    net_chain(in, 1, 0);
    net_write(0x050, 1);
}

static void op_net_rxbuf(struct input *in)
{
    net_chain(in, 0, 1);
    net_write(0x050, 0);
}

static void op_net_rx(struct input *in)         /* the host delivers packets (NET_RX) */
{
    volatile struct net_ring *nr = (volatile struct net_ring *)STUB_NET_RING;
    uint8_t b = (uint8_t)take(in, 1);
    uint32_t first = b & 0x80 ? (uint32_t)take(in, 1) : (uint32_t)take(in, 1) % NET_SLOTS;
    uint32_t count = b & 0x40 ? (uint32_t)take(in, 2) : 1 + (uint32_t)take(in, 1) % 4;
    for (uint32_t i = 0; i < count && i < NET_SLOTS; i++) {
        uint32_t s = (first + i) % NET_SLOTS;
        nr->rx_len[s] = b & 0x20 ? (uint32_t)take(in, 4) : 12 + 14 + (uint32_t)take(in, 1) % 100;
        uint8_t *pkt = (uint8_t *)STUB_NET_RX + (uint64_t)s * NET_SLOT_SIZE;
        for (uint32_t j = 0; j < 48 && in->n; j++)
            pkt[j] = j < 12 && !(b & 0x10) ? 0 : (uint8_t)take(in, 1);
    }
    volatile struct ioreq *r = slot();
    r->type = IOREQ_TYPE_NET_RX;
    r->size = 1;
    r->addr = first;
    r->count = count;
    r->result = (uint8_t)serve(r);
    CHECK(r->result == IOREQ_OK || r->result == IOREQ_EINVAL);
    CHECK(r->result != IOREQ_OK || r->data <= count);
    CHECK(r->result == IOREQ_EINVAL || net_base);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct input in = { data, size };
    memset((void *)LOW_BASE, 0, STUB_STATE_BUF + STUB_STATE_SIZE - LOW_BASE);
    memset((void *)STUB_WINDOW_BASE, 0, WINDOW);
    window_size = WINDOW;
    virtio_base = VIRTIO_BASE;
    virtio_irq = VIRTIO_IRQ;
    memset((void *)STUB_NET_RING, 0, sizeof(struct net_ring));
    uint8_t setup = (uint8_t)take(&in, 1);
    ring->capacity = take(&in, 1);
    irq_levels = 0;
    tx_kicks = 0;
    memset(netq, 0, sizeof(netq));
    uart_reset();
    vblk.irq_level = 0;
    vblk.capacity = ring->capacity;
    vblk_reset();
    backend_mode = 0;
    net_base = setup & 1 ? NET_BASE : 0;
    net_irq = NET_IRQ;
    if (net_base) {                             /* as workload_main boots it */
        volatile struct net_ring *nr = (volatile struct net_ring *)STUB_NET_RING;
        static const uint8_t mac[6] = { 0x52, 0x54, 0, 0x12, 0x34, 0x56 };
        for (int i = 0; i < 6; i++)
            nr->mac[i] = mac[i];
        nr->mtu = setup & 2 ? 9000 : 1500;
        struct netdev_env env = {
            .guest = (uint8_t *)STUB_WINDOW_BASE, .guest_size = window_size,
            .ring = nr, .tx_slots = (uint8_t *)STUB_NET_TX, .rx_slots = (uint8_t *)STUB_NET_RX,
            .set_irq = net_set_irq, .tx_kick = net_tx_kick, .rx_wanted = net_rx_wanted, .log = net_log,
        };
        netdev_init(&env);
    }
    for (int ops = 0; in.n && ops < 64; ops++) {
        switch (take(&in, 1) % 18) {
        case 0: case 1: op_pio(&in); break;
        case 2: op_mmio(&in); break;
        case 3: op_setup(&in); break;
        case 4: op_desc(&in); break;
        case 5: op_avail(&in); break;
        case 6: op_request(&in); break;
        case 7: mmio_write(0x050, 0); break;
        case 8: op_save_load(); break;
        case 9: op_load_bytes(&in); break;
        case 10: op_input(&in); break;
        case 11: op_raw(&in); break;
        case 12: backend_mode = (uint8_t)(take(&in, 1) % 4); break;
        case 13: op_net_mmio(&in); break;
        case 14: op_net_setup(&in); break;
        case 15: op_net_tx(&in); break;
        case 16: op_net_rxbuf(&in); break;
        default: op_net_rx(&in); break;
        }
        check_invariants();
    }
    return 0;
}
