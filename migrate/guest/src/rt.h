/* The tiny runtime shared by ring 0 and ring 3 code of a guest image. */
#ifndef HVM_RT_H
#define HVM_RT_H
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include "bootinfo.h"

#define PAGE_SIZE 4096UL

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
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

extern volatile uint64_t timer_ticks;
extern const struct boot_info *boot;

void workload_main(const struct boot_info *bi);

/* Console input (the UART's receive interrupt fills a line buffer): copies
 * a complete line, without its end, into buf and returns its length, or -1. */
int console_read_line(char *buf, int size);
extern volatile uint64_t uart_irqs, virtio_irqs;

/* The virtio-mmio block driver (vblk.c): 0 on success. */
int vblk_init(void);
int vblk_io(int write, uint64_t sector, void *buf, uint32_t len);
extern uint64_t vblk_capacity;
void idle_loop(void) __attribute__((noreturn));

#endif
