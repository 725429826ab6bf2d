/* The ioreq ABI between the host and the device-model stub (specs/ioreq.md).
 * All fields little-endian; all addresses are stub physical addresses. */
#ifndef HVM_IOREQ_H
#define HVM_IOREQ_H
#include <stdint.h>

/* Stub physical memory map */
#define STUB_IOREQ_PAGE    0x400000UL   /* struct ioreq_page */
#define STUB_IOREQ_DATA    0x401000UL   /* 4 KiB: data of string (rep) port I/O */
#define STUB_BLK_RING      0x402000UL   /* struct blk_ring */
#define STUB_STATE_BUF     0x404000UL   /* device state records, STUB_STATE_SIZE bytes */
#define STUB_STATE_SIZE    0x8000UL
#define STUB_BOUNCE        0x410000UL   /* block data bounce buffers */
#define STUB_BOUNCE_SIZE   0x80000UL
#define STUB_NET_RING      0x490000UL   /* struct net_ring (specs/ioreq.md, "Net ring") */
#define STUB_NET_TX        0x4A0000UL   /* NET_SLOTS transmit slots of NET_SLOT_SIZE bytes */
#define STUB_NET_RX        0x530000UL   /* NET_SLOTS receive slots of NET_SLOT_SIZE bytes */
#define STUB_WINDOW_BASE   0x10000000UL /* guest address g is stub address STUB_WINDOW_BASE + g */
#define STUB_GUEST_HIGH    0x100000000UL /* guest RAM above the 32-bit MMIO hole starts here */

#define IOREQ_MAGIC        0x51524f49u  /* "IORQ" */
#define IOREQ_VERSION      1u

/* ioreq.state: the host moves NONE -> READY; the stub READY -> INPROCESS ->
 * RESP_READY and rings the doorbell; the host reads the result and moves
 * RESP_READY -> NONE. */
enum { IOREQ_NONE = 0, IOREQ_READY = 1, IOREQ_INPROCESS = 2, IORESP_READY = 3 };

/* ioreq.type */
enum {
    IOREQ_TYPE_PIO = 0,         /* a guest port access */
    IOREQ_TYPE_MMIO = 1,        /* a guest MMIO access */
    IOREQ_TYPE_SAVE = 2,        /* write device state records to STUB_STATE_BUF */
    IOREQ_TYPE_LOAD = 3,        /* load device state records from STUB_STATE_BUF */
    IOREQ_TYPE_INPUT = 4,       /* console input: `count` bytes at STUB_IOREQ_DATA */
    IOREQ_TYPE_NET_RX = 5,      /* `count` received packets in the net ring's RX slots from `addr` */
};
enum { IOREQ_DIR_WRITE = 0, IOREQ_DIR_READ = 1 };

/* ioreq.result */
enum { IOREQ_OK = 0, IOREQ_EINVAL = 1, IOREQ_EUNCLAIMED = 2, IOREQ_ESTATE = 3 };

struct ioreq {
    uint64_t addr;          /* port, or guest physical MMIO address */
    uint64_t data;          /* value written / value read; if data_is_ptr: stub address */
    uint32_t count;         /* repetitions (string I/O); 1 otherwise */
    uint8_t size;           /* 1, 2, 4 or 8 bytes per access */
    uint8_t dir;            /* IOREQ_DIR_* */
    uint8_t type;           /* IOREQ_TYPE_* */
    uint8_t data_is_ptr;    /* data points at count*size bytes in STUB_IOREQ_DATA */
    uint8_t state;          /* IOREQ_* state; written last by each side */
    uint8_t result;         /* IOREQ_OK or an error */
    uint16_t pad0;
    uint32_t seq;           /* host's request number, echoed in done_seq */
    uint32_t done_seq;
    uint32_t pad1;
    uint64_t pad2[3];
};                          /* 64 bytes */

_Static_assert(sizeof(struct ioreq) == 64, "struct ioreq is 64 bytes");

struct ioreq_page {
    uint32_t magic;
    uint32_t version;
    uint32_t nr_vcpus;
    uint32_t ready;         /* the stub sets 1 once it serves requests */
    uint64_t pad[7];
    struct ioreq vcpu[1];   /* one slot per guest vCPU */
};

_Static_assert(__builtin_offsetof(struct ioreq_page, vcpu) == 72, "ioreq slots start at 72");
_Static_assert(__builtin_offsetof(struct ioreq, state) == 24, "ioreq.state at 24");

/* Stub -> host hypercalls: `out` to these ports of the stub VM */
#define STUB_PORT_DOORBELL  0xE0    /* out: a response is ready */
#define STUB_PORT_IRQ       0xE1    /* out dword: (level << 31) | guest irq */
#define STUB_PORT_BLK       0xE2    /* out: block requests queued in the ring */
#define STUB_PORT_CONSOLE   0xE3    /* rep outsb: guest console output bytes */
#define STUB_PORT_NET_TX    0xE4    /* out: net_ring.tx_count packets are in the TX slots */
#define STUB_PORT_NET_RXBUF 0xE5    /* out: the driver added receive buffers after a shortage */

/* The block back end ring (front: stub, back: host), in stub memory */
#define BLK_RING_SIZE 32
enum { BLK_OP_READ = 0, BLK_OP_WRITE = 1, BLK_OP_FLUSH = 2 };
enum { BLK_OK = 0, BLK_EIO = 1, BLK_EINVAL = 2 };

struct blk_req {
    uint64_t id;
    uint64_t sector;        /* 512-byte sectors */
    uint32_t op;            /* BLK_OP_* */
    uint32_t len;           /* bytes, a multiple of 512 */
    uint64_t buf;           /* stub physical address inside the bounce area */
};                          /* 32 bytes */
_Static_assert(sizeof(struct blk_req) == 32, "blk_req is 32 bytes");

struct blk_rsp {
    uint64_t id;
    uint32_t status;        /* BLK_* */
    uint32_t pad;
};                          /* 16 bytes */

struct blk_ring {
    uint32_t req_prod;      /* written by the stub */
    uint32_t rsp_prod;      /* written by the host */
    uint64_t capacity;      /* sectors, written by the host at boot */
    uint64_t pad[6];
    struct blk_req req[BLK_RING_SIZE];
    struct blk_rsp rsp[BLK_RING_SIZE];
};
_Static_assert(__builtin_offsetof(struct blk_ring, req) == 64, "block requests at 64");

/* The network back end ring (specs/ioreq.md, "Net ring"), in stub memory.
 * Slot i of each direction is NET_SLOT_SIZE bytes at STUB_NET_TX/RX + i *
 * NET_SLOT_SIZE: a 12-byte virtio-net header, then the Ethernet frame. */
#define NET_SLOTS       64
#define NET_SLOT_SIZE   0x2400u
#define NET_HDR_SIZE    12u

struct net_ring {
    uint32_t tx_count;      /* stub, at a TX kick: packets in TX slots 0..tx_count-1 */
    uint32_t guest_csum;    /* stub: 1 while the driver accepts partial checksums */
    uint8_t mac[6];         /* host, before the stub boots */
    uint16_t mtu;           /* host, before the stub boots */
    uint32_t pad[12];
    uint32_t tx_len[NET_SLOTS];     /* stub: bytes in each TX slot (header included) */
    uint32_t rx_len[NET_SLOTS];     /* host: bytes in each RX slot (header included) */
};
_Static_assert(__builtin_offsetof(struct net_ring, tx_len) == 64, "tx_len at 64");
_Static_assert(sizeof(struct net_ring) == 576, "net_ring is 576 bytes");

#endif
