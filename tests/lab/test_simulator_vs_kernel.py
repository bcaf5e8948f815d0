"""The simulator's kernel profiles held, case by case, to what each real kernel answered.

Same cases as test_conformance.py, replayed on ``SimVM(profile_for(release))`` (with the CPU's
mitigation levels as the kernel reported them: they belong to the CPU, not the kernel). Cases on a
vCPU before KVM_ARM_VCPU_INIT have no counterpart in the simulator and are left out.
"""

from __future__ import annotations

from typing import Any

import pytest

from hvcpolicy import catalogue as cat
from tests.lab.labdata import CASE_IDS, CASES, LabKernel
from tests.lab.test_conformance import describe, hexint

WAS = (cat.SMCCC_ARCH_WORKAROUND_1, cat.SMCCC_ARCH_WORKAROUND_2, cat.SMCCC_ARCH_WORKAROUND_3)


def sim_answer(profile: Any, case: dict[str, Any]) -> tuple[str | None, int | None]:
    from hvcpolicy.simulator.vm import KernelError, SimVM

    rid = int(case["rid"], 16)
    vm = SimVM(profile, vcpus=1, psci_0_2=case["psci_0_2"])
    before = hexint(case["before"]) if case["op"] == "set" else None
    if before is not None and cat.is_bitmap(rid):
        vm.set(rid, before)  # the VM as the real one was when the write came
    if case["vm_has_run"]:
        vm.run()
    try:
        if case["op"] == "get":
            return None, vm.get(rid)
        vm.set(rid, int(case["value"], 16))
    except KernelError as err:
        return err.errno, before
    return None, vm.get(rid)


@pytest.mark.parametrize(("label", "cpu"), CASES, ids=CASE_IDS)
def test_simulator_profile_agrees_with_real_kernel(
    lab: dict[str, LabKernel], label: str, cpu: str
) -> None:
    from hvcpolicy.simulator.profiles import profile_for

    k = lab[label].at_cpu(cpu)
    data = k.read_json("conformance.json")
    fresh = {int(r, 16): int(v, 16) for r, v in data["fresh"].items()}
    profile = profile_for(k.release, wa_levels={r: fresh[r] for r in WAS if r in fresh})
    bad = []
    sim_fresh = profile.fresh_values(True)
    if sim_fresh != fresh:
        bad.append(
            "fresh registers: kernel "
            + ", ".join(f"{cat.reg_name(r)}={cat.fmt_value(v)}" for r, v in fresh.items())
            + "; profile "
            + ", ".join(f"{cat.reg_name(r)}={cat.fmt_value(v)}" for r, v in sim_fresh.items())
        )
    no_psci = {int(r, 16): int(v, 16) for r, v in data["fresh_no_psci_0_2"].items()}
    if profile.fresh_values(False) != no_psci:
        bad.append("fresh registers of a vCPU without PSCI 0.2 differ")
    cases = [c for c in data["cases"] if c["vcpu_initialized"]]
    for case in cases:
        want_err, want_after = sim_answer(profile, case)
        got_err, got_after = case["errno"], hexint(case["after"])
        if want_err != got_err:
            bad.append(f"{describe(case)}: kernel {got_err or 'ok'}, simulator {want_err or 'ok'}")
        elif got_err is None and want_after != got_after:
            bad.append(f"{describe(case)}: kernel reads {case['after']}, simulator {want_after}")
    assert not bad, (
        f"{k.release}: simulator profile {profile.name} disagrees with the real kernel on"
        f" {len(bad)} of {len(cases)} cases:\n" + "\n".join(bad)
    )
