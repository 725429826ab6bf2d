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
};

/* Ports (specs/guest-boot.md, "Ports") */
#define PORT_CONSOLE   0xE9     /* out: console bytes (rep outsb: a line) */
#define PORT_SYNC      0xEA     /* out dword: a test synchronisation point */
#define PORT_EXIT      0xF4     /* out dword: the guest stops, with a status */

#endif
