/* Several vCPUs (specs/guest-boot.md, "vCPUs"): sizes shared by start.S and the C code. */
#ifndef HVM_SMP_H
#define HVM_SMP_H

#ifndef MAX_CPUS
#define MAX_CPUS 1              /* the guest image is built with -DMAX_CPUS=64, the stub with 1 */
#endif
#define BSP_KSTACK  16384       /* vCPU 0's kernel stack; its user stack is 64 KiB */
#define AP_KSTACK   8192        /* each other vCPU's kernel stack ... */
#define AP_USTACK   16384       /* ... and user stack */
#define LAPIC_ID_REG 0xFEE00020 /* xAPIC ID register: the id in bits 31:24 */
#define STATUS_BAD_CPU 0xdead0300

#define VEC_TOKEN   40          /* smp: a token was put in this vCPU's queue */
#define VEC_KICK    41          /* smp: a new round has begun */

#ifndef __ASSEMBLER__
#include <stdint.h>

/* Per-vCPU data; the GS base of vCPU k points at cpus[k] in both rings. */
struct cpu {
    struct cpu *self;           /* %gs:0 */
    uint32_t index;             /* = LAPIC id */
    uint32_t pad;
    volatile uint64_t ticks;    /* LAPIC timer interrupts taken */
    volatile uint64_t tokens;   /* VEC_TOKEN interrupts taken */
    volatile uint64_t kicks;    /* VEC_KICK interrupts taken */
    uint64_t last_tsc;          /* the TSC at the last timer tick (kernel.c, clock_check) */
    uint64_t back_from, back_to;    /* the first time it went backwards: from, to */
    volatile uint64_t tsc_back; /* TSC_FINE, TSC_WENT_BACK (the tick saw it), TSC_SAID (clock_check) */
};
enum { TSC_FINE, TSC_WENT_BACK, TSC_SAID };
extern struct cpu cpus[MAX_CPUS];

static inline struct cpu *this_cpu(void)
{
    struct cpu *c;
    __asm__ volatile("mov %%gs:0, %0" : "=r"(c));
    return c;
}

/* This vCPU's index; 0 before its GS base is set (address 0 holds zero). */
static inline uint32_t cpu_index(void)
{
    struct cpu *c = this_cpu();
    return c ? c->index : 0;
}

/* Ring 0 only. */
void send_ipi(uint32_t apic_id, uint32_t vector);
void smp_main(uint32_t cpu) __attribute__((weak, noreturn));
#endif

#endif
