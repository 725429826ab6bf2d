/* The ledger workload's memory pattern, shared by the guest image and the
 * host (migrate.kvm._kvm) so the host can check guest memory and the sums
 * the guest prints.  specs/guest-boot.md, "ledger". */
#ifndef HVM_LEDGER_PATTERN_H
#define HVM_LEDGER_PATTERN_H
#include <stdint.h>

#define LEDGER_MAGIC  0x5245474445444c48ULL   /* "HLDEDGER" */
#define LEDGER_WORDS  512                      /* 64-bit words per page */

/* The ledger header: the first page of the workload region. */
struct ledger_header {
    uint64_t magic;
    uint64_t seed;
    uint64_t npages;        /* data pages, after this header page */
    uint64_t gen;           /* generation the data pages hold (phase 1: see cursor) */
    uint64_t phase;         /* 0: verifying gen; 1: rewriting to target */
    uint64_t cursor;        /* phase 0: the page being verified;
                               phase 1: pages [0, cursor) already hold target */
    uint64_t sum;           /* checksum of the last verified generation */
    uint64_t passes;
    uint64_t target;        /* phase 1: the generation being written */
};

static inline uint64_t ledger_mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* First state of page `page`'s xorshift sequence in generation `gen`. */
static inline uint64_t ledger_page_seed(uint64_t seed, uint64_t gen, uint64_t page)
{
    return ledger_mix(seed ^ ledger_mix(gen * 0x100000001b3ULL + page)) | 1;
}

static inline uint64_t ledger_next(uint64_t x)
{
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
}

static inline void ledger_fill_page(uint64_t *p, uint64_t seed, uint64_t gen, uint64_t page)
{
    uint64_t x = ledger_page_seed(seed, gen, page);
    for (int j = 0; j < LEDGER_WORDS; j++) {
        x = ledger_next(x);
        p[j] = x;
    }
}

/* Fold one page's words into the running sum. */
static inline uint64_t ledger_fold(uint64_t sum, uint64_t page_sum)
{
    return (sum ^ page_sum) * 0x100000001b3ULL;
}

/* Returns -1 if page `page` holds generation `gen`, else the first bad word;
 * adds the page into *sum either way. */
static inline int ledger_check_page(const uint64_t *p, uint64_t seed, uint64_t gen,
                                    uint64_t page, uint64_t *sum)
{
    uint64_t x = ledger_page_seed(seed, gen, page), acc = 0;
    int bad = -1;
    for (int j = 0; j < LEDGER_WORDS; j++) {
        x = ledger_next(x);
        acc += p[j];
        if (p[j] != x && bad < 0)
            bad = j;
    }
    *sum = ledger_fold(*sum, acc);
    return bad;
}

/* The benchmark loop (tools/bench_ring3.py): rounds x (fill every page
 * with generation r, then verify it), the same code in guest and host. */
static inline uint64_t ledger_bench(uint64_t *buf, uint64_t pages, uint64_t rounds)
{
    uint64_t sum = 0;
    for (uint64_t r = 0; r < rounds; r++) {
        for (uint64_t i = 0; i < pages; i++)
            ledger_fill_page(buf + i * LEDGER_WORDS, 1, r, i);
        for (uint64_t i = 0; i < pages; i++)
            ledger_check_page(buf + i * LEDGER_WORDS, 1, r, i, &sum);
    }
    return sum;
}

#endif
