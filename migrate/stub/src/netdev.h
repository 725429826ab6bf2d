/* The virtio-mmio network device of the stub (specs/ioreq.md, "virtio-mmio
 * network device"; its saved state: specs/device-state.md, "virtio-net").
 *
 * A narrow interface so that the device can be driven from anywhere: the
 * stub's request loop, or a fuzzing harness on the host.  Everything the
 * device knows of its surroundings comes in through struct netdev_env; it
 * keeps no pointer into guest memory between calls, and it fetches every
 * guest-controlled value (ring indices, descriptors, headers) once into its
 * own memory before checking and using it, because the guest may run while
 * the device delivers received packets. */
#ifndef HVM_NETDEV_H
#define HVM_NETDEV_H
#include <stdint.h>
#include "ioreq.h"
#include "devstate.h"

struct netdev_env {
    uint8_t *guest;                 /* guest RAM [0, guest_size) as the device reaches it */
    uint64_t guest_size;
    uint64_t guest_high_size;       /* and guest RAM [4 GiB, 4 GiB + this) at guest + 4 GiB */
    volatile struct net_ring *ring; /* the back end ring, and its slots */
    uint8_t *tx_slots, *rx_slots;   /* NET_SLOTS x NET_SLOT_SIZE bytes each */
    void (*set_irq)(int level);     /* drive the device's interrupt line */
    void (*tx_kick)(void);          /* the host takes ring->tx_count TX slots, before returning */
    void (*rx_wanted)(void);        /* the driver added receive buffers after a shortage */
    void (*log)(const char *msg, uint64_t value, int failed);  /* failed: the device needs reset */
};

/* Boot: remember env, reset the device, take the MAC and MTU from the ring.
 * rx_wanted is also called when the driver sets DRIVER_OK: packets the host
 * held back for want of buffers may go in now. */
void netdev_init(const struct netdev_env *env);
/* Register window, offsets 0 to 0x1FF: reads of `size` 1, 2, 4 or 8 bytes
 * (registers below 0x100 are 32-bit; the caller has checked that), writes. */
uint64_t netdev_mmio_read(uint64_t off, uint32_t size);
void netdev_mmio_write(uint64_t off, uint32_t value);
/* NET_RX: packets in RX slots first, first+1, ... (mod NET_SLOTS), count of
 * them; returns how many were taken (delivered or dropped); -1 if first or
 * count are out of range.  The rest wait for receive buffers. */
int netdev_rx(uint32_t first, uint32_t count);
/* Device state: one "virtio-net" record; load returns -1 if it refuses it. */
void netdev_save(struct ds_writer *w);
int netdev_load(const struct ds_record *rec);
/* Drive the interrupt line to what the registers imply (after a load). */
void netdev_sync_irq(void);

#endif
