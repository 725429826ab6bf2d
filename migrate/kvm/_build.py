"""cffi (API mode) build of migrate.kvm._kvm.

The kernel's own <linux/kvm.h> is compiled in, so every struct layout and
every ioctl number comes from the header: the declarations below name the
fields we use and end in "...;" so the compiler checks them.
"""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = r"""
typedef unsigned long long __u64;
typedef long long __s64;
/* ioctl numbers: values come from <linux/kvm.h> at build time */
static const unsigned long KVM_GET_API_VERSION, KVM_CREATE_VM, KVM_CHECK_EXTENSION,
    KVM_GET_VCPU_MMAP_SIZE, KVM_GET_SUPPORTED_CPUID, KVM_GET_MSR_INDEX_LIST,
    KVM_CREATE_VCPU, KVM_SET_USER_MEMORY_REGION, KVM_SET_TSS_ADDR,
KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2, KVM_IRQ_LINE,
    KVM_GET_IRQCHIP, KVM_SET_IRQCHIP, KVM_GET_PIT2, KVM_SET_PIT2,
    KVM_GET_CLOCK, KVM_SET_CLOCK, KVM_GET_DIRTY_LOG,
    KVM_GET_REGS, KVM_SET_REGS, KVM_GET_SREGS, KVM_SET_SREGS,
    KVM_GET_XSAVE, KVM_SET_XSAVE,
    KVM_GET_XCRS, KVM_SET_XCRS, KVM_GET_MSRS, KVM_SET_MSRS,
    KVM_GET_LAPIC, KVM_SET_LAPIC, KVM_GET_VCPU_EVENTS, KVM_SET_VCPU_EVENTS,
    KVM_GET_MP_STATE, KVM_SET_MP_STATE, KVM_GET_DEBUGREGS, KVM_SET_DEBUGREGS,
    KVM_SET_CPUID2, KVM_GET_TSC_KHZ, KVM_SET_TSC_KHZ, KVM_GET_MSR_FEATURE_INDEX_LIST,
    KVM_GET_SREGS2, KVM_SET_SREGS2, KVM_CLEAR_DIRTY_LOG, KVM_ENABLE_CAP;

static const int KVM_CAP_IRQCHIP, KVM_CAP_PIT2, KVM_CAP_XSAVE, KVM_CAP_XCRS,
    KVM_CAP_VCPU_EVENTS, KVM_CAP_DEBUGREGS, KVM_CAP_ADJUST_CLOCK,
    KVM_CAP_IMMEDIATE_EXIT, KVM_CAP_NR_MEMSLOTS, KVM_CAP_USER_MEMORY,
    KVM_CAP_SET_TSS_ADDR, KVM_CAP_EXT_CPUID, KVM_CAP_GET_TSC_KHZ,
    KVM_CAP_MP_STATE, KVM_CAP_IRQ_ROUTING, KVM_CAP_TSC_CONTROL, KVM_CAP_GET_MSR_FEATURES,
    KVM_CAP_SREGS2, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;

static const int KVM_MEM_LOG_DIRTY_PAGES, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_PIT_SPEAKER_DUMMY,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC,
    KVM_EXIT_IO, KVM_EXIT_MMIO, KVM_EXIT_HLT, KVM_EXIT_SHUTDOWN,
    KVM_EXIT_FAIL_ENTRY, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_SYSTEM_EVENT,
    KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_SREGS2_FLAGS_PDPTRS_VALID;

struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags; __u64 guest_phys_addr;
    __u64 memory_size; __u64 userspace_addr; ...;
};
struct kvm_regs {
    __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11, r12, r13, r14, r15;
    __u64 rip, rflags; ...;
};
struct kvm_segment {
    __u64 base; uint32_t limit; uint16_t selector; uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl; uint8_t unusable; uint8_t padding; ...;
};
struct kvm_dtable { __u64 base; uint16_t limit; uint16_t padding[3]; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    __u64 interrupt_bitmap[4]; ...;
};
struct kvm_sregs2 {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    __u64 flags; __u64 pdptrs[4]; ...;
};
struct kvm_xsave { uint32_t region[1024]; ...; };
struct kvm_xcr { uint32_t xcr; uint32_t reserved; __u64 value; ...; };
struct kvm_xcrs { uint32_t nr_xcrs; uint32_t flags; struct kvm_xcr xcrs[16]; __u64 padding[16]; ...; };
struct kvm_msr_entry { uint32_t index; uint32_t reserved; __u64 data; ...; };
struct kvm_msrs { uint32_t nmsrs; uint32_t pad; struct kvm_msr_entry entries[]; ...; };
struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; ...; };
struct kvm_lapic_state { char regs[1024]; ...; };
struct kvm_vcpu_events {
    struct { uint8_t injected; uint8_t nr; uint8_t has_error_code; uint8_t pending; uint32_t error_code; } exception;
    struct { uint8_t injected; uint8_t nr; uint8_t soft; uint8_t shadow; } interrupt;
    struct { uint8_t injected; uint8_t pending; uint8_t masked; uint8_t pad; } nmi;
    uint32_t sipi_vector; uint32_t flags;
    struct { uint8_t smm; uint8_t pending; uint8_t smm_inside_nmi; uint8_t latched_init; } smi;
    struct { uint8_t pending; } triple_fault;
    uint8_t reserved[26]; uint8_t exception_has_payload; __u64 exception_payload; ...;
};
struct kvm_mp_state { uint32_t mp_state; ...; };
struct kvm_debugregs { __u64 db[4]; __u64 dr6; __u64 dr7; __u64 flags; __u64 reserved[9]; ...; };
struct kvm_pic_state {
    uint8_t last_irr, irr, imr, isr, priority_add, irq_base, read_reg_select, poll,
        special_mask, init_state, auto_eoi, rotate_on_auto_eoi,
        special_fully_nested_mode, init4, elcr, elcr_mask; ...;
};
struct kvm_ioapic_state { __u64 base_address; uint32_t ioregsel; uint32_t id; uint32_t irr; uint32_t pad; ...; };
struct kvm_irqchip { uint32_t chip_id; uint32_t pad; ...; };
struct kvm_pit_channel_state {
    uint32_t count; uint16_t latched_count; uint8_t count_latched; uint8_t status_latched;
    uint8_t status; uint8_t read_state; uint8_t write_state; uint8_t write_latch;
    uint8_t rw_mode; uint8_t mode; uint8_t bcd; uint8_t gate; __s64 count_load_time; ...;
};
struct kvm_pit_state2 { struct kvm_pit_channel_state channels[3]; uint32_t flags; uint32_t reserved[9]; ...; };
struct kvm_pit_config { uint32_t flags; uint32_t pad[15]; ...; };
struct kvm_clock_data { __u64 clock; uint32_t flags; uint32_t pad0; __u64 realtime; __u64 host_tsc; uint32_t pad[4]; ...; };
struct kvm_irq_level { uint32_t irq; uint32_t level; ...; };
struct kvm_dirty_log { uint32_t slot; uint32_t padding1; void *dirty_bitmap; ...; };
struct kvm_clear_dirty_log { uint32_t slot; uint32_t num_pages; __u64 first_page; void *dirty_bitmap; ...; };
struct kvm_enable_cap { uint32_t cap; uint32_t flags; __u64 args[4]; ...; };
struct kvm_cpuid_entry2 { uint32_t function, index, flags, eax, ebx, ecx, edx; uint32_t padding[3]; ...; };
struct kvm_cpuid2 { uint32_t nent; uint32_t padding; struct kvm_cpuid_entry2 entries[]; ...; };
struct kvm_run { uint8_t request_interrupt_window; uint8_t immediate_exit; uint32_t exit_reason; ...; };

/* the irqchip payload and the IOAPIC redirection table sit in anonymous
   unions: their offsets, computed by the compiler */
static const int HVM_IRQCHIP_CHIP_OFFSET, HVM_IOAPIC_REDIRTBL_OFFSET, HVM_IOAPIC_NUM_PINS;

int ioctl(int fd, unsigned long request, ...);

#define HVM_STOPPED 0
#define HVM_CONSOLE 1
#define HVM_EXIT 2
struct hvm_exit {
    uint32_t reason; uint8_t direction; uint8_t size; uint16_t port; uint32_t count;
    uint64_t address; uint8_t data[8]; uint64_t hw_reason;
};
struct hvm_runner {
    struct hvm_exit exit;
    uint32_t console_len;
    uint8_t console[4096];
    uint32_t io_len;
    uint8_t io_data[4096];
    uint64_t exits;
    ...;
};
int hvm_init_signals(void);
int hvm_runner_init(struct hvm_runner *r, int vcpu_fd, struct kvm_run *run, uint32_t run_size,
                    uint16_t console_port);
void hvm_runner_destroy(struct hvm_runner *r);
void hvm_kick(struct hvm_runner *r);
void hvm_unkick(struct hvm_runner *r);
int hvm_run(struct hvm_runner *r);
void hvm_complete_io_in(struct hvm_runner *r, const uint8_t *data, uint32_t len);
void hvm_complete_mmio_read(struct hvm_runner *r, const uint8_t *data, uint32_t len);
size_t hvm_bitmap_pfns(const uint64_t *bitmap, size_t nwords, uint64_t base, uint64_t *out);
size_t hvm_pfns_bitmap(const uint64_t *pfns, size_t n, uint64_t base, uint64_t *bitmap, size_t nwords);
size_t hvm_bitmap_or(uint64_t *into, const uint64_t *from, size_t nwords);

#define HVM_CAP_ZERO ...
struct hvm_cap_step {
    int32_t fd; uint32_t size; unsigned long request; int32_t expect_rc;
    uint32_t type; uint32_t vm; uint32_t vcpu_id;
    uint32_t prefill_len; const uint8_t *prefill; uint32_t nseg; const uint32_t *seg;
};
long hvm_capture(const struct hvm_cap_step *steps, uint32_t n, uint8_t *scratch,
                 uint32_t scratch_len, uint8_t *out, uint64_t cap, uint32_t *lens,
                 uint32_t *failed);
struct hvm_apply_step {
    int32_t fd; uint32_t size; unsigned long request; unsigned long get_request;
    uint32_t prefill_len; const uint8_t *prefill; const uint8_t *body; uint32_t body_len;
    uint32_t nseg; const uint32_t *seg; int32_t expect; int32_t result;
};
int hvm_apply(struct hvm_apply_step *steps, uint32_t n, uint8_t *scratch,
              uint32_t scratch_len, uint32_t *failed);
"""

SOURCE = r"""
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
static const int HVM_IRQCHIP_CHIP_OFFSET = offsetof(struct kvm_irqchip, chip);
static const int HVM_IOAPIC_REDIRTBL_OFFSET = offsetof(struct kvm_ioapic_state, redirtbl);
static const int HVM_IOAPIC_NUM_PINS = KVM_IOAPIC_NUM_PINS;
""" + (HERE / "runloop.c").read_text() + (HERE / "capture.c").read_text()

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "migrate.kvm._kvm",
    SOURCE,
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent.parent), verbose=False)
