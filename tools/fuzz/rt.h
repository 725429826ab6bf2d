/* A host stand-in for the guest runtime (migrate/guest/src/rt.h), for the libFuzzer
 * harnesses that compile the stub's device model on the host (tools/fuzz_c.py).  Port
 * I/O becomes calls into the harness, which checks every hypercall the device model
 * makes; memory at the stub's fixed addresses is mapped by the harness. */
#ifndef HVM_RT_H
#define HVM_RT_H
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "bootinfo.h"

#define PAGE_SIZE 4096UL

void fuzz_out(uint16_t port, uint32_t value, int width);
void fuzz_outs(uint16_t port, const void *p, uint64_t n);

static inline void outb(uint16_t port, uint8_t v) { fuzz_out(port, v, 1); }
static inline void outl(uint16_t port, uint32_t v) { fuzz_out(port, v, 4); }
static inline void outsb(uint16_t port, const void *p, uint64_t n) { fuzz_outs(port, p, n); }
static inline uint8_t inb(uint16_t port) { (void)port; return 0xFF; }
static inline void cpu_relax(void) {}
#define barrier() __asm__ volatile("" ::: "memory")

/* The device model's log line: formatted for real (a bad format would show here). */
static inline void __attribute__((format(printf, 1, 2))) printk(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
}

void workload_main(const struct boot_info *bi);

#endif
