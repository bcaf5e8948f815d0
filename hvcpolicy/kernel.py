"""What the host kernel accepts: a pure model of KVM_SET_ONE_REG on the firmware registers.

Written from reference/kvm-arm64-firmware-registers.md ("Write rules", "PSCI_VERSION",
"SMCCC_ARCH_WORKAROUND_1/2/3"). A host is described by what KVM_GET_REG_LIST lists and what a fresh
PSCI-0.2 vCPU reads (a host snapshot): the PSCI_VERSION read is the newest version the kernel
implements, and each mitigation register reads the host's level.
"""

from __future__ import annotations

import re
from enum import Enum

from hvcpolicy import catalogue as cat
from hvcpolicy.catalogue import Kind
from hvcpolicy.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping


class Errno(Enum):
    ENOENT = "ENOENT"
    EINVAL = "EINVAL"
    EBUSY = "EBUSY"
    ENOEXEC = "ENOEXEC"


# Mitigation levels, WA1/WA3 and WA2.
WA_NOT_AVAIL = 0
WA_AVAIL = 1
WA_NOT_REQUIRED = 2
WA2_NOT_AVAIL = 0
WA2_UNKNOWN = 1
WA2_AVAIL = 2
WA2_NOT_REQUIRED = 3
WA2_ENABLED = 0x10
FEATURE_LEVEL_MASK = 0xF


def wa2_class(value: int) -> int:
    """The level an incoming WA2 value stands for: NOT_AVAIL (0/1) or NOT_REQUIRED (2/3)."""
    return WA2_NOT_AVAIL if value & FEATURE_LEVEL_MASK in (0, 1) else WA2_NOT_REQUIRED


def check_workaround(kind: Kind, value: int, host_level: int) -> Errno | None:
    """The kernel's verdict on writing a mitigation register (it stores nothing)."""
    if kind is Kind.WORKAROUND:
        if value & ~FEATURE_LEVEL_MASK or value > host_level:
            return Errno.EINVAL
        return None
    if value & ~(FEATURE_LEVEL_MASK | WA2_ENABLED):
        return Errno.EINVAL
    level = value & FEATURE_LEVEL_MASK
    if value & WA2_ENABLED and level != WA2_AVAIL:
        return Errno.EINVAL
    if level > WA2_NOT_REQUIRED:
        return Errno.EINVAL
    return Errno.EINVAL if host_level < wa2_class(level) else None


def psci_accepted(value: int, newest: int, psci_0_2: bool = True) -> bool:
    """Does a kernel whose newest PSCI is ``newest`` accept ``value`` on such a vCPU?"""
    if not psci_0_2:
        return value == cat.PSCI_0_1
    return value in cat.PSCI_VERSIONS_0_2_AND_LATER and value <= newest


def bitmap_mask(rid: int, host_value: int) -> int:
    """Supported mask of a bitmap on a host whose fresh VM reads ``host_value``.

    KVM resets STD_BMAP, STD_HYP_BMAP and VENDOR_HYP_BMAP to the very constant it checks writes
    against, so a host's fresh read *is* its mask: a kernel built without a service rejects its
    bit, and a newer kernel's extra bit is accepted. VENDOR_HYP_BMAP_2 resets to 0 below a mask
    of 0x3. For a bitmap the catalogue does not know, only the bits the host offers by default
    are known to be supported, so that is all the model vouches for.
    """
    reg = cat.REGISTERS.get(rid)
    if reg is not None and reg.mask is not None and reg.reset != reg.mask:
        return reg.mask | host_value
    return host_value


class Host(Record):
    """A host kernel as KVM shows it: listed register ids with a fresh PSCI-0.2 vCPU's reads."""

    __slots__ = ("registers",)

    def __init__(self, registers: Mapping[int, int]) -> None:
        self.registers = registers

    @property
    def psci_newest(self) -> int:
        return self.registers.get(cat.PSCI_VERSION, cat.PSCI_0_1)

    def check_set(
        self,
        rid: int,
        value: int,
        *,
        current: int | None = None,
        vm_has_run: bool = False,
        psci_0_2: bool = True,
        vcpu_initialized: bool = True,
    ) -> Errno | None:
        """The errno KVM_SET_ONE_REG returns, or None when it accepts.

        ``current`` is the VM's stored value (bitmaps); it defaults to the reset value.
        """
        if not vcpu_initialized:
            return Errno.ENOEXEC
        if rid not in self.registers:
            return Errno.ENOENT
        if not 0 <= value <= cat.U64_MAX:
            return Errno.EINVAL
        kind = cat.kind_of(rid)
        host_value = self.registers[rid]
        if kind is Kind.BITMAP or kind is Kind.UNKNOWN_BITMAP:
            if value & ~bitmap_mask(rid, host_value):
                return Errno.EINVAL
            stored = host_value if current is None else current
            if vm_has_run and value != stored:
                return Errno.EBUSY
            return None
        if kind is Kind.PSCI:
            return None if psci_accepted(value, self.psci_newest, psci_0_2) else Errno.EINVAL
        if kind is Kind.WORKAROUND or kind is Kind.WORKAROUND2:
            return check_workaround(kind, value, host_value)
        # A firmware register the catalogue does not know: only its own value is known to pass.
        return None if value == host_value else Errno.EINVAL

    def read_after_set(self, rid: int, written: int) -> int:
        """What GET_ONE_REG returns after an accepted write (mitigations are not stored)."""
        kind = cat.kind_of(rid)
        if kind is Kind.WORKAROUND or kind is Kind.WORKAROUND2:
            return self.registers[rid]
        return written


# --- what each kernel version lists (used to describe hosts we have no dump of) --------------


_VERSION = re.compile(r"([0-9]+)\.([0-9]+)")  # a prefix: the rest is the distribution's


def parse_version(release: str) -> tuple[int, int] | None:
    """``6.1.172-216.329.amzn2023.aarch64`` -> (6, 1)."""
    m = _VERSION.match(release)
    return (int(m[1]), int(m[2])) if m else None


def default_psci(version: tuple[int, int]) -> int:
    """Newest PSCI a kernel implements, which is what a fresh PSCI-0.2 vCPU reads."""
    if version >= (6, 13):
        return cat.PSCI_1_3
    if version >= (5, 18):
        return cat.PSCI_1_1
    return cat.PSCI_1_0


def registers_for(
    version: tuple[int, int], wa_levels: tuple[int, int, int] = (2, 0, 1)
) -> dict[int, int]:
    """The firmware registers a mainline kernel of ``version`` lists, with their fresh reads.

    ``wa_levels`` are the host's WA1/WA2/WA3 levels (a property of the CPU, not the kernel).
    Distribution kernels backport: prefer a probed snapshot wherever there is one.
    """
    regs: dict[int, int] = {cat.PSCI_VERSION: default_psci(version)}
    for reg in cat.REGISTERS.values():
        if reg.kind is Kind.PSCI or version < reg.first_kernel:
            continue
        if reg.kind is Kind.BITMAP:
            assert reg.reset is not None
            regs[reg.id] = reg.reset
    wa_ids = (cat.SMCCC_ARCH_WORKAROUND_1, cat.SMCCC_ARCH_WORKAROUND_2, cat.SMCCC_ARCH_WORKAROUND_3)
    for rid, level in zip(wa_ids, wa_levels, strict=True):
        if version >= cat.REGISTERS[rid].first_kernel:
            regs[rid] = level
    return dict(sorted(regs.items()))
