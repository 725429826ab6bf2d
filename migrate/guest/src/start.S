/* Entry and interrupt stubs.  The host enters every vCPU at _start in 64-bit
 * mode with paging on (specs/guest-boot.md, "Entry state"); RDI = boot-info
 * address.  A vCPU takes its index from its LAPIC id, picks its own kernel
 * stack, and calls kmain(boot_info, index). */
#include "smp.h"
    .section .text.start, "ax"
    .globl _start
_start:
    mov     $LAPIC_ID_REG, %eax
    mov     (%rax), %eax
    shr     $24, %eax
    cmp     $MAX_CPUS, %eax
    jae     2f
    mov     %eax, %esi
    lea     kernel_stack+BSP_KSTACK(%rip), %rsp
#if MAX_CPUS > 1
    test    %eax, %eax
    jz      3f
    lea     ap_kernel_stacks(%rip), %rsp        /* vCPU k >= 1: the top of stack k - 1 */
    imul    $AP_KSTACK, %rax, %rax
    add     %rax, %rsp
#endif
3:  xor     %ebp, %ebp
    call    kmain
1:  cli
    hlt
    jmp     1b
2:  mov     $STATUS_BAD_CPU, %eax               /* more vCPUs than this image was built for */
    outl    %eax, $0xF4
    cli
    hlt
    jmp     2b

/* Each stub pushes a vector number (and a zero error code where the CPU
 * pushes none), saves the general registers, calls trap(frame). */
.macro STUB vec, has_err
    .globl  isr\vec
isr\vec:
    .if \has_err == 0
    push    $0
    .endif
    push    $\vec
    jmp     isr_common
.endm

    .text
isr_common:
    push    %rax
    push    %rbx
    push    %rcx
    push    %rdx
    push    %rsi
    push    %rdi
    push    %rbp
    push    %r8
    push    %r9
    push    %r10
    push    %r11
    push    %r12
    push    %r13
    push    %r14
    push    %r15
    mov     %rsp, %rdi
    cld
    call    trap
    pop     %r15
    pop     %r14
    pop     %r13
    pop     %r12
    pop     %r11
    pop     %r10
    pop     %r9
    pop     %r8
    pop     %rbp
    pop     %rdi
    pop     %rsi
    pop     %rdx
    pop     %rcx
    pop     %rbx
    pop     %rax
    add     $16, %rsp
    iretq

    STUB 0, 0
    STUB 1, 0
    STUB 2, 0
    STUB 3, 0
    STUB 4, 0
    STUB 5, 0
    STUB 6, 0
    STUB 7, 0
    STUB 8, 1
    STUB 9, 0
    STUB 10, 1
    STUB 11, 1
    STUB 12, 1
    STUB 13, 1
    STUB 14, 1
    STUB 15, 0
    STUB 16, 0
    STUB 17, 1
    STUB 18, 0
    STUB 19, 0
    STUB 20, 0
    STUB 32, 0
    STUB 36, 0
    STUB 37, 0
    STUB 38, 0
    STUB 40, 0
    STUB 41, 0
    STUB 255, 0

    .section .rodata
    .globl  isr_table
isr_table:
    .quad isr0, isr1, isr2, isr3, isr4, isr5, isr6, isr7
    .quad isr8, isr9, isr10, isr11, isr12, isr13, isr14, isr15
    .quad isr16, isr17, isr18, isr19, isr20

/* Enter ring 3: enter_user(entry, stack, arg). */
    .text
    .globl  enter_user
enter_user:
    mov     %rdx, %rax
    pushq   $0x1b               /* SS: user data, RPL 3 */
    pushq   %rsi                /* RSP */
    pushq   $0x3202             /* RFLAGS: IF, IOPL 3 */
    pushq   $0x23               /* CS: user code, RPL 3 */
    pushq   %rdi                /* RIP */
    mov     %rax, %rdi
    xor     %eax, %eax
    mov     $0x1b, %ax
    mov     %ax, %ds
    mov     %ax, %es
    iretq

    .section .note.GNU-stack, "", @progbits
