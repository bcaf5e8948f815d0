"""Kernel profiles: which firmware pseudo-registers a host kernel lists, and what it accepts.

Written from ``reference/kvm-arm64-firmware-registers.md`` and the host dumps in
``fixtures/hosts`` -- deliberately not from :mod:`hvcpolicy.kernel`, so that the simulator is an
independent second reading of the kernel's rules that the planner can be tested against.

A profile is derived from the kernel's ``major.minor`` by the breakpoints below (each the first
kernel that has the behaviour). So any release at or above 4.14 gets the profile of the nearest
lower breakpoint, which is exact for every version the reference describes:

===========  ===============================================================================
from         change
===========  ===============================================================================
4.14         PSCI_VERSION (mainline 4.16; the 4.14 fixtures have it, backported), PSCI 1.0
5.3          SMCCC_ARCH_WORKAROUND_1 and _2
5.10         SMCCC_ARCH_WORKAROUND_3 (mainline 5.17, "backported widely"; the 5.10 fixtures list it)
5.18         newest PSCI 1.1
5.19         STD_BMAP, STD_HYP_BMAP, VENDOR_HYP_BMAP
6.13         newest PSCI 1.3 (1.2 accepted too)
6.15         VENDOR_HYP_BMAP_2
===========  ===============================================================================

Releases newer than the newest breakpoint (7.x: Debian trixie-backports ships 7.3) are modelled
with 6.18's register set: the reference names nothing newer. Releases older than 4.14, or text
that does not start with ``MAJOR.MINOR``, are an error (:class:`~hvcpolicy.errors.InvalidInput`).

The mitigation levels (WA1/WA2/WA3) depend on the CPU, not the kernel; the default is what every
fixture host reports (2, 0, 1) and :func:`profile_for` takes other levels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hvcpolicy.catalogue import (
    PSCI_VERSION,
    SMCCC_ARCH_WORKAROUND_1,
    SMCCC_ARCH_WORKAROUND_2,
    SMCCC_ARCH_WORKAROUND_3,
    STD_BMAP,
    STD_HYP_BMAP,
    VENDOR_HYP_BMAP,
    VENDOR_HYP_BMAP_2,
)
from hvcpolicy.errors import InvalidInput, bounded

# PSCI versions as KVM encodes them: (major << 16) | minor.
PSCI_0_1 = 0x1
PSCI_0_2 = 0x2
PSCI_1_0 = 0x10000
PSCI_1_1 = 0x10001
PSCI_1_2 = 0x10002
PSCI_1_3 = 0x10003

# Bitmap registers: (reset value on a fresh VM, supported mask), from the reference's table.
BITMAPS: dict[int, tuple[int, int]] = {
    STD_BMAP: (0x1, 0x1),
    STD_HYP_BMAP: (0x1, 0x1),
    VENDOR_HYP_BMAP: (0x3, 0x3),
    VENDOR_HYP_BMAP_2: (0x0, 0x3),  # reset is 0, not the mask
}
WORKAROUNDS = (SMCCC_ARCH_WORKAROUND_1, SMCCC_ARCH_WORKAROUND_2, SMCCC_ARCH_WORKAROUND_3)

# The fixtures' levels: WA1 NOT_REQUIRED (2), WA2 NOT_AVAIL (0), WA3 AVAIL (1).
DEFAULT_WA_LEVELS: dict[int, int] = {
    SMCCC_ARCH_WORKAROUND_1: 2,
    SMCCC_ARCH_WORKAROUND_2: 0,
    SMCCC_ARCH_WORKAROUND_3: 1,
}

# First kernel that lists each register.
_FIRST_KERNEL: dict[int, tuple[int, int]] = {
    PSCI_VERSION: (4, 14),
    SMCCC_ARCH_WORKAROUND_1: (5, 3),
    SMCCC_ARCH_WORKAROUND_2: (5, 3),
    SMCCC_ARCH_WORKAROUND_3: (5, 10),
    STD_BMAP: (5, 19),
    STD_HYP_BMAP: (5, 19),
    VENDOR_HYP_BMAP: (5, 19),
    VENDOR_HYP_BMAP_2: (6, 15),
}
# Newest PSCI version implemented, by first kernel.
_PSCI_NEWEST: tuple[tuple[tuple[int, int], int], ...] = (
    ((6, 13), PSCI_1_3),
    ((5, 18), PSCI_1_1),
    ((4, 14), PSCI_1_0),
)
_PSCI_ORDER = (PSCI_0_2, PSCI_1_0, PSCI_1_1, PSCI_1_2, PSCI_1_3)

OLDEST = (4, 14)
# Named profiles: the kernels the tests and the lab cover (fixtures, Debian, and 7.x).
PROFILE_NAMES = ("4.14", "5.10", "6.1", "6.12", "6.18", "7.3")

_RELEASE = re.compile(r"^([0-9]{1,3})(?:\.([0-9]{1,3}))?(?:$|[.\-+~_ ])")


@dataclass(frozen=True)
class KernelProfile:
    """What one kernel lists and accepts. ``registers`` is in KVM_GET_REG_LIST order."""

    name: str  # "6.18": the major.minor the rules were chosen by
    release: str  # what was asked for, e.g. "6.18.30-61.116.amzn2023.aarch64"
    version: tuple[int, int]
    registers: tuple[int, ...]
    psci_newest: int
    psci_accepted: tuple[int, ...]  # for a vCPU with the PSCI 0.2 feature
    wa_levels: dict[int, int] = field(default_factory=dict)  # listed mitigation registers only

    def lists(self, rid: int) -> bool:
        return rid in self.registers

    def fresh_values(self, psci_0_2: bool = True) -> dict[int, int]:
        """Every listed register's value on a fresh VM, in list order."""
        values: dict[int, int] = {}
        for rid in self.registers:
            if rid == PSCI_VERSION:
                values[rid] = self.psci_newest if psci_0_2 else PSCI_0_1
            elif rid in BITMAPS:
                values[rid] = BITMAPS[rid][0]
            else:
                values[rid] = self.wa_levels[rid]
        return values


def parse_release(release: str) -> tuple[int, int]:
    """``"6.18.30-61.116.amzn2023.aarch64"`` -> (6, 18); ``"7"`` -> (7, 0)."""
    m = _RELEASE.match(release.strip()) if isinstance(release, str) else None
    if m is None:
        raise InvalidInput(
            f"kernel {bounded(str(release))!r}: expected a release such as 6.1 or 6.1.0-18-arm64"
        )
    return int(m.group(1)), int(m.group(2) or 0)


def profile_for(
    kernel_release: str,
    wa_levels: dict[int, int] | None = None,
) -> KernelProfile:
    """The profile of a kernel release (see the module docstring for how versions map).

    ``wa_levels`` overrides the mitigation levels (keys: WORKAROUND register ids; WA1/WA3 take
    0..2, WA2 0..3 -- current kernels report only 0 or 3).
    """
    version = parse_release(kernel_release)
    if version < OLDEST:
        raise InvalidInput(
            f"kernel {bounded(kernel_release)!r}: older than the oldest modelled kernel "
            f"({OLDEST[0]}.{OLDEST[1]})"
        )
    registers = tuple(sorted(r for r, first in _FIRST_KERNEL.items() if version >= first))
    newest = next(v for first, v in _PSCI_NEWEST if version >= first)
    accepted = tuple(v for v in _PSCI_ORDER if v <= newest)
    levels = dict(DEFAULT_WA_LEVELS)
    for rid, level in (wa_levels or {}).items():
        if rid not in levels:
            raise InvalidInput(f"mitigation level for 0x{rid:016x}: not a workaround register")
        top = 3 if rid == SMCCC_ARCH_WORKAROUND_2 else 2
        if not 0 <= level <= top:
            raise InvalidInput(f"mitigation level {level} for 0x{rid:016x}: expected 0..{top}")
        levels[rid] = level
    return KernelProfile(
        name=f"{version[0]}.{version[1]}",
        release=kernel_release,
        version=version,
        registers=registers,
        psci_newest=newest,
        psci_accepted=accepted,
        wa_levels={r: lv for r, lv in levels.items() if r in registers},
    )
