/* The boot-info page: how the host hands parameters to a guest image.
 * Normative description: specs/guest-boot.md. */
#ifndef HVM_BOOTINFO_H
#define HVM_BOOTINFO_H
#include <stdint.h>

#define BOOT_INFO_ADDR      0x1000UL
#define BOOT_INFO_MAGIC     0x424d5648u   /* "HVMB" */
#define BOOT_INFO_VERSION   1u
#define BOOT_INFO_NARGS     8

enum workload_id {
    WL_IDLE = 1,
    WL_PAGETOUCH = 2,
    WL_DIRTIER = 3,
    WL_LEDGER = 4,
    WL_PAGESET = 5,
    WL_BENCH = 6,
    WL_STUB = 7,                /* the device-model stub's own image */
    WL_IOBENCH = 8,
    WL_NETECHO = 9,
    WL_SMP = 10,                /* vCPUs pass tokens around a ring (smp.c) */
};

struct boot_info {
    uint32_t magic;
    uint32_t version;
    uint32_t workload;
    uint32_t timer_hz;          /* 0: no LAPIC timer */
    uint64_t mem_size;          /* bytes of RAM from physical 0 */
    uint64_t wl_base;           /* workload region (identity mapped) */
    uint64_t wl_size;
    uint64_t tsc_khz;
    uint64_t args[BOOT_INFO_NARGS];
    uint64_t flags;             /* BOOT_F_* */
    uint64_t virtio_base;       /* guest physical base of the virtio-mmio block device */
    uint64_t net_base;          /* guest physical base of the virtio-mmio network device */
    uint32_t nr_cpus;           /* vCPUs, LAPIC ids 0..nr_cpus-1 */
    uint32_t reserved;
    uint64_t high_size;         /* bytes of RAM from 4 GiB; 0: none */
};

#define BOOT_F_UART     1       /* console on the 16550A at 0x3F8 (else port 0xE9) */
#define BOOT_F_VIRTIO   2       /* a virtio-mmio block device at virtio_base, IRQ 5 */
#define BOOT_F_NET      4       /* a virtio-mmio network device at net_base, IRQ 6 */

/* Ports (specs/guest-boot.md, "Ports") */
#define PORT_CONSOLE   0xE9     /* out: console bytes (rep outsb: a line) */
#define PORT_SYNC      0xEA     /* out dword: a test synchronisation point */
#define PORT_EXIT      0xF4     /* out dword: the guest stops, with a status */
#define PORT_NULL      0xED     /* no-op, completed in the host's C run loop */
#define PORT_UNCLAIMED 0x80     /* nobody's: the host's Python answers all-ones */
#define UART_PORT      0x3F8
#define UART_GSI       4
#define VIRTIO_GSI     5
#define NET_GSI        6

#endif
