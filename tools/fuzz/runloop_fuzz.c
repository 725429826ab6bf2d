/* libFuzzer harness for the vCPU run loop's exit decoding (migrate/kvm/runloop.c): KVM_RUN
 * is replaced by a fake that fills the kvm_run area with exits made from the input (port
 * and MMIO exits of any size, count and data offset, the console and null-port fast
 * paths, errors and interruptions). The kvm_run area is a heap block of the size the
 * kernel would map, so ASan sees any access past it. The harness then does what
 * migrate/kvm/vcpu.py does with each exit: reads the data out, completes port and MMIO
 * reads, drains the console. */
#define ioctl fake_ioctl
#include "runloop.c"
#undef ioctl

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#define RUN_SIZE (3 * 4096)             /* KVM_GET_VCPU_MMAP_SIZE on the project's hosts */
#define CONSOLE_PORT 0xE9

#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "runloop_fuzz: check failed: %s (line %d)\n", \
                                                #cond, __LINE__); abort(); } } while (0)

struct input { const uint8_t *p; size_t n; };
static struct input in;
static struct kvm_run *run;
static struct hvm_runner runner;

static uint64_t take(int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes && in.n; i++, in.n--)
        v |= (uint64_t)*in.p++ << (8 * i);
    return v;
}

int fake_ioctl(int fd, unsigned long request, ...)
{
    (void)fd;
    CHECK(request == KVM_RUN);
    if (!in.n) {
        errno = EIO;
        return -1;
    }
    uint8_t b = (uint8_t)take(1);
    if ((b & 0x0F) == 0x0F) {           /* interrupted: by a kick, or not */
        if (b & 0x10)
            runner.stop = 1;
        errno = b & 0x20 ? EAGAIN : EINTR;
        return -1;
    }
    static const uint32_t reasons[] = { KVM_EXIT_IO, KVM_EXIT_IO, KVM_EXIT_IO, KVM_EXIT_MMIO, KVM_EXIT_HLT,
                                        KVM_EXIT_SHUTDOWN, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_INTERNAL_ERROR,
                                        KVM_EXIT_SYSTEM_EVENT };
    uint8_t which = (uint8_t)take(1);
    run->exit_reason = which < 9 * 28 ? reasons[which % 9] : (uint32_t)take(4);
    if (run->exit_reason == KVM_EXIT_IO) {
        static const uint16_t ports[] = { CONSOLE_PORT, HVM_NULL_PORT, 0x3F8, 0x80 };
        uint8_t f = (uint8_t)take(1);
        run->io.direction = f & 0x80 ? (uint8_t)take(1) : (f & 1 ? KVM_EXIT_IO_OUT : KVM_EXIT_IO_IN);
        run->io.size = f & 0x40 ? (uint8_t)take(1) : (uint8_t)(1u << ((f >> 1) % 3));
        run->io.port = f & 0x20 ? (uint16_t)take(2) : ports[(f >> 3) & 3];
        run->io.count = f & 0x10 ? (uint32_t)take(4) : (uint32_t)(1 + take(1) % 64);
        run->io.data_offset = f & 0x08 && f & 0x04 ? take(8) : 4096;
        uint64_t n = (uint64_t)run->io.size * run->io.count, at = run->io.data_offset;
        if (at >= sizeof(*run) && at <= RUN_SIZE && n <= RUN_SIZE - at)     /* the data, where it fits */
            for (uint64_t i = 0; i < n && in.n; i++)
                ((uint8_t *)run)[at + i] = (uint8_t)take(1);
    } else if (run->exit_reason == KVM_EXIT_MMIO) {
        run->mmio.phys_addr = take(8);
        run->mmio.len = (uint8_t)take(1) & 0x80 ? (uint32_t)take(4) : (uint32_t)(1u << (take(1) % 4));
        run->mmio.is_write = (uint8_t)take(1) & 1;
        for (int i = 0; i < 8; i++)
            run->mmio.data[i] = (uint8_t)take(1);
    } else {
        run->fail_entry.hardware_entry_failure_reason = take(8);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    in.p = data;
    in.n = size;
    run = calloc(1, RUN_SIZE);
    CHECK(hvm_runner_init(&runner, 3, run, RUN_SIZE, CONSOLE_PORT) == 0);
    for (int exits = 0; exits < 256; exits++) {
        int rc = hvm_run(&runner);
        if (rc < 0)
            break;
        if (rc == HVM_STOPPED) {
            runner.stop = 0;
            continue;
        }
        if (rc == HVM_CONSOLE) {
            CHECK(runner.console_len <= sizeof(runner.console));
            runner.console_len = 0;
            continue;
        }
        CHECK(rc == HVM_EXIT);
        struct hvm_exit *e = &runner.exit;
        CHECK(e->reason == run->exit_reason);
        if (e->reason == KVM_EXIT_IO) {
            CHECK(runner.io_len <= sizeof(runner.io_data));
            CHECK(e->port != CONSOLE_PORT || e->direction != KVM_EXIT_IO_OUT || e->size != 1);
            if (e->direction == KVM_EXIT_IO_IN) {
                uint8_t reply[64];
                uint32_t len = (uint32_t)take(1) % sizeof(reply);
                for (uint32_t i = 0; i < len; i++)
                    reply[i] = (uint8_t)take(1);
                hvm_complete_io_in(&runner, reply, len);
            }
        } else if (e->reason == KVM_EXIT_MMIO) {
            CHECK(e->size <= 8);
            if (!e->direction) {
                uint8_t reply[8] = { 0 };
                hvm_complete_mmio_read(&runner, reply, (uint32_t)take(1) % 12);
            }
        }
    }
    hvm_runner_destroy(&runner);
    free(run);
    return 0;
}
