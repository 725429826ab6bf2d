/* The tiny runtime shared by ring 0 and ring 3 code of a guest image. */
#ifndef HVM_RT_H
#define HVM_RT_H
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include "bootinfo.h"
#include "smp.h"

#define PAGE_SIZE 4096UL

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outsb(uint16_t port, const void *p, uint64_t n)
{
    __asm__ volatile("rep outsb" : "+S"(p), "+c"(n) : "d"(port) : "memory");
}
static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
#define barrier() __asm__ volatile("" ::: "memory")

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);

/* Formatted console output: %s %c %d %u %x %lu %ld %lx %llu %llx %016lx.
 * A line is sent with one `rep outsb` (one exit). */
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void console_write(const char *s, size_t n);
void printk(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Ring 3 has no system calls: on this host a software `int` from ring 3
 * raises #UD and `syscall` arrives without a privilege change (measured),
 * so the only way into ring 0 is an interrupt.  Ring 3 stops the guest
 * itself through PORT_EXIT (IOPL 3). */
static inline void __attribute__((noreturn)) guest_exit(uint32_t status)
{
    for (;;)
        outl(PORT_EXIT, status);
}

/* Busy-wait for `ms` milliseconds of TSC time. */
void delay_ms(uint64_t ms);

extern volatile uint64_t timer_ticks;     /* vCPU 0's */
extern const struct boot_info *boot;

/* Ring 3, on every vCPU that runs a ring-3 workload (cpu_index() says which). */
void workload_main(const struct boot_info *bi);

/* Console input (the UART's receive interrupt fills a line buffer): copies
 * a complete line, without its end, into buf and returns its length, or -1. */
int console_read_line(char *buf, int size);
extern volatile uint64_t uart_irqs, virtio_irqs, net_irqs;

/* The virtio-mmio block driver (vblk.c): 0 on success. */
int vblk_init(void);
int vblk_io(int write, uint64_t sector, void *buf, uint32_t len);
extern uint64_t vblk_capacity;
void idle_loop(void) __attribute__((noreturn));
void clock_check(void);        /* "clock CORRUPT" once if this vCPU's TSC went backwards */
void halt_forever(void) __attribute__((noreturn));     /* ring 0: sti; hlt, for ever */

/* The virtio-mmio network driver (vnet.c), polled from ring 3.  A packet is a
 * 12-byte virtio-net header followed by the Ethernet frame. */
#define VNET_HDR 12
#define VNET_BUF 9216                   /* header and frame: MTU 9000 fits */
#define VNET_F_CSUM_OK 1                /* header flags: NEEDS_CSUM, DATA_VALID */
struct vnet_hdr { uint8_t flags, gso_type; uint16_t hdr_len, gso_size, csum_start, csum_offset, num_buffers; };
/* driver options (netecho's args[1]): what the driver leaves out */
#define VNET_OPT_NO_CSUM      1         /* no checksum offload (CSUM, GUEST_CSUM) */
#define VNET_OPT_NO_EVENT_IDX 2         /* no VIRTIO_RING_F_EVENT_IDX */
#define VNET_OPT_KICK_EACH    4         /* notify after every packet and every receive buffer */
#define VNET_OPT_IRQ          8         /* take interrupts (the ring-0 handler acknowledges them) */
int vnet_init(uint64_t opts);
extern uint8_t vnet_mac[6];
extern uint16_t vnet_mtu;
extern uint64_t vnet_features, vnet_kicks;
uint8_t *vnet_rx_next(uint32_t *len, uint16_t *id);     /* a received packet, or 0 */
void vnet_rx_done(uint16_t id);                         /* give its buffer back */
uint8_t *vnet_tx_buf(void);                             /* room for the next packet to send */
void vnet_tx_send(uint32_t len);                        /* send it (len: header and frame) */
void vnet_flush(void);                                  /* publish buffers, notify if needed */

/* The network stack on top (netstack.c): ARP, ICMP echo, UDP echo/discard/blast. */
int net_init(uint32_t ip, uint64_t opts);               /* 0: a NIC is up at ip */
void net_poll(void);                                    /* serve what arrived */
void net_report(const char *who);                       /* one line of counters */

#endif
