"""The kernel model against the kernel selftests' assertions and the lab's measured answers
(reference/kvm-arm64-firmware-registers.md, reference/arm64-kvm-lab.md)."""

from __future__ import annotations

import json

import pytest

from hvcpolicy import catalogue as cat
from hvcpolicy.kernel import Errno, Host, default_psci, registers_for, wa2_class
from tests.conftest import FIXTURE_HOSTS

BITMAPS = [r for r in cat.REGISTERS.values() if r.kind is cat.Kind.BITMAP]


def fixture_hosts() -> list[tuple[str, dict[int, int]]]:
    out = []
    for path in sorted(FIXTURE_HOSTS.glob("*.json")):
        doc = json.loads(path.read_text())
        out.append((path.stem, {int(k, 16): int(v, 16) for k, v in doc["registers"].items()}))
    return out


HOSTS = fixture_hosts() + [
    (f"mainline-{v[0]}.{v[1]}", registers_for(v)) for v in [(5, 19), (6, 1), (6, 12), (6, 18)]
]


def test_fixtures_are_there() -> None:
    assert len(fixture_hosts()) == 8


@pytest.mark.parametrize(("name", "regs"), HOSTS, ids=[h[0] for h in HOSTS])
def test_selftest_bitmaps_before_run(name: str, regs: dict[int, int]) -> None:
    host = Host(regs)
    for reg in BITMAPS:
        if reg.id not in regs:
            assert host.check_set(reg.id, 0) is Errno.ENOENT
            continue
        # First GET equals the reset value.
        assert regs[reg.id] == reg.reset
        assert reg.mask is not None
        # Writing 0 (or the full mask where the reset is 0) succeeds and reads back.
        value = reg.mask if reg.reset == 0 else 0
        assert host.check_set(reg.id, value) is None
        assert host.read_after_set(reg.id, value) == value
        # The bit just above the mask fails EINVAL.
        above = 1 << reg.mask.bit_length()
        assert host.check_set(reg.id, above) is Errno.EINVAL


@pytest.mark.parametrize(("name", "regs"), HOSTS, ids=[h[0] for h in HOSTS])
def test_selftest_bitmaps_after_run(name: str, regs: dict[int, int]) -> None:
    host = Host(regs)
    for reg in BITMAPS:
        if reg.id not in regs:
            continue
        assert reg.mask is not None
        last = 0 if reg.reset else reg.mask
        assert host.check_set(reg.id, last, current=last, vm_has_run=True) is None
        other = reg.mask if last == 0 else 0
        assert host.check_set(reg.id, other, current=last, vm_has_run=True) is Errno.EBUSY
        # EINVAL beats EBUSY: the mask is checked first, even after the run.
        above = 1 << reg.mask.bit_length()
        assert host.check_set(reg.id, above, current=last, vm_has_run=True) is Errno.EINVAL


@pytest.mark.parametrize(("name", "regs"), HOSTS, ids=[h[0] for h in HOSTS])
def test_selftest_every_register_accepts_its_own_value(name: str, regs: dict[int, int]) -> None:
    host = Host(regs)
    for rid, value in regs.items():
        assert host.check_set(rid, value) is None, cat.reg_name(rid)


def test_selftest_current_kernel_psci_at_least_1_3() -> None:
    assert default_psci((6, 13)) >= 0x10003
    assert default_psci((7, 3)) >= 0x10003
    assert registers_for((6, 18))[cat.PSCI_VERSION] >= 0x10003


def test_psci_defaults_by_kernel() -> None:
    assert default_psci((4, 16)) == cat.PSCI_1_0
    assert default_psci((5, 17)) == cat.PSCI_1_0
    assert default_psci((5, 18)) == cat.PSCI_1_1
    assert default_psci((6, 12)) == cat.PSCI_1_1
    assert default_psci((6, 13)) == cat.PSCI_1_3


def test_lab_6_1_answers() -> None:
    """What the real 6.1.192 kernel answered in the lab (reference/arm64-kvm-lab.md)."""
    host = Host(registers_for((6, 1), (2, 0, 0)))
    for ok in (0x2, 0x10000, 0x10001):
        assert host.check_set(cat.PSCI_VERSION, ok) is None
    for bad in (0x1, 0x0, 0x10002):
        assert host.check_set(cat.PSCI_VERSION, bad) is Errno.EINVAL
    assert host.check_set(cat.PSCI_VERSION, 0x10001, psci_0_2=False) is Errno.EINVAL
    assert host.check_set(cat.PSCI_VERSION, 0x1, psci_0_2=False) is None
    # PSCI has no "already ran" check.
    assert host.check_set(cat.PSCI_VERSION, 0x10000, vm_has_run=True) is None
    assert host.check_set(cat.VENDOR_HYP_BMAP_2, 0) is Errno.ENOENT
    # Mitigation writes are checks: the value read back never changes.
    assert host.check_set(cat.SMCCC_ARCH_WORKAROUND_1, 1) is None
    assert host.read_after_set(cat.SMCCC_ARCH_WORKAROUND_1, 1) == 2


def test_psci_accepts_only_what_the_kernel_implements() -> None:
    h61 = Host(registers_for((6, 1)))
    h618 = Host(registers_for((6, 18)))
    assert h61.check_set(cat.PSCI_VERSION, cat.PSCI_1_3) is Errno.EINVAL
    assert h61.check_set(cat.PSCI_VERSION, cat.PSCI_1_2) is Errno.EINVAL
    for v in cat.PSCI_VERSIONS_0_2_AND_LATER:
        assert h618.check_set(cat.PSCI_VERSION, v) is None
    assert h618.check_set(cat.PSCI_VERSION, 0x10004) is Errno.EINVAL


@pytest.mark.parametrize(
    ("host_level", "accepted"),
    [(0, {0}), (1, {0, 1}), (2, {0, 1, 2})],
)
def test_wa1_wa3_levels(host_level: int, accepted: set[int]) -> None:
    for rid in (cat.SMCCC_ARCH_WORKAROUND_1, cat.SMCCC_ARCH_WORKAROUND_3):
        host = Host({rid: host_level})
        for value in range(0, 40):
            expect = None if value in accepted else Errno.EINVAL
            assert host.check_set(rid, value) is expect, (rid, host_level, value)


@pytest.mark.parametrize("host_level", [0, 1, 2, 3])
def test_wa2_classes(host_level: int) -> None:
    rid = cat.SMCCC_ARCH_WORKAROUND_2
    host = Host({rid: host_level})
    for value in range(0, 64):
        level = value & 0xF
        valid = value & ~0x1F == 0 and level <= 3 and (not value & 0x10 or level == 2)
        expect = None if valid and host_level >= wa2_class(level) else Errno.EINVAL
        assert host.check_set(rid, value) is expect, (host_level, hex(value))
    # Spelled out from the reference: 0/1 go anywhere; 2/3 need a NOT_REQUIRED host.
    assert Host({rid: 0}).check_set(rid, 1) is None
    assert Host({rid: 0}).check_set(rid, 2) is Errno.EINVAL
    assert Host({rid: 3}).check_set(rid, 2 | 0x10) is None
    assert Host({rid: 3}).check_set(rid, 3 | 0x10) is Errno.EINVAL
    assert Host({rid: 3}).check_set(rid, 4) is Errno.EINVAL


def test_before_vcpu_init_everything_is_enoexec() -> None:
    host = Host(registers_for((6, 18)))
    for rid in host.registers:
        assert host.check_set(rid, 0, vcpu_initialized=False) is Errno.ENOEXEC


def test_unknown_ids_are_enoent() -> None:
    host = Host(registers_for((6, 18)))
    assert host.check_set(0x6030000000140004, 0) is Errno.ENOENT  # no WORKAROUND_4 in mainline
    assert host.check_set(0x6030000000160004, 0) is Errno.ENOENT


def test_registers_by_kernel_version() -> None:
    assert cat.VENDOR_HYP_BMAP_2 not in registers_for((6, 14))
    assert registers_for((6, 15))[cat.VENDOR_HYP_BMAP_2] == 0
    assert cat.STD_BMAP not in registers_for((5, 18))
    assert registers_for((5, 19))[cat.VENDOR_HYP_BMAP] == 0x3


def test_a_hosts_fresh_bitmap_read_is_its_mask() -> None:
    """reset == mask for STD/STD_HYP/VENDOR_HYP: a host without PTP (VENDOR_HYP_BMAP 0x1) rejects
    the PTP bit; a newer kernel offering bit 2 accepts it; BMAP_2 keeps its 0x3 mask."""
    without_ptp = Host({**registers_for((6, 1)), cat.VENDOR_HYP_BMAP: 0x1})
    assert without_ptp.check_set(cat.VENDOR_HYP_BMAP, 0x3) is Errno.EINVAL
    assert without_ptp.check_set(cat.VENDOR_HYP_BMAP, 0x1) is None
    newer = Host({**registers_for((6, 18)), cat.VENDOR_HYP_BMAP: 0x7})
    assert newer.check_set(cat.VENDOR_HYP_BMAP, 0x7) is None
    assert newer.check_set(cat.VENDOR_HYP_BMAP, 0xF) is Errno.EINVAL
    assert Host(registers_for((6, 18))).check_set(cat.VENDOR_HYP_BMAP_2, 0x3) is None
