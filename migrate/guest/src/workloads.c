/* Ring-3 workloads (specs/guest-boot.md, "Workloads").  They run at native
 * speed; each prints its progress lines on the console. */
#include "rt.h"
#include "ledger_pattern.h"

#define REPORT_DIV 10   /* progress lines at most 10 times a second */

static uint64_t tsc_hz(void) { return boot->tsc_khz * 1000; }

/* Lines typed on the console come back as "<who> input: <line>". */
static void echo_input(const char *who)
{
    char line[128];
    if (console_read_line(line, sizeof(line)) >= 0)
        printk("%s input: %s\n", who, line);
}

/* pagetouch: QEMU's migration-test pattern.  Increment the first byte of
 * every page of the region, pass after pass. */
static void pagetouch(void)
{
    volatile uint8_t *base = (volatile uint8_t *)boot->wl_base;
    uint64_t pages = boot->wl_size / PAGE_SIZE, pass = 0;
    uint64_t interval = tsc_hz() / REPORT_DIV, last = rdtsc();
    printk("pagetouch start base=%lx pages=%lu\n", (uint64_t)base, pages);
    for (;;) {
        for (uint64_t i = 0; i < pages; i++)
            base[i * PAGE_SIZE]++;
        pass++;
        uint64_t now = rdtsc();
        if (now - last >= interval) {
            printk("pagetouch pass=%lu ticks=%lu\n", pass, timer_ticks);
            echo_input("pagetouch");
            last = now;
        }
    }
}

/* The dirtier's working set starts with content as compressible as asked (args[2]):
 * 0 mixed (of every four pages one zero, two text-like, one random: about 2.3x with
 * zstd-1, like real memory), 1 zero, 2 text-like, 3 random. */
#define CONTENT_MIXED 0
#define CONTENT_ZERO 1
#define CONTENT_TEXT 2
#define CONTENT_RANDOM 3

static const char *const WORDS[16] = {
    "the ", "page ", "memory ", "guest ", "host ", "stream ", "record ", "kernel ",
    "save ", "dirty ", "round ", "batch ", "clock ", "value ", "status ", "device ",
};

static void fill_page(uint8_t *page, int kind, uint64_t *x)
{
    if (kind == CONTENT_RANDOM) {
        for (unsigned i = 0; i < PAGE_SIZE / 8; i++)
            ((uint64_t *)page)[i] = *x = ledger_next(*x);
        return;
    }
    unsigned at = 0;                /* text: words and five-digit numbers */
    while (at < PAGE_SIZE) {
        *x = ledger_next(*x);
        const char *w = (*x & 0x30) ? WORDS[*x & 15] : 0;
        char num[8] = {'0' + (*x >> 8) % 10, '0' + (*x >> 16) % 10, '0' + (*x >> 24) % 10,
                       '0' + (*x >> 32) % 10, '0' + (*x >> 40) % 10, '\n', 0, 0};
        for (const char *c = w ? w : num; *c && at < PAGE_SIZE; c++)
            page[at++] = (uint8_t)*c;
    }
}

static void fill_content(uint8_t *base, uint64_t pages, uint64_t content)
{
    uint64_t x = 0x9E3779B97F4A7C15ULL;
    for (uint64_t p = 0; p < pages && content != CONTENT_ZERO; p++) {
        int kind = content == CONTENT_MIXED ? (p % 4 == 0 ? CONTENT_ZERO : p % 4 == 3 ? CONTENT_RANDOM
                                                                                       : CONTENT_TEXT)
                                            : (int)content;
        if (kind != CONTENT_ZERO)
            fill_page(base + p * PAGE_SIZE, kind, &x);
    }
}

/* dirtier: write one word into one page after another of a working set,
 * paced by the TSC at args[1] bytes per second (0: as fast as it can). */
static void dirtier(void)
{
    volatile uint64_t *base = (volatile uint64_t *)boot->wl_base;
    uint64_t ws = boot->args[0] ? boot->args[0] : boot->wl_size;
    if (ws > boot->wl_size)
        ws = boot->wl_size;
    uint64_t pages = ws / PAGE_SIZE ? ws / PAGE_SIZE : 1, hz = tsc_hz();
    uint64_t rate = boot->args[1] < (4ULL << 30) ? boot->args[1] : (4ULL << 30);
    uint64_t content = boot->args[2] <= CONTENT_RANDOM ? boot->args[2] : CONTENT_MIXED;
    fill_content((uint8_t *)boot->wl_base, pages, content);
    uint64_t written = 0, pos = 0, start = rdtsc(), last = start, last_written = 0;
    printk("dirtier start pages=%lu rate=%lu content=%lu\n", pages, rate, content);
    for (;;) {
        uint64_t now = rdtsc();
        uint64_t el = now - start;
        uint64_t allowed = rate ? (el / hz * rate + el % hz * rate / hz) / PAGE_SIZE
                                : written + 4096;
        while (written < allowed) {
            base[pos * (PAGE_SIZE / 8) + (written & 511)] = written;
            written++;
            if (++pos == pages)
                pos = 0;
        }
        if (now - last >= hz) {
            uint64_t kbps = (written - last_written) * 4 * hz / (now - last);
            printk("dirtier writes=%lu rate=%lu KB/s ticks=%lu\n", written, kbps, timer_ticks);
            echo_input("dirtier");
            last = now;
            last_written = written;
        }
    }
}

/* "<who> net ip=A.B.C.D mac=.. mtu=N features=HEX" once the NIC is up. */
static void print_net(const char *who)
{
    uint32_t ip = (uint32_t)(boot->flags & BOOT_F_NET ? boot->args[who[0] == 'l' ? 2 : 0] : 0);
    printk("%s net ip=%u.%u.%u.%u mac=%02x:%02x:%02x:%02x:%02x:%02x mtu=%u features=%lx\n", who,
           ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255, vnet_mac[0], vnet_mac[1], vnet_mac[2],
           vnet_mac[3], vnet_mac[4], vnet_mac[5], vnet_mtu, vnet_features);
}

/* The ledger's disk journal: generation g writes one 512-byte block at
 * sector g % nsect (magic, seed, gen, sum, then a pattern), reads it back,
 * and reads back one older generation's block. */
#define JOURNAL_MAGIC 0x4c4e524a52474c48ULL     /* "HLGRJRNL" */
static uint64_t journal_block[64] __attribute__((aligned(512)));
static uint64_t journal_sectors;

static void journal_fill(uint64_t *b, uint64_t seed, uint64_t gen, uint64_t sum)
{
    b[0] = JOURNAL_MAGIC;
    b[1] = seed;
    b[2] = gen;
    b[3] = sum;
    uint64_t x = ledger_page_seed(seed, gen, ~0ULL);
    for (int i = 4; i < 64; i++)
        b[i] = x = ledger_next(x);
}

/* 0 if the block at gen's sector holds gen (any sum when sum == ~0). */
static int journal_check(uint64_t seed, uint64_t gen, uint64_t sum)
{
    if (vblk_io(0, gen % journal_sectors, journal_block, 512) != 0)
        return -1;
    uint64_t want[64];
    journal_fill(want, seed, gen, sum == ~0ULL ? journal_block[3] : sum);
    for (int i = 0; i < 64; i++)
        if (journal_block[i] != want[i])
            return -2;
    return 0;
}

static const char JOURNAL_OK[] = "ok", JOURNAL_OFF[] = "off";    /* the step's good results */

static const char *journal_step(const struct ledger_header *h, uint64_t sum)
{
    if (!journal_sectors)
        return JOURNAL_OFF;
    journal_fill(journal_block, h->seed, h->gen, sum);
    if (vblk_io(1, h->gen % journal_sectors, journal_block, 512) != 0)
        return "write-failed";
    if (journal_check(h->seed, h->gen, sum) != 0)
        return "readback-bad";
    /* one older generation still on the disk, picked by a hash of gen among the last
     * span: spread over them, not always gen - 1 */
    uint64_t span = h->gen < journal_sectors - 1 ? h->gen : journal_sectors - 1;
    if (span) {
        uint64_t older = h->gen - 1 - ledger_mix(h->gen) % span;
        if (journal_check(h->seed, older, ~0ULL) != 0)
            return "older-bad";
    }
    return JOURNAL_OK;
}

/* A page that does not hold what it should: said once a second, for ever. */
static void __attribute__((noreturn)) ledger_corrupt(const char *tag, uint64_t page, int word, uint64_t gen)
{
    for (;;) {
        printk("ledger CORRUPT %spage=%lu word=%d gen=%lu\n", tag, page, word, gen);
        delay_ms(1000);
    }
}

/* ledger: self-checking memory.  Every pass verifies that each data page
 * holds generation gen's pattern (summing what it reads), then rewrites
 * every page with generation gen + 1.  The header says where it is, so the
 * host can check memory of a paused guest too.  With several vCPUs each runs
 * its own ledger on its own slice of the workload region, and says which it
 * is on every line ("cpu=K "); only vCPU 0 keeps the disk journal, serves a
 * NIC and echoes console input. */
static void ledger(uint32_t cpu)
{
    uint64_t ncpus = boot->nr_cpus > 1 ? boot->nr_cpus : 1;
    uint64_t slice = boot->wl_size / ncpus / PAGE_SIZE * PAGE_SIZE;
    uint64_t base = boot->wl_base + cpu * slice;
    struct ledger_header *h = (struct ledger_header *)base;
    uint64_t *data = (uint64_t *)(base + PAGE_SIZE);
    uint64_t max_pages = slice / PAGE_SIZE - 1;
    uint64_t npages = boot->args[1] && boot->args[1] < max_pages ? boot->args[1] : max_pages;
    char tag[16] = "";
    if (ncpus > 1) {
        tag[0] = 'c'; tag[1] = 'p'; tag[2] = 'u'; tag[3] = '=';
        int n = 4;
        if (cpu >= 10)
            tag[n++] = (char)('0' + cpu / 10);
        tag[n++] = (char)('0' + cpu % 10);
        tag[n++] = ' ';
        tag[n] = 0;
    }

    if (h->magic != LEDGER_MAGIC) {
        /* the magic goes in last: until then a host check says "no ledger" */
        h->seed = boot->args[0] + cpu;     /* each vCPU's pages differ from the others' */
        h->npages = npages;
        h->gen = h->target = h->phase = h->cursor = 0;
        for (uint64_t i = 0; i < npages; i++)
            ledger_fill_page(data + i * LEDGER_WORDS, h->seed, 0, i);
        barrier();
        h->magic = LEDGER_MAGIC;
    }
    if (cpu == 0 && vblk_init() == 0 && vblk_capacity)
        journal_sectors = vblk_capacity < 4096 ? vblk_capacity : 4096;
    printk("ledger start %sseed=%lu pages=%lu gen=%lu journal=%lu\n", tag, h->seed, h->npages, h->gen,
           cpu == 0 ? journal_sectors : 0);
    if (cpu == 0 && (boot->flags & BOOT_F_NET) && net_init((uint32_t)boot->args[2], 0) == 0)
        print_net("ledger");            /* vCPU 0 alone serves the NIC */
    for (;;) {
        uint64_t sum = 0;
        for (uint64_t i = 0; i < h->npages; i++) {
            if (cpu == 0)
                net_poll();             /* a NIC is served between pages */
            h->cursor = i;
            int bad = ledger_check_page(data + i * LEDGER_WORDS, h->seed, h->gen, i, &sum);
            if (bad >= 0)
                ledger_corrupt(tag, i, bad, h->gen);
        }
        h->sum = sum;
        h->passes++;
        clock_check();
        const char *journal = cpu == 0 ? journal_step(h, sum) : JOURNAL_OFF;
        if (journal != JOURNAL_OK && journal != JOURNAL_OFF) {
            for (;;) {
                printk("ledger JOURNAL BAD %s gen=%lu\n", journal, h->gen);
                delay_ms(1000);
            }
        }
        printk("ledger ok %sgen=%lu sum=%016lx ticks=%lu journal=%s\n", tag, h->gen, sum,
               this_cpu()->ticks, journal);
        if (cpu == 0)
            echo_input("ledger");
        /* Every store below leaves the header describing memory exactly
         * (specs/guest-boot.md, "ledger"): a paused guest always checks. */
        h->target = h->gen + 1;
        h->cursor = 0;
        barrier();
        h->phase = 1;
        for (uint64_t i = 0; i < h->npages; i++) {
            if (cpu == 0)
                net_poll();
            /* checked again before it is overwritten (a second read of every page per
             * generation): a page a restore or move got wrong below the check's cursor
             * (checked before the pause) is caught here */
            uint64_t unused = 0;
            int bad = ledger_check_page(data + i * LEDGER_WORDS, h->seed, h->gen, i, &unused);
            if (bad >= 0)
                ledger_corrupt(tag, i, bad, h->gen);
            ledger_fill_page(data + i * LEDGER_WORDS, h->seed, h->target, i);
            barrier();
            h->cursor = i + 1;
        }
        barrier();
        h->gen = h->target;
        barrier();
        h->phase = 0;
        h->cursor = 0;
    }
}

/* pageset: write exactly the pages listed at wl_base (args[0] entries of
 * pfns), between two sync points, touching no other memory (the loop is in
 * registers; the timer is off).  Used to prove the dirty log is exact.  Its code
 * starts a page of its own, so the loop between the sync points runs on the page the
 * code before the first one fetched: on a shadow-paging host a code page first
 * fetched between them was logged as written (code above it grew by a few hundred
 * bytes and pushed the loop onto the next page). */
static void __attribute__((noinline, aligned(4096))) pageset(void)
{
    const volatile uint64_t *pfns = (const volatile uint64_t *)boot->wl_base;
    uint64_t n = boot->args[0], sum = 0;
    /* Read the list before the first sync point: on a shadow-paging host
     * the first access to a page marks it dirty even when it is a read
     * (specs/guest-boot.md, "Dirty log precision"). */
    for (uint64_t i = 0; i < n; i++)
        sum += pfns[i];
    printk("pageset start count=%lu sum=%lu\n", n, sum);
    outl(PORT_SYNC, 1);
    for (uint64_t i = 0; i < n; i++)
        *(volatile uint8_t *)(pfns[i] * PAGE_SIZE + (i & 0xFFF)) = (uint8_t)(i | 1);
    outl(PORT_SYNC, 2);
    for (;;)
        cpu_relax();
}

/* bench: time the ledger loop with the TSC (tools/bench_ring3.py runs the
 * same loop on the host).  args: pages (default 1024), rounds (default 100). */
static void bench(void)
{
    uint64_t *buf = (uint64_t *)boot->wl_base;
    uint64_t pages = boot->args[0] ? boot->args[0] : 1024;
    uint64_t rounds = boot->args[1] ? boot->args[1] : 100;
    if (pages > boot->wl_size / PAGE_SIZE)
        pages = boot->wl_size / PAGE_SIZE;
    ledger_bench(buf, pages, 1);            /* first touch off the clock */
    uint64_t t0 = rdtsc();
    uint64_t sum = ledger_bench(buf, pages, rounds);
    uint64_t t1 = rdtsc();
    printk("bench pages=%lu rounds=%lu cycles=%lu sum=%016lx\n", pages, rounds, t1 - t0, sum);
    guest_exit(0);
}

/* iobench: the cost of one port access from ring 3 three ways: completed in
 * the host's C run loop, answered by the host's Python, and served by the
 * stub through an ioreq (UART scratch register).  Cycles per access. */
static void iobench(void)
{
    uint64_t n = boot->args[0] ? boot->args[0] : 2000, t0, cycles[3];
    static const uint16_t ports[3] = { PORT_NULL, PORT_UNCLAIMED, UART_PORT + 7 };
    for (int k = 0; k < 3; k++) {
        if (k == 2 && !(boot->flags & BOOT_F_UART)) {
            cycles[k] = 0;
            continue;
        }
        (void)inb(ports[k]);
        t0 = rdtsc();
        for (uint64_t i = 0; i < n; i++)
            (void)inb(ports[k]);
        cycles[k] = (rdtsc() - t0) / n;
    }
    printk("iobench n=%lu null=%lu host=%lu stub=%lu\n", n, cycles[0], cycles[1], cycles[2]);
    guest_exit(0);
}

/* netecho: answers ARP, ping and UDP (netstack.c) from a polling loop, with
 * a line of counters every five seconds (each byte of a console line is an
 * exit and an ioreq here: a line stalls the loop for tens of milliseconds;
 * the status port answers at once).  args: IPv4 address (as a number), the
 * driver's VNET_OPT_* options. */
static void netecho(void)
{
    uint64_t t0, null_exit, hz = tsc_hz(), last;
    (void)inb(PORT_NULL);
    t0 = rdtsc();
    for (int i = 0; i < 1000; i++)
        (void)inb(PORT_NULL);
    null_exit = (rdtsc() - t0) / 1000;
    if (net_init((uint32_t)boot->args[0], boot->args[1]) < 0) {
        for (;;) {
            printk("netecho NO NIC (flags=%lx ip=%lx)\n", boot->flags, boot->args[0]);
            delay_ms(1000);
        }
    }
    print_net("netecho");
    printk("netecho start null_exit=%lu\n", null_exit);
    last = rdtsc();
    for (;;) {
        net_poll();
        uint64_t now = rdtsc();
        if (now - last >= 5 * hz) {
            net_report("netecho");
            echo_input("netecho");
            last = now;
        }
    }
}

void workload_main(const struct boot_info *bi)
{
    (void)bi;
    switch (boot->workload) {
    case WL_PAGETOUCH: pagetouch(); break;
    case WL_DIRTIER: dirtier(); break;
    case WL_LEDGER: ledger(cpu_index()); break;
    case WL_PAGESET: pageset(); break;
    case WL_BENCH: bench(); break;
    case WL_IOBENCH: iobench(); break;
    case WL_NETECHO: netecho(); break;
    }
    printk("PANIC: unknown workload %u\n", boot->workload);
    guest_exit(0xdead0200);
}
