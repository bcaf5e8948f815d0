"""hvcpolicy.kernel (the kernel-rules model) held, case by case, to what each real kernel answered.

A case is one KVM_SET_ONE_REG (or GET) the lab's conformance run made on a real arm64 KVM kernel
(lab/guest/conformance.py). The model is given the host as that kernel's own probe shows it, and
must predict the errno and what GET reads afterwards. Every disagreement is listed by case.
"""

from __future__ import annotations

from typing import Any

import pytest

from hvcpolicy import catalogue as cat
from hvcpolicy import kernel
from tests.lab.labdata import CASE_IDS, CASES, LabKernel

WAS = (cat.SMCCC_ARCH_WORKAROUND_1, cat.SMCCC_ARCH_WORKAROUND_2, cat.SMCCC_ARCH_WORKAROUND_3)


def hexint(text: str | None) -> int | None:
    return None if text is None else int(text, 16)


def describe(case: dict[str, Any]) -> str:
    rid = int(case["rid"], 16)
    where = case["scenario"]
    if case["op"] == "get":
        return f"[{where}] GET {cat.reg_name(rid)}"
    return (
        f"[{where}] SET {cat.reg_name(rid)}={case['value']} (stored {case['before']},"
        f" vm_has_run={case['vm_has_run']}, psci_0_2={case['psci_0_2']})"
    )


def model_answer(host: kernel.Host, case: dict[str, Any]) -> tuple[str | None, int | None]:
    """(errno name or None, what GET reads afterwards) as hvcpolicy.kernel predicts them."""
    rid = int(case["rid"], 16)
    if case["op"] == "get":
        if not case["vcpu_initialized"]:
            return kernel.Errno.ENOEXEC.value, None
        if rid not in host.registers:
            return kernel.Errno.ENOENT.value, None
        return None, hexint(case["after"])  # the value itself is checked by the probe tests
    value = int(case["value"], 16)
    before = hexint(case["before"])
    err = host.check_set(
        rid,
        value,
        current=before,
        vm_has_run=case["vm_has_run"],
        psci_0_2=case["psci_0_2"],
        vcpu_initialized=case["vcpu_initialized"],
    )
    if err is not None:
        return err.value, before
    return None, host.read_after_set(rid, value)


def disagreements(k: LabKernel) -> tuple[list[str], int]:
    data = k.read_json("conformance.json")
    host = kernel.Host({int(r, 16): int(v, 16) for r, v in data["fresh"].items()})
    bad = []
    for case in data["cases"]:
        want_err, want_after = model_answer(host, case)
        got_err, got_after = case["errno"], hexint(case["after"])
        if want_err != got_err:
            bad.append(f"{describe(case)}: kernel {got_err or 'ok'}, model {want_err or 'ok'}")
        elif got_err is None and case["op"] == "set" and want_after != got_after:
            bad.append(
                f"{describe(case)}: kernel reads back {case['after']}, model"
                f" {cat.fmt_value(want_after) if want_after is not None else None}"
            )
    return bad, len(data["cases"])


@pytest.mark.parametrize(("label", "cpu"), CASES, ids=CASE_IDS)
def test_conformance_run_finished(lab: dict[str, LabKernel], label: str, cpu: str) -> None:
    k = lab[label].at_cpu(cpu)
    assert k.rc("conformance") == 0, (k.out / "conformance.out").read_text()[-2000:]
    data = k.read_json("conformance.json")
    assert data["kernel"] == k.release
    assert data["machine"] == "aarch64"
    assert len(data["cases"]) > 500


@pytest.mark.parametrize(("label", "cpu"), CASES, ids=CASE_IDS)
def test_model_agrees_with_real_kernel(lab: dict[str, LabKernel], label: str, cpu: str) -> None:
    bad, total = disagreements(lab[label].at_cpu(cpu))
    assert not bad, (
        f"{lab[label].release} on {cpu}: hvcpolicy.kernel disagrees with the real kernel on"
        f" {len(bad)} of {total} cases:\n" + "\n".join(bad)
    )


@pytest.mark.parametrize(("label", "cpu"), CASES, ids=CASE_IDS)
def test_fresh_reads_match_registers_for(lab: dict[str, LabKernel], label: str, cpu: str) -> None:
    """kernel.registers_for / default_psci: what a kernel of this version lists, and reads."""
    k = lab[label].at_cpu(cpu)
    data = k.read_json("conformance.json")
    fresh = {int(r, 16): int(v, 16) for r, v in data["fresh"].items()}
    version = kernel.parse_version(k.release)
    assert version is not None
    wa = tuple(fresh.get(r, 0) for r in WAS)
    model = kernel.registers_for(version, (wa[0], wa[1], wa[2]))
    problems = []
    for rid in sorted(set(model) | set(fresh)):
        if model.get(rid) != fresh.get(rid):
            m, f = model.get(rid), fresh.get(rid)
            problems.append(
                f"{cat.reg_name(rid)}: kernel {'absent' if f is None else cat.fmt_value(f)},"
                f" registers_for {'absent' if m is None else cat.fmt_value(m)}"
            )
    assert not problems, f"{k.release}: " + "; ".join(problems)
    assert kernel.default_psci(version) == fresh[cat.PSCI_VERSION]


@pytest.mark.parametrize(("label", "cpu"), CASES, ids=CASE_IDS)
def test_vcpu_without_psci_0_2_reads_0_1(lab: dict[str, LabKernel], label: str, cpu: str) -> None:
    data = lab[label].at_cpu(cpu).read_json("conformance.json")
    assert data["fresh_no_psci_0_2"][cat.fmt_id(cat.PSCI_VERSION)] == "0x1"
    others = {r: v for r, v in data["fresh_no_psci_0_2"].items() if int(r, 16) != cat.PSCI_VERSION}
    assert others == {r: v for r, v in data["fresh"].items() if int(r, 16) != cat.PSCI_VERSION}


@pytest.mark.parametrize(("label", "cpu"), CASES, ids=CASE_IDS)
def test_bitmaps_and_psci_are_per_vm(lab: dict[str, LabKernel], label: str, cpu: str) -> None:
    data = lab[label].at_cpu(cpu).read_json("conformance.json")
    assert data["per_vm"], "no per-VM cases recorded"
    for case in data["per_vm"]:
        assert case["vcpu1"] == case["value"], f"{case}: vCPU 1 does not see vCPU 0's write"


@pytest.mark.parametrize(("label", "cpu"), CASES, ids=CASE_IDS)
def test_every_access_before_vcpu_init_is_enoexec(
    lab: dict[str, LabKernel], label: str, cpu: str
) -> None:
    data = lab[label].at_cpu(cpu).read_json("conformance.json")
    cases = [c for c in data["cases"] if c["scenario"] == "uninitialized"]
    assert cases
    assert {c["errno"] for c in cases} == {"ENOEXEC"}
    assert data["reg_list_uninitialized"] == "ENOEXEC"
