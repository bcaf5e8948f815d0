"""The simulator and the planner's kernel model (hvcpolicy.kernel) are written independently
from the same reference; here they must agree on every write, register by register.

(The simulator's package never imports hvcpolicy.kernel -- test_independence.py -- only this
test does, to compare the two readings.)
"""

from __future__ import annotations

import itertools

import pytest

from hvcpolicy import kernel
from hvcpolicy.simulator import KernelError, SimVM, profile_for
from hvcpolicy.simulator.profiles import PROFILE_NAMES

VALUES = sorted(
    {*range(0x21), 0x40, 0x100, 0x10000, 0x10001, 0x10002, 0x10003, 0x10004, 0x20000, 1 << 63}
)
UNLISTED = (0x6030000000140004, 0x6030000000160003, 0x6030000000160004)


def sim_verdict(vm: SimVM, rid: int, value: int) -> str | None:
    try:
        vm.set(rid, value)
    except KernelError as err:
        return err.errno
    return None


@pytest.mark.parametrize("psci_0_2", [True, False], ids=["psci0.2", "psci0.1"])
@pytest.mark.parametrize("ran", [False, True], ids=["fresh", "ran"])
@pytest.mark.parametrize("kernel_name", PROFILE_NAMES)
def test_every_write_agrees(kernel_name: str, ran: bool, psci_0_2: bool) -> None:
    profile = profile_for(kernel_name)
    host = kernel.Host(profile.fresh_values())
    rids = [*profile.registers, *(r for r in UNLISTED if r not in profile.registers)]
    disagreements = []
    for rid, value in itertools.product(rids, VALUES):
        vm = SimVM(profile, psci_0_2=psci_0_2)
        current = vm.get(rid) if profile.lists(rid) else None
        if ran:
            vm.run()
        ours = sim_verdict(vm, rid, value)
        model = host.check_set(rid, value, current=current, vm_has_run=ran, psci_0_2=psci_0_2)
        theirs = None if model is None else model.value
        if ours != theirs:
            disagreements.append(f"0x{rid:016x}=0x{value:x}: simulator {ours}, model {theirs}")
        if ours is None and profile.lists(rid):
            assert vm.get(rid) == host.read_after_set(rid, value)
    assert disagreements == []


@pytest.mark.parametrize("kernel_name", PROFILE_NAMES)
def test_psci_newest_agrees(kernel_name: str) -> None:
    profile = profile_for(kernel_name)
    assert kernel.default_psci(profile.version) == profile.psci_newest
