// hvcpolicy lab: the SMCCC probe guest. A bare-metal arm64 program that QEMU (-kernel, -accel
// kvm) boots as a Linux Image at EL1 with the MMU off. It makes the firmware calls whose answers
// hvcpolicy governs by HVC, on vCPU 0 and on vCPU 1 (brought up with PSCI CPU_ON), prints every
// result on the PL011 of QEMU's `virt` machine, resets the machine once with PSCI SYSTEM_RESET and
// makes the calls again, then powers off with SYSTEM_OFF. Assembled with ``--defsym HOLD=1``
// (probe-hold.bin) it stays up after its last line instead, so libvirt keeps the domain (and its
// live XML) until the VMM stops it: libvirt's qemu driver has no on_poweroff "preserve".
//
// Output, one line per call (lab/guest/enforce.py parses it):
//     hvcprobe pass=<1|2> cpu=<0|1> <CALL> <x0> <x1> <x2> <x3>      (hex, no leading zeros)
// plus "hvcprobe begin pass=N", "hvcprobe reset", "hvcprobe done" and "hvcprobe error <what>".
//
// Position independent (adr/ldr= only): QEMU chooses the load address from the header below.
// QEMU does not clear RAM on a reset, so a marker outside the image (MARKER, 16 MiB into RAM:
// below where QEMU puts the DTB for guests of 64 MiB and more, above the image) tells the
// second pass from the first. Assembled with binutils alone (no C preprocessor): lab/build.py.

        .equ UART,          0x09000000      // PL011 data register on virt
        .equ MARKER,        0x41000000      // virt RAM starts at 0x40000000
        .equ MAGIC,         0x68766370726f6265  // "hvcprobe"

        .equ PSCI_VERSION,      0x84000000
        .equ PSCI_CPU_OFF,      0x84000002
        .equ PSCI_CPU_ON,       0xc4000003
        .equ PSCI_AFFINITY,     0xc4000004
        .equ PSCI_SYSTEM_OFF,   0x84000008
        .equ PSCI_SYSTEM_RESET, 0x84000009
        .equ SMCCC_VERSION,     0x80000000
        .equ SMCCC_ARCH_FEAT,   0x80000001
        .equ ARCH_WA1,          0x80008000
        .equ ARCH_WA2,          0x80007fff
        .equ ARCH_WA3,          0x80003fff
        .equ TRNG_VERSION,      0x84000050
        .equ VENDOR_UID,        0x8600ff01
        .equ KVM_FEATURES,      0x86000000
        .equ KVM_PTP,           0x86000001
        .equ PV_TIME_FEATURES,  0xc5000020
        .equ PV_TIME_ST,        0xc5000021

        .text
        .globl _start
_start:                                 // arm64 Linux Image header (Documentation/arch/arm64/booting.rst)
        b       primary                 // code0
        .long   0                       // code1
        .quad   0x80000                 // text_offset
        .quad   _end - _start           // image_size (non-zero: text_offset is valid)
        .quad   0x2                     // flags: little endian, 4K pages
        .quad   0, 0, 0                 // reserved
        .ascii  "ARM\x64"               // magic
        .long   0                       // reserved

// One call: print its name, make it by HVC with x1 = ARG, print x0..x3.
        .macro  CALL name, fid, arg
        ldr     x0, =\fid
        ldr     x1, =\arg
        adr     x2, 9001f
        bl      call_one
        b       9002f
9001:   .asciz  "\name"
        .balign 4
9002:
        .endm

// x27 = pass (1 or 2), x28 = this CPU's number. Clobbers x0..x15.
calls:
        stp     x29, x30, [sp, #-16]!
        CALL    PSCI_VERSION, PSCI_VERSION, 0
        CALL    SMCCC_VERSION, SMCCC_VERSION, 0
        CALL    ARCH_FEATURES_WA1, SMCCC_ARCH_FEAT, ARCH_WA1
        CALL    ARCH_FEATURES_WA2, SMCCC_ARCH_FEAT, ARCH_WA2
        CALL    ARCH_FEATURES_WA3, SMCCC_ARCH_FEAT, ARCH_WA3
        CALL    TRNG_VERSION, TRNG_VERSION, 0
        CALL    VENDOR_HYP_CALL_UID, VENDOR_UID, 0
        CALL    KVM_FEATURES, KVM_FEATURES, 0
        CALL    KVM_PTP, KVM_PTP, 0
        CALL    PV_TIME_FEATURES, PV_TIME_FEATURES, PV_TIME_ST
        ldp     x29, x30, [sp], #16
        ret

primary:
        adr     x0, stack0_top
        mov     sp, x0
        mov     x28, #0
        ldr     x9, =MARKER
        ldr     x10, [x9]
        ldr     x11, =MAGIC
        mov     x27, #1
        cmp     x10, x11
        b.ne    1f
        mov     x27, #2
1:      str     x11, [x9]
        adr     x0, s_begin
        bl      puts
        mov     x0, x27
        bl      putdec
        bl      newline
        bl      calls

        // vCPU 1: PSCI CPU_ON (MPIDR 1 on virt), the pass as context id; wait for its flag.
        adr     x9, cpu1_flag
        str     xzr, [x9]
        ldr     x0, =PSCI_CPU_ON
        mov     x1, #1
        adr     x2, secondary
        mov     x3, x27
        hvc     #0
        mov     x19, x0
        cbnz    x19, 9f                 // print the result only once vCPU 1 is done printing
        // A bound in time (the generic timer: 60 s), so a lost vCPU ends the probe with an
        // error; vCPU 1 prints through MMIO exits, which are slow when KVM itself is nested.
        mrs     x20, cntfrq_el0
        mov     x10, #60
        mul     x20, x20, x10
        isb
        mrs     x10, cntvct_el0
        add     x20, x20, x10           // x20 = the deadline
        adr     x9, cpu1_flag
2:      ldr     x10, [x9]
        cbnz    x10, 4f
        isb
        mrs     x10, cntvct_el0
        cmp     x10, x20
        b.hs    error_cpu1
        b       2b
        // Wait until PSCI says vCPU 1 is off, so the reset finds it quiet.
4:      ldr     x0, =PSCI_AFFINITY
        mov     x1, #1
        mov     x2, #0
        hvc     #0
        cmp     x0, #1                  // 1 = OFF
        b.eq    9f
        isb
        mrs     x10, cntvct_el0
        cmp     x10, x20
        b.lo    4b
        b       error_cpu1
9:      adr     x0, s_cpuon
        bl      puts
        mov     x0, x19
        bl      puthex
        bl      newline
        cbnz    x19, error_cpuon
        cmp     x27, #1
        b.ne    6f
        adr     x0, s_reset
        bl      puts
        ldr     x0, =PSCI_SYSTEM_RESET
        hvc     #0
        adr     x0, s_err_reset
        b       error
6:      ldr     x9, =MARKER             // leave RAM as a fresh guest would find it
        str     xzr, [x9]
        adr     x0, s_done
        bl      puts
        .ifdef  HOLD                    // probe-hold.bin: stay up until the VMM stops the guest
10:     wfi
        b       10b
        .else
        ldr     x0, =PSCI_SYSTEM_OFF
        hvc     #0
        adr     x0, s_err_off
        b       error
        .endif

error_cpuon:
        adr     x0, s_err_cpuon
        b       error
error_cpu1:
        adr     x0, s_err_cpu1
error:
        bl      puts
7:      wfi
        b       7b

secondary:                              // entered by CPU_ON at EL1, MMU off, x0 = context id
        mov     x27, x0
        adr     x1, stack1_top
        mov     sp, x1
        mov     x28, #1
        bl      calls
        adr     x9, cpu1_flag
        mov     x10, #1
        str     x10, [x9]
        ldr     x0, =PSCI_CPU_OFF
        hvc     #0
8:      wfi                             // CPU_OFF does not return
        b       8b

// call_one: x0 = function id, x1 = argument, x2 = name. Prints one result line.
call_one:
        stp     x29, x30, [sp, #-16]!
        stp     x19, x20, [sp, #-16]!
        stp     x21, x22, [sp, #-16]!
        stp     x23, x24, [sp, #-16]!
        mov     x19, x0
        mov     x20, x1
        mov     x21, x2
        adr     x0, s_pass
        bl      puts
        mov     x0, x27
        bl      putdec
        adr     x0, s_cpu
        bl      puts
        mov     x0, x28
        bl      putdec
        bl      space
        mov     x0, x21
        bl      puts
        mov     x0, x19
        mov     x1, x20
        mov     x2, #0
        mov     x3, #0
        hvc     #0
        mov     x19, x0
        mov     x20, x1
        mov     x21, x2
        mov     x22, x3
        bl      space
        mov     x0, x19
        bl      puthex
        bl      space
        mov     x0, x20
        bl      puthex
        bl      space
        mov     x0, x21
        bl      puthex
        bl      space
        mov     x0, x22
        bl      puthex
        bl      newline
        ldp     x23, x24, [sp], #16
        ldp     x21, x22, [sp], #16
        ldp     x19, x20, [sp], #16
        ldp     x29, x30, [sp], #16
        ret

// putc: w0 = character. Clobbers x9. QEMU's PL011 takes every write at once (its flag
// register never says "full"), and each MMIO access is an exit to QEMU, slow when KVM itself
// is nested: so no polling of UARTFR.
putc:
        ldr     x9, =UART
        strb    w0, [x9]
        ret

// puts: x0 = NUL-terminated string. Clobbers x0, x9..x12.
puts:
        mov     x12, x30
        mov     x11, x0
1:      ldrb    w0, [x11], #1
        cbz     w0, 2f
        bl      putc
        b       1b
2:      mov     x30, x12
        ret

// puthex: x0 in hex without leading zeros (fewer MMIO exits). Clobbers x0, x9..x14.
puthex:
        mov     x12, x30
        mov     x11, x0
        mov     x13, #60
        mov     x14, #0                 // 1 once a digit was printed
1:      lsr     x0, x11, x13
        and     x0, x0, #0xf
        orr     x14, x14, x0
        cbnz    x14, 2f
        cbnz    x13, 4f                 // a leading zero (the last digit always prints)
2:      cmp     x0, #10
        b.lo    3f
        add     x0, x0, #('a' - '0' - 10)
3:      add     x0, x0, #'0'
        bl      putc
        mov     x14, #1
4:      subs    x13, x13, #4
        b.pl    1b
        mov     x30, x12
        ret

// putdec: x0 = 0..9, one digit.
putdec:
        add     x0, x0, #'0'
        b       putc

space:
        mov     x0, #' '
        b       putc

newline:
        mov     x0, #'\n'
        b       putc

        .ltorg
s_begin:        .asciz "hvcprobe begin pass="
s_pass:         .asciz "hvcprobe pass="
s_cpu:          .asciz " cpu="
s_cpuon:        .asciz "hvcprobe cpu_on "
s_reset:        .asciz "hvcprobe reset\n"
s_done:         .asciz "hvcprobe done\n"
s_err_cpuon:    .asciz "hvcprobe error cpu_on\n"
s_err_cpu1:     .asciz "hvcprobe error cpu1\n"
s_err_reset:    .asciz "hvcprobe error system_reset returned\n"
s_err_off:      .asciz "hvcprobe error system_off returned\n"

        .balign 16
cpu1_flag:      .quad 0
        .balign 16
        .space  4096
stack0_top:
        .space  4096
stack1_top:
_end:
