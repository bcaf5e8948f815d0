"""SimVM against the reference's rules and the lab's measurements of a real 6.1 kernel."""

from __future__ import annotations

import pytest

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
from hvcpolicy.simulator import KernelError, SimVM, profile_for


def errno_of(vm: SimVM, rid: int, value: int) -> str | None:
    try:
        vm.set(rid, value)
    except KernelError as err:
        return err.errno
    return None


def test_unknown_register_is_enoent_both_ways() -> None:
    vm = SimVM(profile_for("6.1"))
    for rid in (VENDOR_HYP_BMAP_2, 0x6030000000140004, 0x6030000000160004):
        with pytest.raises(KernelError) as info:
            vm.get(rid)
        assert info.value.errno == "ENOENT"
        assert errno_of(vm, rid, 0) == "ENOENT"


def test_bitmap_rules_in_order() -> None:
    vm = SimVM(profile_for("6.18"), vcpus=2)
    assert errno_of(vm, VENDOR_HYP_BMAP, 0x4) == "EINVAL"
    assert errno_of(vm, VENDOR_HYP_BMAP, 0x2) is None
    assert vm.get(VENDOR_HYP_BMAP, vcpu=1) == 0x2  # per VM
    assert errno_of(vm, VENDOR_HYP_BMAP_2, 0x3) is None
    vm.run()
    assert errno_of(vm, VENDOR_HYP_BMAP, 0x6) == "EINVAL"  # mask first, even after the run
    assert errno_of(vm, VENDOR_HYP_BMAP, 0x3) == "EBUSY"
    assert errno_of(vm, VENDOR_HYP_BMAP, 0x2) is None  # identical value after the run
    assert errno_of(vm, STD_HYP_BMAP, 0x0) == "EBUSY"
    assert vm.get(VENDOR_HYP_BMAP) == 0x2 and vm.get(VENDOR_HYP_BMAP_2) == 0x3


def test_lab_measurements_of_6_1() -> None:
    """reference/arm64-kvm-lab.md: what the 6.1.192 kernel answered."""
    vm = SimVM(profile_for("6.1.192"))
    assert vm.get_all() == {
        PSCI_VERSION: 0x10001,
        SMCCC_ARCH_WORKAROUND_1: 0x2,
        SMCCC_ARCH_WORKAROUND_2: 0x0,
        SMCCC_ARCH_WORKAROUND_3: 0x1,
        STD_BMAP: 0x1,
        STD_HYP_BMAP: 0x1,
        VENDOR_HYP_BMAP: 0x3,
    }
    for v in (0x2, 0x10000, 0x10001):
        assert errno_of(vm, PSCI_VERSION, v) is None
    for v in (0x1, 0x0, 0x10002):
        assert errno_of(vm, PSCI_VERSION, v) == "EINVAL"
    vm.run()
    assert errno_of(vm, PSCI_VERSION, 0x10000) is None  # no "already ran" check for PSCI
    assert vm.get(PSCI_VERSION) == 0x10000
    no02 = SimVM(profile_for("6.1"), psci_0_2=False)
    assert no02.get(PSCI_VERSION) == 0x1
    assert errno_of(no02, PSCI_VERSION, 0x10001) == "EINVAL"
    assert errno_of(no02, PSCI_VERSION, 0x1) is None


@pytest.mark.parametrize("release", ["6.13", "6.18", "7.3"])
def test_psci_on_current_kernels(release: str) -> None:
    vm = SimVM(profile_for(release))
    assert vm.get(PSCI_VERSION) >= 0x10003
    for v in (0x2, 0x10000, 0x10001, 0x10002, 0x10003):
        assert errno_of(vm, PSCI_VERSION, v) is None
        assert vm.get(PSCI_VERSION) == v
    for v in (0x0, 0x1, 0x10004, 0x20000):
        assert errno_of(vm, PSCI_VERSION, v) == "EINVAL"


@pytest.mark.parametrize("rid", [SMCCC_ARCH_WORKAROUND_1, SMCCC_ARCH_WORKAROUND_3])
def test_wa1_wa3_compatibility_checks(rid: int) -> None:
    levels = {SMCCC_ARCH_WORKAROUND_1: 1, SMCCC_ARCH_WORKAROUND_3: 1}
    vm = SimVM(profile_for("6.1", levels))  # host AVAIL
    assert errno_of(vm, rid, 0) is None  # NOT_AVAIL migrates anywhere
    assert errno_of(vm, rid, 1) is None
    assert errno_of(vm, rid, 2) == "EINVAL"  # NOT_REQUIRED only to NOT_REQUIRED hosts
    assert errno_of(vm, rid, 0x10) == "EINVAL"  # a bit above the level field
    assert vm.get(rid) == 1  # never changed by a write
    top = SimVM(profile_for("6.1", {rid: 2}))
    assert [errno_of(top, rid, v) for v in range(5)] == [None, None, None, "EINVAL", "EINVAL"]
    assert top.get(rid) == 2


@pytest.mark.parametrize(
    ("host", "accepted"),
    [(0, {0x0, 0x1}), (3, {0x0, 0x1, 0x2, 0x3, 0x12})],
)
def test_wa2_classes(host: int, accepted: set[int]) -> None:
    vm = SimVM(profile_for("6.18", {SMCCC_ARCH_WORKAROUND_2: host}))
    for value in (*range(0x20), 0x20, 0x100):
        expected = None if value in accepted else "EINVAL"
        assert errno_of(vm, SMCCC_ARCH_WORKAROUND_2, value) == expected, hex(value)
    assert vm.get(SMCCC_ARCH_WORKAROUND_2) == host


def test_kernel_error_message() -> None:
    vm = SimVM(profile_for("6.18"))
    with pytest.raises(KernelError) as info:
        vm.set(VENDOR_HYP_BMAP_2, 0x4)
    assert str(info.value) == "KVM_SET_ONE_REG 0x6030000000160003=0x4 failed: EINVAL"
    assert info.value.rid == VENDOR_HYP_BMAP_2 and info.value.value == 4


def test_api_guards() -> None:
    with pytest.raises(ValueError):
        SimVM(profile_for("6.1"), vcpus=0)
    vm = SimVM(profile_for("6.1"), vcpus=2)
    with pytest.raises(ValueError):
        vm.get(PSCI_VERSION, vcpu=2)
    with pytest.raises(ValueError):
        vm.set(STD_BMAP, 1 << 64)
    assert not vm.has_run
    vm.run()
    assert vm.has_run


def test_protected_vm_refuses_psci_below_1_1() -> None:
    vm = SimVM(profile_for("6.18"), protected=True)
    assert errno_of(vm, PSCI_VERSION, 0x2) == "EINVAL"
    assert errno_of(vm, PSCI_VERSION, 0x10000) == "EINVAL"
    assert errno_of(vm, PSCI_VERSION, 0x10001) is None
    assert errno_of(vm, PSCI_VERSION, 0x10003) is None
