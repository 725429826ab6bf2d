/* smp (10): the vCPUs pass tokens around a ring, through shared memory and
 * IPIs (specs/guest-boot.md, "smp").  What SMP can break when a guest is
 * saved or moved shows up here: a dirty page written by one vCPU and missed
 * (a token lost, repeated or out of sequence), an IPI lost or repeated at the
 * pause (a vCPU's token interrupts no longer match the tokens it was sent).
 *
 * Ring 0 (it halts while it waits: eight vCPUs on two host cores must not
 * spin), interrupts on: this host delivers a pending interrupt when the vCPU
 * next exits with interrupts on, not at the iretq or sti that opens a window,
 * so a loop with interrupts off but for `sti; hlt` would take only the
 * highest-priority one (tokens) and starve the timer.
 *
 * Token j with hop h travels as the value (h << 8) | j from vCPU k to vCPU
 * (k + 1) mod n, through the receiver's queue, and a token interrupt
 * (VEC_TOKEN, counted in cpus[k].tokens by kernel.c) wakes the receiver.  A
 * local APIC merges an interrupt with one of the same vector still pending,
 * so the sender rings only when the receiver's doorbell is clear: it sets the
 * doorbell, counts the IPI and sends it; the receiver clears the doorbell
 * after each token interrupt and then takes every token queued.  So an IPI is
 * never merged: the token interrupts a vCPU took equal the IPIs sent to it, or
 * one fewer while one is on its way.  An IPI lost stalls the ring (the
 * doorbell stays set); one taken twice makes the count exceed the IPIs sent. */
#include "rt.h"

#define SMP_MAGIC 0x474e495250534d48ULL      /* "HMSPRING" */
#define QLEN 64
#define PASSES_PER_ROUND 4096                /* the default round: about this many passes */

struct smp_header {             /* wl_base */
    uint64_t magic;
    uint64_t ncpus, ntokens, laps;  /* a round: each token goes laps times around */
    uint64_t round;             /* rounds completed and checked */
    uint64_t parked;            /* tokens back at their start vCPU in this round */
    uint64_t sent_sum;          /* sum of the values sent (lock xadd) */
    uint64_t recv_sum;          /* sum of the values received (lock xadd) */
    uint64_t passes;            /* tokens received in all (lock xadd) */
    uint64_t online;            /* vCPUs whose LAPIC is on (lock xadd) */
    uint64_t failed;            /* a check failed: everyone stops */
};

struct smp_token {              /* wl_base + 4 KiB, one per token */
    uint64_t hops;              /* the last hop received (written by its holder) */
    uint64_t start;             /* the vCPU it starts every round from */
};

struct smp_queue {              /* wl_base + (2 + k) * 4 KiB: what vCPU k is sent */
    uint64_t slot[QLEN];        /* a token's value, 0: empty */
    uint64_t head;              /* tokens taken (by vCPU k) */
    uint64_t tail;              /* tokens put (by vCPU k - 1 only) */
    uint64_t parked;            /* 1 + the token parked here at the end of its round; 0: none */
    uint64_t parked_round;      /* the round it parked in */
    uint64_t doorbell;          /* 1: an IPI was sent and vCPU k has not cleared it yet */
    uint64_t ipis;              /* token IPIs sent to vCPU k (by vCPU k - 1 only) */
    uint64_t seen;              /* cpus[k].tokens when vCPU k last cleared the doorbell */
};

static struct smp_header *h;
static struct smp_token *tok;
static uint64_t ncpus, ntokens;

static struct smp_queue *queue(uint64_t k)
{
    return (struct smp_queue *)(boot->wl_base + (2 + k) * PAGE_SIZE);
}

/* Halt until an interrupt unless `ready()` already holds; interrupts stay on.
 * The test is made with interrupts off and `sti; hlt` cannot be split by one,
 * so a wake-up that arrives after the test still ends the hlt. */
static void wait_until(int (*ready)(uint32_t), uint32_t k)
{
    __asm__ volatile("cli" ::: "memory");
    if (ready(k))
        __asm__ volatile("sti" ::: "memory");
    else
        __asm__ volatile("sti; hlt" ::: "memory");
}

static int started(uint32_t k)
{
    (void)k;
    return __atomic_load_n(&h->magic, __ATOMIC_SEQ_CST) == SMP_MAGIC;
}

static int never(uint32_t k)
{
    (void)k;
    return 0;
}

static void __attribute__((noreturn, format(printf, 2, 3))) fail(uint32_t k, const char *fmt, ...)
{
    char what[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    __atomic_store_n(&h->failed, 1, __ATOMIC_SEQ_CST);
    for (;;) {                  /* once a second, for ever (once without a timer) */
        printk("smp BAD cpu=%u %s\n", k, what);
        uint64_t until = cpus[k].ticks + (boot->timer_hz ? boot->timer_hz : 1);
        while (cpus[k].ticks < until)
            wait_until(never, k);
    }
}

/* vCPU k sends hop `hop` of token j to the next vCPU. */
static void send(uint32_t k, uint64_t j, uint64_t hop)
{
    uint32_t next = (uint32_t)((k + 1) % ncpus);
    struct smp_queue *q = queue(next);
    uint64_t value = hop << 8 | j, empty = 0;
    if (!__atomic_compare_exchange_n(&q->slot[q->tail % QLEN], &empty, value, 0,
                                     __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        fail(k, "queue of cpu %u full at %lu", next, q->tail);
    __atomic_store_n(&q->tail, q->tail + 1, __ATOMIC_RELEASE);
    __atomic_fetch_add(&h->sent_sum, value, __ATOMIC_SEQ_CST);
    if (__atomic_exchange_n(&q->doorbell, 1, __ATOMIC_SEQ_CST) == 0) {
        __atomic_store_n(&q->ipis, q->ipis + 1, __ATOMIC_SEQ_CST);
        send_ipi(next, VEC_TOKEN);
    }
}

/* sum of (h << 8 | j) over h = 1..hops and j = 0..ntokens-1, modulo 2^64 */
static uint64_t expected_sum(uint64_t hops)
{
    uint64_t tri = hops % 2 ? hops * ((hops + 1) / 2) : (hops / 2) * (hops + 1);
    return ntokens * 256 * tri + hops * (ntokens * (ntokens - 1) / 2);
}

/* Every token is parked: nothing is in flight, so the books must balance. */
static void round_end(uint32_t k)
{
    uint64_t round = h->round + 1, hops = round * h->laps * ncpus;
    for (uint64_t j = 0; j < ntokens; j++)
        if (tok[j].hops != hops)
            fail(k, "token %lu made %lu hops by the end of round %lu, not %lu", j, tok[j].hops, round, hops);
    uint64_t sent = h->sent_sum, received = h->recv_sum, passes = h->passes;
    if (sent != received)
        fail(k, "round %lu: sent %016lx received %016lx", round, sent, received);
    if (sent != expected_sum(hops))
        fail(k, "round %lu: sum %016lx, want %016lx", round, sent, expected_sum(hops));
    for (uint64_t i = 0; i < ncpus; i++) {
        struct smp_queue *q = queue(i);
        uint64_t taken = cpus[i].tokens;
        if (q->head != q->tail || taken > q->ipis || q->ipis - taken > 1)
            fail(k, "round %lu: cpu %lu took %lu of %lu tokens, %lu token interrupts for %lu IPIs",
                 round, i, q->head, q->tail, taken, q->ipis);
    }
    h->parked = 0;
    __atomic_store_n(&h->round, round, __ATOMIC_SEQ_CST);
    for (uint64_t j = 0; j < ntokens; j++)
        if (tok[j].start != k)
            send_ipi((uint32_t)tok[j].start, VEC_KICK);
    clock_check();
    printk("smp ok round=%lu passes=%lu sum=%016lx ticks=%lu cpu=%u\n", round, passes, sent,
           timer_ticks, k);
}

/* vCPU k takes the token at the head of its queue. */
static void receive(uint32_t k)
{
    struct smp_queue *q = queue(k);
    uint64_t value = __atomic_exchange_n(&q->slot[q->head % QLEN], 0, __ATOMIC_SEQ_CST);
    if (!value)
        fail(k, "slot %lu of its queue is empty (put %lu)", q->head, q->tail);
    q->head++;
    uint64_t j = value & 0xFF, hop = value >> 8;
    if (j >= ntokens)
        fail(k, "value %lx names token %lu of %lu", value, j, ntokens);
    struct smp_token *t = &tok[j];
    if (hop != t->hops + 1)
        fail(k, "token %lu hop %lu after hop %lu", j, hop, t->hops);
    if ((t->start + hop) % ncpus != k)
        fail(k, "token %lu hop %lu reached the wrong cpu", j, hop);
    t->hops = hop;
    __atomic_fetch_add(&h->recv_sum, value, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&h->passes, 1, __ATOMIC_SEQ_CST);
    if (hop % (h->laps * ncpus)) {
        send(k, j, hop + 1);
        return;
    }
    q->parked_round = h->round;         /* back at its start: parked until the round ends */
    q->parked = j + 1;
    if (__atomic_add_fetch(&h->parked, 1, __ATOMIC_SEQ_CST) == ntokens)
        round_end(k);
}

/* vCPU 0: a ring that stops moving for two seconds is reported once a second. */
static void watch(void)
{
    static uint64_t last_passes, last_move, next_report;
    uint64_t hz = boot->timer_hz, now = cpus[0].ticks;
    if (!hz)
        return;
    if (h->passes != last_passes) {
        last_passes = h->passes;
        last_move = now;
        return;
    }
    if (now - last_move < 2 * hz || now < next_report)
        return;
    next_report = now + hz;
    printk("smp STALL round=%lu passes=%lu parked=%lu\n", h->round, h->passes, h->parked);
    for (uint64_t i = 0; i < ncpus; i++)
        printk("smp STALL cpu=%lu taken=%lu put=%lu doorbell=%lu ipis=%lu token-interrupts=%lu\n", i,
               queue(i)->head, queue(i)->tail, queue(i)->doorbell, queue(i)->ipis, cpus[i].tokens);
}

static int has_work(uint32_t k)
{
    struct smp_queue *q = queue(k);
    return h->failed || cpus[k].tokens != q->seen
        || (q->parked && __atomic_load_n(&h->round, __ATOMIC_SEQ_CST) != q->parked_round);
}

void smp_main(uint32_t k)
{
    h = (struct smp_header *)boot->wl_base;
    tok = (struct smp_token *)(boot->wl_base + PAGE_SIZE);
    ncpus = boot->nr_cpus ? boot->nr_cpus : 1;
    ntokens = ncpus / 2 ? ncpus / 2 : 1;
    __asm__ volatile("sti" ::: "memory");
    __atomic_fetch_add(&h->online, 1, __ATOMIC_SEQ_CST);    /* its LAPIC takes IPIs now */
    if (k == 0) {
        while (__atomic_load_n(&h->online, __ATOMIC_SEQ_CST) < ncpus)
            cpu_relax();
        uint64_t laps = boot->args[0] ? boot->args[0] : PASSES_PER_ROUND / (ntokens * ncpus);
        h->ncpus = ncpus;
        h->ntokens = ntokens;
        h->laps = laps ? laps : 1;
        for (uint64_t j = 0; j < ntokens; j++)
            tok[j].start = j * (ncpus / ntokens);
        __atomic_store_n(&h->magic, SMP_MAGIC, __ATOMIC_SEQ_CST);
        printk("smp start cpus=%lu tokens=%lu laps=%lu\n", ncpus, ntokens, h->laps);
        for (uint32_t i = 1; i < ncpus; i++)
            send_ipi(i, VEC_KICK);
    } else {
        while (!started(k))
            wait_until(started, k);
    }
    for (uint64_t j = 0; j < ntokens; j++)      /* round 1 begins */
        if (tok[j].start == k)
            send(k, j, 1);
    for (;;) {
        struct smp_queue *q = queue(k);
        if (h->failed)
            halt_forever();
        uint64_t taken = cpus[k].tokens;
        if (taken != q->seen) {                 /* a token interrupt: clear, then take all */
            if (taken > __atomic_load_n(&q->ipis, __ATOMIC_SEQ_CST))
                fail(k, "%lu token interrupts for %lu IPIs sent", taken, q->ipis);
            q->seen = taken;
            __atomic_store_n(&q->doorbell, 0, __ATOMIC_SEQ_CST);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            while (q->head != __atomic_load_n(&q->tail, __ATOMIC_ACQUIRE) && !h->failed)
                receive(k);
        }
        if (q->parked && __atomic_load_n(&h->round, __ATOMIC_SEQ_CST) != q->parked_round) {
            uint64_t j = q->parked - 1;         /* a new round: my token goes on */
            q->parked = 0;
            send(k, j, tok[j].hops + 1);
        }
        if (k == 0)
            watch();
        wait_until(has_work, k);
    }
}
