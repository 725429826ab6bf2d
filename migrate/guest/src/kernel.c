/* Ring 0: descriptor tables, a TSS per vCPU with an open I/O bitmap, the
 * LAPIC timers, IPIs, trap handling and the ring-0 idle loop.  Compiled with
 * -mgeneral-regs-only so handlers never touch the workload's SSE state.
 *
 * Ring 0 is slow on this host (specs/guest-boot.md), so everything here
 * does the least it can: no loops over memory, short handlers. */
#include "rt.h"

#define LAPIC_BASE      0xFEE00000UL
#define LAPIC_EOI       0x0B0
#define LAPIC_ICR_LOW   0x300
#define LAPIC_ICR_HIGH  0x310
#define LAPIC_SVR       0x0F0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_ICR 0x380
#define LAPIC_TIMER_DCR 0x3E0
#define LAPIC_BUS_HZ    1000000000UL    /* KVM's APIC bus: 1 ns per cycle */

#define VEC_TIMER    32
#define VEC_UART     36
#define VEC_VIRTIO   37
#define VEC_NET      38
#define IOAPIC_BASE  0xFEC00000UL
#define VEC_SPURIOUS 255

struct trap_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error, rip, cs, rflags, rsp, ss;
};

struct tss {                    /* the 104-byte 64-bit TSS */
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3;
    uint16_t iomap_base;        /* from this TSS to the shared I/O permission bitmap */
} __attribute__((packed));

struct idt_gate {
    uint16_t off0, sel;
    uint8_t ist, type;
    uint16_t off1;
    uint32_t off2, zero;
} __attribute__((packed));

struct dtr { uint16_t limit; uint64_t base; } __attribute__((packed));

/* One TSS per vCPU (RSP0 differs), set up at run time (.bss); after the last
 * one, the I/O permission bitmap they all share: every TSS's limit reaches it. */
static struct {
    struct tss tss[MAX_CPUS];
    uint8_t iomap[8192 + 1];    /* all ports open to ring 3, then 0xFF */
} __attribute__((packed)) tss_block __attribute__((aligned(16)));
static uint64_t gdt[5 + 2 * MAX_CPUS] __attribute__((aligned(16))) = {
    0,
    0x00AF9A000000FFFFULL,      /* 0x08 kernel code, 64-bit */
    0x00CF92000000FFFFULL,      /* 0x10 kernel data */
    0x00CFF2000000FFFFULL,      /* 0x18 user data, DPL 3 */
    0x00AFFA000000FFFFULL,      /* 0x20 user code, 64-bit, DPL 3 */
                                /* 0x28 + 16 * k: vCPU k's TSS (16 bytes) */
};
static struct idt_gate idt[256] __attribute__((aligned(16)));

uint8_t kernel_stack[BSP_KSTACK] __attribute__((aligned(16)));
static uint8_t user_stack[65536] __attribute__((aligned(16)));
#if MAX_CPUS > 1
uint8_t ap_kernel_stacks[MAX_CPUS - 1][AP_KSTACK] __attribute__((aligned(16)));
static uint8_t ap_user_stacks[MAX_CPUS - 1][AP_USTACK] __attribute__((aligned(16)));
#endif
struct cpu cpus[MAX_CPUS];
static volatile uint32_t tables_ready;  /* vCPU 0 has built the GDT and IDT */
volatile uint64_t timer_ticks;
const struct boot_info *boot;

extern void *isr_table[21];
extern void isr32(void), isr36(void), isr37(void), isr38(void), isr40(void), isr41(void), isr255(void);
extern void enter_user(void (*entry)(const struct boot_info *), void *stack, const void *arg);

static inline void lapic_write(uint32_t reg, uint32_t v)
{
    *(volatile uint32_t *)(LAPIC_BASE + reg) = v;
}

static void set_gate(int vec, void *handler, int dpl)
{
    uint64_t a = (uint64_t)handler;
    idt[vec] = (struct idt_gate){
        .off0 = a & 0xFFFF, .sel = 0x08, .ist = 0,
        .type = (uint8_t)(0x8E | (dpl << 5)),
        .off1 = (a >> 16) & 0xFFFF, .off2 = (uint32_t)(a >> 32),
    };
}

/* vCPU 0, once: a TSS descriptor per vCPU and the IDT, shared by all. */
static void build_tables(void)
{
    for (int k = 0; k < MAX_CPUS; k++) {
        uint64_t base = (uint64_t)&tss_block.tss[k];
        uint64_t limit = (uint64_t)&tss_block.iomap[8192] - base;
        gdt[5 + 2 * k] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89ULL << 40)
                       | (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56);
        gdt[6 + 2 * k] = base >> 32;
    }
    for (int v = 0; v < 21; v++)
        set_gate(v, isr_table[v], 0);
    set_gate(VEC_TIMER, isr32, 0);
    set_gate(VEC_UART, isr36, 0);
    set_gate(VEC_VIRTIO, isr37, 0);
    set_gate(VEC_NET, isr38, 0);
    set_gate(VEC_TOKEN, isr40, 0);
    set_gate(VEC_KICK, isr41, 0);
    set_gate(VEC_SPURIOUS, isr255, 0);
}

static void *kernel_stack_top(uint32_t cpu)
{
#if MAX_CPUS > 1
    if (cpu)
        return ap_kernel_stacks[cpu - 1] + AP_KSTACK;
#endif
    (void)cpu;
    return kernel_stack + sizeof(kernel_stack);
}

static void *user_stack_top(uint32_t cpu)
{
#if MAX_CPUS > 1
    if (cpu)
        return ap_user_stacks[cpu - 1] + AP_USTACK;
#endif
    (void)cpu;
    return user_stack + sizeof(user_stack);
}

/* Every vCPU: its TSS, the shared GDT (its own TSS selector) and IDT, its GS base. */
static void load_tables(uint32_t cpu)
{
    struct tss *t = &tss_block.tss[cpu];
    t->iomap_base = (uint16_t)((uint64_t)tss_block.iomap - (uint64_t)t);
    tss_block.iomap[8192] = 0xFF;
    t->rsp[0] = (uint64_t)kernel_stack_top(cpu);
    uint32_t tr = 0x28 + 16 * cpu;

    struct dtr g = { sizeof(gdt) - 1, (uint64_t)gdt };
    __asm__ volatile(
        "lgdt %0\n\t"
        "pushq $0x08\n\t"
        "lea 1f(%%rip), %%rax\n\t"
        "pushq %%rax\n\t"
        "lretq\n"
        "1: mov $0x10, %%eax\n\t"
        "mov %%eax, %%ds\n\t"
        "mov %%eax, %%es\n\t"
        "mov %%eax, %%ss\n\t"
        "xor %%eax, %%eax\n\t"
        "mov %%eax, %%fs\n\t"
        "mov %%eax, %%gs\n\t"
        "ltr %w1" :: "m"(g), "r"(tr) : "rax", "memory");

    struct dtr i = { sizeof(idt) - 1, (uint64_t)idt };
    __asm__ volatile("lidt %0" :: "m"(i));

    struct cpu *c = &cpus[cpu];
    c->self = c;
    c->index = cpu;
    uint64_t gs = (uint64_t)c;          /* IA32_GS_BASE, after GS was loaded */
    __asm__ volatile("wrmsr" :: "c"(0xC0000101), "a"((uint32_t)gs), "d"((uint32_t)(gs >> 32)));
}

void send_ipi(uint32_t apic_id, uint32_t vector)
{
    lapic_write(LAPIC_ICR_HIGH, apic_id << 24);
    lapic_write(LAPIC_ICR_LOW, 0x4000 | vector);   /* fixed, physical, assert */
}

static void start_timer(uint32_t hz)
{
    lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
    if (!hz)
        return;
    lapic_write(LAPIC_TIMER_DCR, 0xB);              /* divide by 1 */
    lapic_write(LAPIC_LVT_TIMER, (1u << 17) | VEC_TIMER);   /* periodic */
    lapic_write(LAPIC_TIMER_ICR, (uint32_t)(LAPIC_BUS_HZ / hz));
}

/* Route an IOAPIC pin to a vector on CPU 0: edge-triggered, active high. */
static void ioapic_route(uint32_t pin, uint32_t vector)
{
    volatile uint32_t *sel = (volatile uint32_t *)IOAPIC_BASE;
    volatile uint32_t *win = (volatile uint32_t *)(IOAPIC_BASE + 0x10);
    *sel = 0x10 + 2 * pin + 1;
    *win = 0;
    *sel = 0x10 + 2 * pin;
    *win = vector;
}

/* 115200 8N1, FIFOs on, receive interrupt on, OUT2 so the line reaches the IOAPIC. */
static void uart_init(void)
{
    outb(UART_PORT + 1, 0x00);
    outb(UART_PORT + 3, 0x80);
    outb(UART_PORT + 0, 0x01);
    outb(UART_PORT + 1, 0x00);
    outb(UART_PORT + 3, 0x03);
    outb(UART_PORT + 2, 0x07);
    outb(UART_PORT + 4, 0x0B);
    outb(UART_PORT + 1, 0x01);
    ioapic_route(UART_GSI, VEC_UART);
}

/* Console input: the receive interrupt appends to a line buffer. */
static char input_line[128];
static volatile uint32_t input_len, input_done;
volatile uint64_t uart_irqs, virtio_irqs, net_irqs;

static void uart_rx_interrupt(void)
{
    uart_irqs++;
    while (inb(UART_PORT + 5) & 1) {
        char c = (char)inb(UART_PORT);
        if (input_done)
            continue;                   /* the last line is not read yet: drop */
        if (c == '\r' || c == '\n')
            input_done = 1;
        else if (input_len < sizeof(input_line) - 1)
            input_line[input_len++] = c;
    }
}

int console_read_line(char *buf, int size)
{
    if (!input_done)
        return -1;
    int n = (int)input_len < size - 1 ? (int)input_len : size - 1;
    for (int i = 0; i < n; i++)
        buf[i] = input_line[i];
    buf[n] = 0;
    input_len = 0;
    barrier();
    input_done = 0;
    return n;
}

static void virtio_interrupt(void)
{
    volatile uint32_t *regs = (volatile uint32_t *)boot->virtio_base;
    virtio_irqs++;
    regs[0x064 / 4] = regs[0x060 / 4];  /* acknowledge what is pending */
}

static void net_interrupt(void)
{
    volatile uint32_t *regs = (volatile uint32_t *)boot->net_base;
    net_irqs++;
    regs[0x064 / 4] = regs[0x060 / 4];
}

static const char *cpu_tag(void)
{
    static char tags[MAX_CPUS][12];
    uint32_t k = cpu_index();
    if (!boot || boot->nr_cpus <= 1)
        return "";
    char *t = tags[k];
    int n = 0;
    t[n++] = ' '; t[n++] = 'c'; t[n++] = 'p'; t[n++] = 'u'; t[n++] = '=';
    if (k >= 10)
        t[n++] = (char)('0' + k / 10);
    t[n++] = (char)('0' + k % 10);
    t[n] = 0;
    return t;
}

static void __attribute__((noreturn)) guest_stop(uint32_t status)
{
    for (;;) {
        outl(PORT_EXIT, status);
        __asm__ volatile("cli; hlt");
    }
}

void trap(struct trap_frame *f)
{
    switch (f->vector) {
    case VEC_TIMER: {
        struct cpu *c = this_cpu();
        uint64_t now = rdtsc();         /* a TSC that a save, restore or move set back */
        if (now < c->last_tsc && c->tsc_back == TSC_FINE) {
            c->back_from = c->last_tsc;
            c->back_to = now;
            c->tsc_back = TSC_WENT_BACK;
        }
        c->last_tsc = now;
        c->ticks++;
        if (c->index == 0)
            timer_ticks++;
        lapic_write(LAPIC_EOI, 0);
        return;
    }
    case VEC_TOKEN:
        this_cpu()->tokens++;
        lapic_write(LAPIC_EOI, 0);
        return;
    case VEC_KICK:
        this_cpu()->kicks++;
        lapic_write(LAPIC_EOI, 0);
        return;
    case VEC_UART:
        uart_rx_interrupt();
        lapic_write(LAPIC_EOI, 0);
        return;
    case VEC_VIRTIO:
        virtio_interrupt();
        lapic_write(LAPIC_EOI, 0);
        return;
    case VEC_NET:
        net_interrupt();
        lapic_write(LAPIC_EOI, 0);
        return;
    case VEC_SPURIOUS:
        return;
    default:
        printk("PANIC: exception %lu error=%lx rip=%lx cs=%lx rsp=%lx%s\n",
               f->vector, f->error, f->rip, f->cs, f->rsp, cpu_tag());
        guest_stop(0xdead0000u | (uint32_t)f->vector);
    }
}

void clock_check(void)
{
    struct cpu *c = this_cpu();
    if (c->tsc_back == TSC_WENT_BACK) {
        c->tsc_back = TSC_SAID;
        printk("clock CORRUPT cpu=%u tsc went back from %lu to %lu\n", c->index, c->back_from, c->back_to);
    }
}

/* idle runs in ring 0, the only ring that may halt: wait for the timer,
 * say how many ticks once a second.  Slow ring 0 hardly matters here: the
 * loop body runs once per tick. */
void idle_loop(void)
{
    uint64_t hz = boot->timer_hz, next = hz;
    printk("idle start hz=%lu\n", hz);
    for (;;) {
        __asm__ volatile("sti; hlt; cli");
        char line[128];
        if (console_read_line(line, sizeof(line)) >= 0)
            printk("idle input: %s\n", line);
        clock_check();
        if (timer_ticks >= next) {
            printk("idle ticks=%lu\n", timer_ticks);
            next = timer_ticks + hz;
        }
    }
}

/* Any vCPU with nothing to do: halted, taking its interrupts. */
void halt_forever(void)
{
    for (;;) {
        __asm__ volatile("sti; hlt; cli");
        clock_check();
    }
}

/* Every vCPU enters here with its own kernel stack (start.S).  vCPU 0 checks
 * the boot info and builds the shared tables; the others wait for them. */
void kmain(const struct boot_info *bi, uint32_t cpu)
{
    if (cpu == 0) {
        if (bi->magic != BOOT_INFO_MAGIC || bi->version != BOOT_INFO_VERSION) {
            printk("PANIC: bad boot info magic=%x version=%u\n", bi->magic, bi->version);
            guest_stop(0xdead0100u);
        }
        boot = bi;
        build_tables();
        __atomic_store_n(&tables_ready, 1, __ATOMIC_RELEASE);
    } else {
        while (!__atomic_load_n(&tables_ready, __ATOMIC_ACQUIRE))
            cpu_relax();
    }
    load_tables(cpu);
    uint32_t ebx, eax = 1, ecx = 0, edx;
    __asm__ volatile("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
    if (ebx >> 24 != cpu) {
        printk("PANIC: vCPU with LAPIC id %u has CPUID initial APIC id %u\n", cpu, ebx >> 24);
        guest_stop(0xdead0400u);
    }
    if (cpu && cpu >= bi->nr_cpus)
        halt_forever();                 /* a vCPU the boot info does not count: idle */
    if (cpu == 0) {
        outb(0x21, 0xFF);               /* mask the 8259s: the LAPICs are the timers */
        outb(0xA1, 0xFF);
    }
    start_timer(bi->timer_hz);
    if (cpu == 0 && (bi->flags & BOOT_F_UART))
        uart_init();
    if (cpu == 0 && (bi->flags & BOOT_F_VIRTIO))
        ioapic_route(VIRTIO_GSI, VEC_VIRTIO);
    if (cpu == 0 && (bi->flags & BOOT_F_NET))
        ioapic_route(NET_GSI, VEC_NET);
    if (bi->workload == WL_SMP && smp_main)
        smp_main(cpu);
    if (bi->workload == WL_IDLE)
        cpu == 0 ? idle_loop() : halt_forever();
    if (cpu != 0 && bi->workload != WL_LEDGER)
        halt_forever();                 /* the other workloads run on vCPU 0 */
    /* as if called: RSP = 8 mod 16 at the entry (the ABI's alignment; SSE code needs it) */
    enter_user(workload_main, (uint8_t *)user_stack_top(cpu) - 8, bi);
}
