/* A failure in the middle of a NET_RX (a receive chain the device cannot write into) must
 * still publish the used index of the packets delivered before it (specs/ioreq.md, "Net
 * device": chains completed before the failure stay in the used ring), as the transmit
 * path does: the guest was given the packet, and its used element, and rx_packets counts
 * it. Built and run by tests/test_netdev_c.py against the stub's netdev.c, the device
 * compiled in (its statics are this program's). Prints one line; exit 0 when it holds. */
#include <stdio.h>
#include <string.h>
#include "netdev.c"

static uint8_t guest[1 << 20];
static struct net_ring ring;
static uint8_t tx[NET_SLOTS * NET_SLOT_SIZE], rx[NET_SLOTS * NET_SLOT_SIZE];
static void set_irq(int level) { (void)level; }
static void tx_kick(void) {}
static void rx_wanted(void) {}
static void log_line(const char *msg, uint64_t value, int failed) { (void)msg; (void)value; (void)failed; }

int main(void)
{
    memcpy((void *)ring.mac, "\x52\x54\0\1\2\3", 6);
    ring.mtu = 1500;
    struct netdev_env env = {guest, sizeof guest, 0, &ring, tx, rx, set_irq, tx_kick, rx_wanted, log_line};
    netdev_init(&env);
    const uint64_t desc = 0x1000, avail = 0x2000, used = 0x3000;
    /* a driver: reset, ACKNOWLEDGE|DRIVER, features, FEATURES_OK, queue 0 (receive) of 8 */
    netdev_mmio_write(0x70, 3);
    netdev_mmio_write(0x24, 1);
    netdev_mmio_write(0x20, 1);
    netdev_mmio_write(0x70, 11);
    netdev_mmio_write(0x30, 0);
    netdev_mmio_write(0x38, 8);
    netdev_mmio_write(0x80, desc);
    netdev_mmio_write(0x90, avail);
    netdev_mmio_write(0xA0, used);
    netdev_mmio_write(0x44, 1);
    netdev_mmio_write(0x70, 15);                        /* DRIVER_OK */
    /* two receive buffers: the first writable, the second not (the device cannot use it) */
    struct vdesc *d = (struct vdesc *)(guest + desc);
    d[0] = (struct vdesc){0x10000, 2048, 2, 0};
    d[1] = (struct vdesc){0x20000, 2048, 0, 0};
    uint16_t *av = (uint16_t *)(guest + avail);
    av[2] = 0;
    av[3] = 1;
    av[1] = 2;
    for (int i = 0; i < 2; i++) {                       /* two packets of 60 bytes */
        ring.rx_len[i] = NET_HDR_SIZE + 60;
        memset(rx + i * NET_SLOT_SIZE, 0, NET_HDR_SIZE + 60);
    }
    int taken = netdev_rx(0, 2);
    uint16_t published = ((uint16_t *)(guest + used))[1];
    printf("taken %d, device used index %u, published %u, status %#x\n", taken, nd.q[0].used_idx, published,
           nd.status);
    return !(nd.q[0].used_idx == 1 && published == 1 && (nd.status & 0x40));
}
