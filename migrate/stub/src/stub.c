/* The device-model stub: a Mini-OS-like image whose ring-3 loop serves the
 * guest's port and MMIO accesses (specs/ioreq.md) with a 16550A UART at
 * 0x3F8/IRQ 4, a virtio-mmio block device and, if the domain has one, a
 * virtio-mmio network device (netdev.c) (specs/device-state.md for their
 * saved state).  All of its state lives in this VM's memory. */
#include "rt.h"
#include "ioreq.h"
#include "devstate.h"
#include "netdev.h"

#define UART_BASE   0x3F8
#define UART_IRQ    4
#define FIFO_SIZE   16
#define TXBUF_SIZE  256

static volatile struct ioreq_page *const iopage = (volatile struct ioreq_page *)STUB_IOREQ_PAGE;
static uint8_t *const io_data = (uint8_t *)STUB_IOREQ_DATA;
static volatile struct blk_ring *const ring = (volatile struct blk_ring *)STUB_BLK_RING;
static uint64_t window_size;        /* bytes of guest RAM from guest address 0 ... */
static uint64_t window_high;        /* ... and from STUB_GUEST_HIGH (4 GiB) */
static uint64_t virtio_base;        /* guest physical base of the virtio-mmio registers */
static uint32_t virtio_irq;
static uint64_t net_base;           /* guest physical base of the network device's registers; 0: none */
static uint32_t net_irq;

/* The stub's own log: its boot info has no UART flag, so printk goes to the
 * host's debug port 0xE9 (the domain log), never to the guest's console. */
#define stub_log printk

static void set_irq(uint32_t irq, int level)
{
    outl(STUB_PORT_IRQ, ((uint32_t)(level != 0) << 31) | irq);
}

/* ---- 16550A UART -------------------------------------------------------- */
struct uart {
    uint8_t rx[FIFO_SIZE];
    uint32_t rx_head, rx_count;
    uint8_t ier, lcr, mcr, lsr_err, msr, scr, dll, dlm, fcr;
    uint8_t thr_ipending, irq_level;
    uint32_t tx_len;
    uint8_t tx[TXBUF_SIZE];
};
static struct uart uart;

static void uart_flush(void)
{
    if (uart.tx_len) {
        outsb(STUB_PORT_CONSOLE, uart.tx, uart.tx_len);
        uart.tx_len = 0;
    }
}

static uint8_t uart_iir(void)
{
    uint8_t fifo = (uart.fcr & 1) ? 0xC0 : 0;
    if ((uart.ier & 4) && uart.lsr_err)
        return fifo | 0x06;
    if ((uart.ier & 1) && uart.rx_count)
        return fifo | 0x04;
    if ((uart.ier & 2) && uart.thr_ipending)
        return fifo | 0x02;
    if ((uart.ier & 8) && (uart.msr & 0x0F))
        return fifo | 0x00;
    return fifo | 0x01;
}

static void uart_update_irq(void)
{
    /* OUT2 gates the interrupt line on PC serial ports */
    int level = (uart_iir() & 1) == 0 && (uart.mcr & 0x08);
    if (level != uart.irq_level) {
        uart.irq_level = (uint8_t)level;
        set_irq(UART_IRQ, level);
    }
}

static void uart_rx_push(uint8_t c)
{
    if (uart.rx_count == FIFO_SIZE) {
        uart.lsr_err |= 0x02;           /* overrun */
        return;
    }
    uart.rx[(uart.rx_head + uart.rx_count++) % FIFO_SIZE] = c;
}

static void uart_reset(void)
{
    memset(&uart, 0, sizeof(uart));
    uart.dll = 12;                      /* 9600 baud, as after a PC reset */
    uart.thr_ipending = 1;
}

static void uart_write(uint32_t reg, uint8_t v)
{
    int dlab = uart.lcr & 0x80;
    switch (reg) {
    case 0:
        if (dlab) {
            uart.dll = v;
        } else if (uart.mcr & 0x10) {   /* loopback */
            uart_rx_push(v);
            uart.thr_ipending = 1;
        } else {
            uart.tx[uart.tx_len++] = v;
            if (v == '\n' || uart.tx_len == TXBUF_SIZE)
                uart_flush();
            uart.thr_ipending = 1;      /* transmits at once */
        }
        break;
    case 1:
        if (dlab) {
            uart.dlm = v;
        } else {
            if ((v & 2) && !(uart.ier & 2))
                uart.thr_ipending = 1;  /* enabling ETBEI with THR empty */
            uart.ier = v & 0x0F;
        }
        break;
    case 2:
        if (v & 2)
            uart.rx_count = 0;
        uart.fcr = v & 0xC9;
        break;
    case 3: uart.lcr = v; break;
    case 4:
        uart.mcr = v & 0x1F;
        if (uart.mcr & 0x10)            /* loopback: CTS=RTS DSR=DTR RI=OUT1 DCD=OUT2 */
            uart.msr = (uint8_t)(((uart.mcr & 2) << 3) | ((uart.mcr & 1) << 5)
                                 | ((uart.mcr & 0x0C) << 4) | (uart.msr & 0x0F));
        break;
    case 7: uart.scr = v; break;
    default: break;                     /* LSR and MSR are read-only */
    }
    uart_update_irq();
}

static uint8_t uart_read(uint32_t reg)
{
    int dlab = uart.lcr & 0x80;
    uint8_t v = 0xFF;
    switch (reg) {
    case 0:
        if (dlab) {
            v = uart.dll;
        } else if (uart.rx_count) {
            v = uart.rx[uart.rx_head];
            uart.rx_head = (uart.rx_head + 1) % FIFO_SIZE;
            uart.rx_count--;
        } else {
            v = 0;
        }
        break;
    case 1: v = dlab ? uart.dlm : uart.ier; break;
    case 2:
        v = uart_iir();
        if ((v & 0x0F) == 0x02)
            uart.thr_ipending = 0;      /* reading IIR clears a THRE interrupt */
        break;
    case 3: v = uart.lcr; break;
    case 4: v = uart.mcr; break;
    case 5:
        v = (uint8_t)(0x60 | (uart.rx_count ? 1 : 0) | uart.lsr_err);
        uart.lsr_err = 0;
        break;
    case 6:
        v = uart.msr;
        uart.msr &= 0xF0;               /* delta bits clear on read */
        break;
    case 7: v = uart.scr; break;
    }
    uart_update_irq();
    return v;
}

/* ---- virtio-mmio block device ------------------------------------------- */
#define VQ_MAX          64
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_SEG_MAX 2
#define SEG_MAX         16
#define DESC_F_NEXT     1
#define DESC_F_WRITE    2
#define DESC_F_INDIRECT 4
#define STATUS_NEEDS_RESET 0x40

struct vdesc { uint64_t addr; uint32_t len; uint16_t flags, next; };

struct vblk {
    uint32_t status, dev_features_sel, drv_features_sel, queue_sel;
    uint64_t driver_features;
    uint32_t queue_num, queue_ready;
    uint64_t desc, avail, used;
    uint16_t last_avail, used_idx;
    uint32_t isr, config_generation, irq_level;
    uint64_t capacity;
    uint64_t requests, errors;
};
static struct vblk vblk;

static uint64_t vblk_features(void)
{
    return (1ULL << VIRTIO_F_VERSION_1) | (1ULL << VIRTIO_BLK_F_FLUSH) | (1ULL << VIRTIO_BLK_F_SEG_MAX);
}

static void vblk_update_irq(void)
{
    uint32_t level = vblk.isr != 0;
    if (level != vblk.irq_level) {
        vblk.irq_level = level;
        set_irq(virtio_irq, (int)level);
    }
}

static void vblk_reset(void)
{
    uint64_t cap = vblk.capacity;
    uint32_t level = vblk.irq_level;
    memset(&vblk, 0, sizeof(vblk));
    vblk.capacity = cap;
    vblk.irq_level = level;             /* so a raised line is lowered */
    vblk_update_irq();
}

/* A guest physical range as a stub pointer, or 0 unless it lies inside one range of
 * guest RAM (below the 32-bit MMIO hole, or from 4 GiB on). */
static void *guest_ptr(uint64_t gpa, uint64_t len)
{
    if (gpa <= window_size && len <= window_size - gpa)
        return (void *)(STUB_WINDOW_BASE + gpa);
    if (gpa >= STUB_GUEST_HIGH && gpa - STUB_GUEST_HIGH <= window_high
        && len <= window_high - (gpa - STUB_GUEST_HIGH))
        return (void *)(STUB_WINDOW_BASE + gpa);
    return 0;
}

static void vblk_fail(const char *why, uint64_t what)
{
    stub_log("stub: virtio-blk: %s (%lx): device needs reset\n", why, what);
    vblk.status |= STATUS_NEEDS_RESET;
    vblk.isr |= 2;
    vblk.errors++;
    vblk_update_irq();
}

/* One request through the block ring; the host serves it during the kick. */
static uint32_t blk_io(uint32_t op, uint64_t sector, uint32_t len)
{
    uint32_t slot = ring->req_prod % BLK_RING_SIZE;
    volatile struct blk_req *rq = &ring->req[slot];
    rq->id = ring->req_prod;
    rq->sector = sector;
    rq->op = op;
    rq->len = len;
    rq->buf = STUB_BOUNCE;
    barrier();
    ring->req_prod++;
    barrier();
    outb(STUB_PORT_BLK, 0);
    barrier();
    /* The host answered through its own mapping of this page, which no dirty log sees:
     * a save that read the page while the host served sent it with this request in
     * flight, and a stub resumed from that copy would have it served again. Writing the
     * page now, after the answer, has it sent again (specs/ioreq.md, "Dirty tracking"). */
    ring->req_prod = ring->req_prod;
    if (ring->rsp_prod != ring->req_prod || ring->rsp[slot].id != rq->id)
        return BLK_EIO;                 /* the back end did not answer */
    return ring->rsp[slot].status;
}

/* Serve one descriptor chain; returns 0, or -1 when the chain is malformed. */
static int vblk_request(uint16_t head, uint32_t *written)
{
    volatile struct vdesc *table = guest_ptr(vblk.desc, 16ULL * vblk.queue_num);
    struct vdesc chain[SEG_MAX + 2];
    uint32_t n = 0, idx = head;
    for (;;) {
        if (idx >= vblk.queue_num || n == SEG_MAX + 2)
            return -1;
        chain[n] = table[idx];
        if (chain[n].flags & DESC_F_INDIRECT)
            return -1;
        n++;
        if (!(chain[n - 1].flags & DESC_F_NEXT))
            break;
        idx = chain[n - 1].next;
    }
    if (n < 2 || chain[0].len < 16 || (chain[0].flags & DESC_F_WRITE))
        return -1;
    struct vdesc *st = &chain[n - 1];
    if (st->len < 1 || !(st->flags & DESC_F_WRITE))
        return -1;
    const uint8_t *hdr = guest_ptr(chain[0].addr, 16);
    uint8_t *status = guest_ptr(st->addr, 1);
    if (!hdr || !status)
        return -1;
    uint32_t type;
    uint64_t sector;
    memcpy(&type, hdr, 4);
    memcpy(&sector, hdr + 8, 8);

    uint64_t total = 0;
    for (uint32_t i = 1; i + 1 < n; i++) {
        if (!guest_ptr(chain[i].addr, chain[i].len))
            return -1;
        int dev_writes = (chain[i].flags & DESC_F_WRITE) != 0;
        if ((type == 0 && !dev_writes) || (type == 1 && dev_writes))
            return -1;
        total += chain[i].len;
    }
    uint8_t result = BLK_OK;
    *written = 1;
    if (type == 0 || type == 1) {
        if (total % 512 || total > STUB_BOUNCE_SIZE)
            return -1;
        if (sector > vblk.capacity || total / 512 > vblk.capacity - sector) {
            result = 1;                 /* VIRTIO_BLK_S_IOERR */
        } else if (type == 1) {
            uint64_t off = 0;
            for (uint32_t i = 1; i + 1 < n; i++) {
                memcpy((uint8_t *)STUB_BOUNCE + off, guest_ptr(chain[i].addr, chain[i].len), chain[i].len);
                off += chain[i].len;
            }
            result = blk_io(BLK_OP_WRITE, sector, (uint32_t)total) == BLK_OK ? 0 : 1;
        } else {
            result = blk_io(BLK_OP_READ, sector, (uint32_t)total) == BLK_OK ? 0 : 1;
            if (result == 0) {
                uint64_t off = 0;
                for (uint32_t i = 1; i + 1 < n; i++) {
                    memcpy(guest_ptr(chain[i].addr, chain[i].len), (uint8_t *)STUB_BOUNCE + off, chain[i].len);
                    off += chain[i].len;
                }
                *written += (uint32_t)total;
            }
        }
    } else if (type == 4) {             /* flush */
        result = blk_io(BLK_OP_FLUSH, 0, 0) == BLK_OK ? 0 : 1;
    } else {
        result = 2;                     /* VIRTIO_BLK_S_UNSUPP */
    }
    *status = result;
    vblk.requests++;
    return 0;
}

static void vblk_notify(void)
{
    if (!vblk.queue_ready || (vblk.status & STATUS_NEEDS_RESET) || !(vblk.status & 4))
        return;
    uint32_t num = vblk.queue_num;
    volatile uint16_t *avail = guest_ptr(vblk.avail, 6 + 2ULL * num);
    volatile uint16_t *used = guest_ptr(vblk.used, 6 + 8ULL * num);
    if (!avail || !used || !guest_ptr(vblk.desc, 16ULL * num)) {
        vblk_fail("queue outside guest RAM", vblk.desc);
        return;
    }
    uint16_t avail_idx = avail[1];
    if ((uint16_t)(avail_idx - vblk.last_avail) > num) {
        vblk_fail("avail index jumped", avail_idx);
        return;
    }
    int done = 0;
    while (vblk.last_avail != avail_idx) {
        uint16_t head = avail[2 + vblk.last_avail % num];
        uint32_t written = 0;
        if (vblk_request(head, &written) < 0) {
            vblk_fail("bad descriptor chain", head);
            return;
        }
        volatile uint32_t *elem = (volatile uint32_t *)(used + 2) + 2 * (vblk.used_idx % num);
        elem[0] = head;
        elem[1] = written;
        vblk.last_avail++;
        vblk.used_idx++;
        barrier();
        used[1] = vblk.used_idx;
        done = 1;
    }
    if (done) {
        vblk.isr |= 1;
        vblk_update_irq();
    }
}

static uint32_t vblk_read(uint64_t off)
{
    switch (off) {
    case 0x000: return 0x74726976;      /* "virt" */
    case 0x004: return 2;               /* virtio-mmio version 2 */
    case 0x008: return 2;               /* block device */
    case 0x00C: return 0x554d4551;      /* vendor */
    case 0x010:
        return vblk.dev_features_sel < 2 ? (uint32_t)(vblk_features() >> (32 * vblk.dev_features_sel)) : 0;
    case 0x034: return vblk.queue_sel == 0 ? VQ_MAX : 0;
    case 0x044: return vblk.queue_sel == 0 ? vblk.queue_ready : 0;
    case 0x060: return vblk.isr;
    case 0x070: return vblk.status;
    case 0x0FC: return vblk.config_generation;
    default: return 0;
    }
}

/* Device config space (virtio-blk): capacity u64 at 0, size_max u32 at 8,
 * seg_max u32 at 12; any width, any offset inside it. */
static uint64_t vblk_config_read(uint64_t off, uint32_t size)
{
    uint8_t cfg[16] = { 0 };
    uint32_t seg_max = SEG_MAX;
    memcpy(cfg, &vblk.capacity, 8);
    memcpy(cfg + 12, &seg_max, 4);
    uint64_t v = 0;
    for (uint32_t i = 0; i < size; i++)
        if (off + i < sizeof(cfg))
            v |= (uint64_t)cfg[off + i] << (8 * i);
    return v;
}

static void set_lo(uint64_t *p, uint32_t v) { *p = (*p & ~0xFFFFFFFFULL) | v; }
static void set_hi(uint64_t *p, uint32_t v) { *p = (*p & 0xFFFFFFFFULL) | ((uint64_t)v << 32); }

static void vblk_write(uint64_t off, uint32_t v)
{
    int q0 = vblk.queue_sel == 0, live = vblk.queue_ready;
    switch (off) {
    case 0x014: vblk.dev_features_sel = v; break;
    case 0x020:
        if (vblk.drv_features_sel < 2) {
            uint64_t mask = 0xFFFFFFFFULL << (32 * vblk.drv_features_sel);
            vblk.driver_features = (vblk.driver_features & ~mask)
                                 | (((uint64_t)v << (32 * vblk.drv_features_sel)) & vblk_features());
        }
        break;
    case 0x024: vblk.drv_features_sel = v; break;
    case 0x030: vblk.queue_sel = v; break;
    case 0x038: if (q0 && !live) vblk.queue_num = (v && v <= VQ_MAX && !(v & (v - 1))) ? v : 0; break;
    case 0x044:
        if (q0)
            vblk.queue_ready = (v & 1) && vblk.queue_num;
        break;
    case 0x050: if (v == 0) vblk_notify(); break;
    case 0x064: vblk.isr &= ~v; vblk_update_irq(); break;
    case 0x070:
        if (v == 0)
            vblk_reset();
        else
            vblk.status = v | (vblk.status & STATUS_NEEDS_RESET);
        break;
    case 0x080: if (q0 && !live) set_lo(&vblk.desc, v); break;
    case 0x084: if (q0 && !live) set_hi(&vblk.desc, v); break;
    case 0x090: if (q0 && !live) set_lo(&vblk.avail, v); break;
    case 0x094: if (q0 && !live) set_hi(&vblk.avail, v); break;
    case 0x0A0: if (q0 && !live) set_lo(&vblk.used, v); break;
    case 0x0A4: if (q0 && !live) set_hi(&vblk.used, v); break;
    default: break;
    }
}

/* ---- device state (specs/device-state.md) ------------------------------ */
#define UART_FIELDS(F) \
    F(ier) F(lcr) F(mcr) F(lsr_err) F(msr) F(scr) F(dll) F(dlm) F(fcr) \
    F(thr_ipending) F(irq_level)
#define VBLK_FIELDS(F) \
    F(status) F(dev_features_sel) F(drv_features_sel) F(queue_sel) F(driver_features) \
    F(queue_num) F(queue_ready) F(desc) F(avail) F(used) F(last_avail) F(used_idx) \
    F(isr) F(config_generation) F(irq_level) F(requests) F(errors)

static int save_state(void)
{
    struct ds_writer w;
    uint8_t rx[FIFO_SIZE];
    ds_begin(&w, (uint8_t *)STUB_STATE_BUF, STUB_STATE_SIZE);
    uart_flush();
    ds_record(&w, "uart16550a", 0, 1, 1);
#define SAVE_U(f) ds_u64(&w, #f, uart.f);
    UART_FIELDS(SAVE_U)
    for (uint32_t i = 0; i < uart.rx_count; i++)
        rx[i] = uart.rx[(uart.rx_head + i) % FIFO_SIZE];
    ds_bytes(&w, "rx_fifo", rx, uart.rx_count);
    ds_record(&w, "virtio-blk", 0, 1, 1);
#define SAVE_V(f) ds_u64(&w, #f, vblk.f);
    VBLK_FIELDS(SAVE_V)
    ds_u64(&w, "capacity", vblk.capacity);
    if (net_base)
        netdev_save(&w);
    return ds_end(&w);
}

static int load_uart(struct ds_record *rec)
{
    struct uart u;
    uint64_t v;
    uint32_t n;
    const uint8_t *rx;
    memset(&u, 0, sizeof(u));
#define LOAD_U(f) if (ds_get_u64(rec, #f, &v) < 0 || v > 0xFF) return -1; u.f = (uint8_t)v;
    UART_FIELDS(LOAD_U)
    if (ds_get_bytes(rec, "rx_fifo", &rx, &n) < 0 || n > FIFO_SIZE)
        return -1;
    /* registers hold only what a write could have put there */
    if ((u.ier & ~0x0F) || (u.mcr & ~0x1F) || (u.fcr & ~0xC9) || (u.lsr_err & ~0x02)
        || u.thr_ipending > 1 || u.irq_level > 1)
        return -1;
    memcpy(u.rx, rx, n);
    u.rx_count = n;
    uart = u;
    return 0;
}

static int load_vblk(struct ds_record *rec)
{
    struct vblk b;
    uint64_t v;
    memset(&b, 0, sizeof(b));
#define LOAD_V(f) if (ds_get_u64(rec, #f, &v) < 0) return -1; b.f = v; if ((uint64_t)b.f != v) return -1;
    VBLK_FIELDS(LOAD_V)
    if (b.queue_num > VQ_MAX || (b.queue_num & (b.queue_num - 1)) || b.queue_ready > 1
        || (b.queue_ready && !b.queue_num) || (b.driver_features & ~vblk_features())
        || b.irq_level > 1 || (uint16_t)(b.used_idx - b.last_avail) != 0)
        return -1;
    /* capacity is required (specs/device-state.md) and must be this disk's */
    if (ds_get_u64(rec, "capacity", &v) < 0)
        return -1;
    if (v != vblk.capacity) {
        stub_log("stub: virtio-blk: saved with %lu sectors, the disk here has %lu\n",
                 v, vblk.capacity);
        return -1;
    }
    b.capacity = vblk.capacity;         /* the disk attached here */
    vblk = b;
    return 0;
}

static int load_state(void)
{
    struct ds_reader r;
    struct ds_record rec;
    int seen = 0, rc;
    if (ds_open(&r, (const uint8_t *)STUB_STATE_BUF, STUB_STATE_SIZE) < 0)
        return -1;
    while ((rc = ds_next(&r, &rec)) > 0) {
        /* This build writes version 1 and reads records of version >= 1 whose
         * writer says a version-1 loader can read them (min_version <= 1);
         * fields it does not know are ignored. */
        if (rec.version < 1 || rec.min_version < 1 || rec.min_version > 1 || rec.min_version > rec.version
            || rec.instance != 0) {
            stub_log("stub: %s: record version %u (min %u) not loadable by version 1\n",
                     rec.device, rec.version, rec.min_version);
            return -1;
        }
        if (ds_name_is(rec.device, "uart16550a") && !(seen & 1)) {
            if (load_uart(&rec) < 0)
                return -1;
            seen |= 1;
        } else if (ds_name_is(rec.device, "virtio-blk") && !(seen & 2)) {
            if (load_vblk(&rec) < 0)
                return -1;
            seen |= 2;
        } else if (net_base && ds_name_is(rec.device, "virtio-net") && !(seen & 4)) {
            if (netdev_load(&rec) < 0)
                return -1;
            seen |= 4;
        } else {
            return -1;
        }
    }
    if (rc < 0 || seen != (net_base ? 7 : 3))
        return -1;
    /* drive the interrupt lines to what the loaded registers imply */
    uart.irq_level = 2;
    vblk.irq_level = 2;
    uart_update_irq();
    vblk_update_irq();
    if (net_base)
        netdev_sync_irq();
    return 0;
}

/* ---- the request loop ---------------------------------------------------- */
static uint64_t width_mask(uint32_t size) { return size >= 8 ? ~0ULL : (1ULL << (8 * size)) - 1; }

static int serve_pio(volatile struct ioreq *r)
{
    uint64_t port = r->addr;
    if (r->dir != IOREQ_DIR_WRITE && r->dir != IOREQ_DIR_READ)
        return IOREQ_EINVAL;
    if (port < UART_BASE || port > UART_BASE + 7 || r->size != 1)
        return IOREQ_EUNCLAIMED;
    uint32_t reg = (uint32_t)(port - UART_BASE);
    if (r->data_is_ptr) {
        if (r->count == 0 || r->count > 4096 || r->data != STUB_IOREQ_DATA)
            return IOREQ_EINVAL;
        for (uint32_t i = 0; i < r->count; i++) {
            if (r->dir == IOREQ_DIR_WRITE)
                uart_write(reg, io_data[i]);
            else
                io_data[i] = uart_read(reg);
        }
    } else if (r->count != 1) {
        return IOREQ_EINVAL;
    } else if (r->dir == IOREQ_DIR_WRITE) {
        uart_write(reg, (uint8_t)r->data);
    } else {
        r->data = uart_read(reg);
    }
    return IOREQ_OK;
}

static int serve_mmio(volatile struct ioreq *r)
{
    uint64_t off = r->addr - virtio_base;
    int net = net_base && r->addr >= net_base && r->addr - net_base < 0x200;
    if (net)
        off = r->addr - net_base;
    else if (r->addr < virtio_base || off >= 0x200)
        return IOREQ_EUNCLAIMED;
    if (r->count != 1 || r->data_is_ptr || (r->size != 4 && off < 0x100))
        return IOREQ_EINVAL;
    if (r->dir != IOREQ_DIR_WRITE && r->dir != IOREQ_DIR_READ)
        return IOREQ_EINVAL;
    if (net) {
        if (r->dir == IOREQ_DIR_WRITE)
            netdev_mmio_write(off, (uint32_t)r->data);
        else
            r->data = netdev_mmio_read(off, r->size) & width_mask(r->size);
        return IOREQ_OK;
    }
    if (r->dir == IOREQ_DIR_WRITE)
        vblk_write(off, (uint32_t)r->data);
    else if (off >= 0x100)
        r->data = vblk_config_read(off - 0x100, r->size);
    else
        r->data = vblk_read(off) & width_mask(r->size);
    return IOREQ_OK;
}

static int serve(volatile struct ioreq *r)
{
    if (r->size != 1 && r->size != 2 && r->size != 4 && r->size != 8)
        return IOREQ_EINVAL;
    switch (r->type) {
    case IOREQ_TYPE_PIO: return serve_pio(r);
    case IOREQ_TYPE_MMIO: return serve_mmio(r);
    case IOREQ_TYPE_SAVE: return save_state() < 0 ? IOREQ_ESTATE : IOREQ_OK;
    case IOREQ_TYPE_LOAD: return load_state() < 0 ? IOREQ_ESTATE : IOREQ_OK;
    case IOREQ_TYPE_INPUT: {
        uint32_t n = r->count > 4096 ? 4096 : r->count, taken = 0;
        while (taken < n && uart.rx_count < FIFO_SIZE)
            uart_rx_push(io_data[taken++]);
        r->data = taken;
        uart_update_irq();
        return IOREQ_OK;
    }
    case IOREQ_TYPE_NET_RX: {
        int taken = net_base && r->addr < NET_SLOTS ? netdev_rx((uint32_t)r->addr, r->count) : -1;
        if (taken < 0)
            return IOREQ_EINVAL;
        r->data = (uint64_t)taken;
        return IOREQ_OK;
    }
    default:
        return IOREQ_EINVAL;
    }
}

/* The network device's hooks (netdev.h): its line, and its two hypercalls. */
static void net_set_irq(int level) { set_irq(net_irq, level); }
static void net_tx_kick(void) { outb(STUB_PORT_NET_TX, 0); }
static void net_rx_wanted(void) { outb(STUB_PORT_NET_RXBUF, 0); }
static void net_log(const char *msg, uint64_t value, int failed)
{
    stub_log("stub: virtio-net: %s (%lx)%s\n", msg, value, failed ? ": device needs reset" : "");
}

void workload_main(const struct boot_info *bi)
{
    window_size = bi->args[1];
    window_high = bi->args[6];
    virtio_base = bi->args[2];
    virtio_irq = (uint32_t)bi->args[3];
    net_base = bi->args[4];
    net_irq = (uint32_t)bi->args[5];
    if (iopage->magic != IOREQ_MAGIC) {         /* a fresh boot, not a resumed image */
        uart_reset();
        vblk.capacity = ring->capacity;
        vblk_reset();
        if (net_base) {
            struct netdev_env env = {
                .guest = (uint8_t *)STUB_WINDOW_BASE, .guest_size = window_size,
                .guest_high_size = window_high,
                .ring = (volatile struct net_ring *)STUB_NET_RING,
                .tx_slots = (uint8_t *)STUB_NET_TX, .rx_slots = (uint8_t *)STUB_NET_RX,
                .set_irq = net_set_irq, .tx_kick = net_tx_kick, .rx_wanted = net_rx_wanted,
                .log = net_log,
            };
            netdev_init(&env);
        }
        iopage->version = IOREQ_VERSION;
        iopage->nr_vcpus = 1;
        barrier();
        iopage->magic = IOREQ_MAGIC;
    }
    stub_log("stub: ready window=%lx high=%lx virtio=%lx capacity=%lu net=%lx\n", window_size, window_high,
             virtio_base, vblk.capacity, net_base);
    iopage->ready = 1;
    outb(STUB_PORT_DOORBELL, 0);
    for (;;) {
        volatile struct ioreq *r = &iopage->vcpu[0];
        while (r->state != IOREQ_READY)
            cpu_relax();
        r->state = IOREQ_INPROCESS;
        barrier();
        r->result = (uint8_t)serve(r);
        r->done_seq = r->seq;
        barrier();
        r->state = IORESP_READY;
        outb(STUB_PORT_DOORBELL, 0);
    }
}
