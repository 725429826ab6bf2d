"""cffi build of migrate.guest._check: host-side checks of guest memory,
compiled from the very header the guest image uses (src/ledger_pattern.h)."""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef("""
int64_t hvm_ledger_verify(const uint8_t *region, uint64_t size, uint64_t *sum_out);
uint64_t hvm_ledger_sum(uint64_t seed, uint64_t gen, uint64_t npages);
uint64_t ledger_bench(uint64_t *buf, uint64_t pages, uint64_t rounds);
""")
ffibuilder.set_source("migrate.guest._check", r"""
#include "ledger_pattern.h"

/* Check a paused ledger guest's region (header page + data pages).
 * Returns -1 when every page holds what the header says it should, -2 when
 * the header is bad, else the first bad page.  *sum_out gets the sum of the
 * generation the pages hold when the guest is between passes or verifying. */
int64_t hvm_ledger_verify(const uint8_t *region, uint64_t size, uint64_t *sum_out)
{
    const struct ledger_header *h = (const void *)region;
    const uint64_t *data = (const uint64_t *)(region + 4096);
    uint64_t sum = 0, junk = 0;
    if (size < 4096 || h->magic != LEDGER_MAGIC || h->npages > size / 4096 - 1
        || h->phase > 1 || h->cursor > h->npages
        || (h->phase == 1 && h->target != h->gen && h->target != h->gen + 1))
        return -2;
    for (uint64_t i = 0; i < h->npages; i++) {
        const uint64_t *p = data + i * LEDGER_WORDS;
        if (h->phase == 1 && i < h->cursor) {
            if (ledger_check_page(p, h->seed, h->target, i, &junk) >= 0)
                return (int64_t)i;
        } else if (h->phase == 1 && i == h->cursor) {
            /* being rewritten: each word holds gen or target */
            uint64_t a = ledger_page_seed(h->seed, h->gen, i);
            uint64_t b = ledger_page_seed(h->seed, h->target, i);
            for (int j = 0; j < LEDGER_WORDS; j++) {
                a = ledger_next(a);
                b = ledger_next(b);
                if (p[j] != a && p[j] != b)
                    return (int64_t)i;
            }
        } else if (ledger_check_page(p, h->seed, h->gen, i, &sum) >= 0) {
            return (int64_t)i;
        }
    }
    *sum_out = sum;
    return -1;
}

uint64_t hvm_ledger_sum(uint64_t seed, uint64_t gen, uint64_t npages)
{
    static uint64_t page[LEDGER_WORDS];
    uint64_t sum = 0;
    for (uint64_t i = 0; i < npages; i++) {
        ledger_fill_page(page, seed, gen, i);
        ledger_check_page(page, seed, gen, i, &sum);
    }
    return sum;
}
""", include_dirs=[str(HERE / "src")], extra_compile_args=["-O2"])
