"""The stream backend on real KVM, held to what a guest sees: the lab's SMCCC probe.

On every lab kernel, with both QEMUs of the rootfs, lab/guest/enforce.py saved a never-run
2-vCPU guest (``-accel kvm -cpu host -S``, the probe lab/guest/smccc/probe.s as its kernel),
planned each lab policy (lab/guest/policies) with ``planner.plan_start`` on the stream's
registers and the host snapshot, patched every vCPU with ``imagefile.patch_image``, loaded it into
a fresh QEMU, saved it again (what KVM holds), and ran it: the probe makes the firmware calls on
vCPU 0 and vCPU 1, resets the machine (PSCI SYSTEM_RESET), makes them again and powers off.
lab/guest/libvirt_start.py did the same through a libvirtd in the lab with the hvcpolicy hook
installed. These tests compare all of it with ``hvcpolicy explain``.

What a call returns when the service is visible, and NOT_SUPPORTED (-1) when it is not:
PSCI_VERSION the PSCI register; TRNG_VERSION 1.0; KVM_FEATURES the VENDOR_HYP_BMAP value;
VENDOR_HYP_CALL_UID KVM's UID; KVM_PTP a time; PV_TIME_FEATURES(PV_TIME_ST) 0 (QEMU gives every
vCPU a stolen-time region). ARCH_FEATURES for the workarounds follows the host's level, which a
policy never changes: WA1/WA3 level 0 -> -1, 1 (available) -> 0, 2 (not required) -> 1; WA2
level 0/1 -> -1, 2 -> 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.lab.labdata import LABELS, REPO, LabKernel

POLICIES = sorted(p.name for p in (REPO / "lab" / "guest" / "policies").glob("*.yaml"))
QEMUS = ("10.0", "11.1")  # the rootfs's own and the one unpacked beside it (lab/build.py)
VCPUS = ("0", "1")
PASSES = ("1", "2")  # before and after the guest's own reset
LIBVIRT_POLICY = "lab-pinned.yaml"  # lab/guest/libvirt_start.py's POLICY

PSCI = 0x6030000000140000
WA1, WA2, WA3 = 0x6030000000140001, 0x6030000000140002, 0x6030000000140003
VENDOR_HYP_BMAP = 0x6030000000160002
NOT_SUPPORTED = (1 << 64) - 1
TRNG_1_0 = 0x10000
SMCCC_1_1 = 0x10001
KVM_UID_0 = 0xB66FB428  # first word of KVM's vendor hypervisor UID 28b46fb6-2ec5-11e9-...
WA13_ANSWER = {0: NOT_SUPPORTED, 1: 0, 2: 1}
WA2_ANSWER = {0: NOT_SUPPORTED, 1: NOT_SUPPORTED, 2: 0}

CASES = [(label, policy) for label in LABELS for policy in POLICIES]
CASE_IDS = [f"{label}-{policy.removesuffix('.yaml')}" for label, policy in CASES]


def regs(doc: dict[str, str]) -> dict[int, int]:
    return {int(k, 16): int(v, 16) for k, v in doc.items()}


def enforce(lab: dict[str, LabKernel], label: str) -> dict[str, Any]:
    k = lab[label]
    assert k.rc("enforce") == 0, f"{k.release}: lab/guest/enforce.py failed (see enforce.out)"
    doc: dict[str, Any] = k.read_json("enforce.json")
    return doc


def by_qemu(doc: dict[str, Any]) -> dict[str, Any]:
    """{"10.0": ..., "11.1": ...}: every QEMU of the rootfs, checked to be there."""
    found = {".".join(v.split(".")[:2]): rec for v, rec in doc.items()}
    assert sorted(found) == sorted(QEMUS), f"QEMUs in the lab: {sorted(doc)}"
    return found


def expected_view(target: dict[int, int], sees: dict[str, bool]) -> dict[str, int]:
    """What each probe call returns (x0) for a guest with these registers and services."""
    view = {
        "PSCI_VERSION": target[PSCI],
        "SMCCC_VERSION": SMCCC_1_1,
        "ARCH_FEATURES_WA1": WA13_ANSWER[target[WA1]],
        "ARCH_FEATURES_WA2": WA2_ANSWER[target[WA2]],
        "ARCH_FEATURES_WA3": WA13_ANSWER[target[WA3]],
        "TRNG_VERSION": TRNG_1_0 if sees["trng"] else NOT_SUPPORTED,
        "PV_TIME_FEATURES": 0 if sees["pv-time"] else NOT_SUPPORTED,
        "VENDOR_HYP_CALL_UID": KVM_UID_0 if sees["kvm-features"] else NOT_SUPPORTED,
        "KVM_FEATURES": target[VENDOR_HYP_BMAP] if sees["kvm-features"] else NOT_SUPPORTED,
    }
    return view


def explained_view(explain: dict[str, Any]) -> tuple[dict[str, int], bool]:
    """What `hvcpolicy explain --format json` says the guest sees, as probe answers; and ptp."""
    sees = {f["feature"]: f["guest_sees"] for f in explain["features"]}
    return expected_view(regs(explain["target"]), sees), bool(sees["ptp"])


def registers_view(registers: dict[int, int]) -> tuple[dict[str, int], bool]:
    """What a guest whose registers nobody changed sees: every offered bit visible."""
    std, std_hyp = registers[0x6030000000160000], registers[0x6030000000160001]
    vendor = registers[VENDOR_HYP_BMAP]
    sees = {"trng": bool(std & 1), "pv-time": bool(std_hyp & 1), "kvm-features": bool(vendor & 1)}
    return expected_view(registers, sees), bool(vendor & 2)


def check_probe(probe: dict[str, Any], view: dict[str, int], ptp: bool, where: str) -> None:
    """Every call, on both vCPUs, before and after the reset, answered as ``view`` says."""
    events = probe["events"]
    assert not [e for e in events if e.startswith("error")], f"{where}: probe said {events}"
    assert "reset" in events and "done" in events, f"{where}: probe events {events}"
    assert sorted(probe["passes"]) == list(PASSES), f"{where}: passes {sorted(probe['passes'])}"
    for p in PASSES:
        assert sorted(probe["passes"][p]) == list(VCPUS), f"{where}: pass {p} vCPUs"
        for cpu in VCPUS:
            got = {call: int(x[0], 16) for call, x in probe["passes"][p][cpu].items()}
            seen_ptp = got.pop("KVM_PTP") != NOT_SUPPORTED
            assert got == view, f"{where}: pass {p} vCPU {cpu}"
            assert seen_ptp == ptp, f"{where}: pass {p} vCPU {cpu}: KVM_PTP"


def test_enforce_job_ran(lab: dict[str, LabKernel]) -> None:
    for label in LABELS:
        doc = enforce(lab, label)
        assert doc["host_probe"]["rc"] == 0, doc["host_probe"]
        for version, q in by_qemu(doc["qemus"]).items():
            assert q["save"]["status"] == "completed", (label, version, q["save"])
            assert q["save"]["runstate"] == "prelaunch"
            assert sorted(q["saved"]) == list(VCPUS), "the guest has 2 vCPUs"
            assert sorted(q["policies"]) == POLICIES
        assert sorted(doc["explain"]) == POLICIES


@pytest.mark.parametrize(("label", "policy"), CASES, ids=CASE_IDS)
def test_kvm_holds_the_plan_on_every_vcpu(
    lab: dict[str, LabKernel], label: str, policy: str
) -> None:
    for version, q in by_qemu(enforce(lab, label)["qemus"]).items():
        rec = q["policies"][policy]
        where = f"{label} QEMU {version} {policy}"
        assert rec["plan"]["ok"], f"{where}: plan refused: {rec['plan']['refusals']}"
        target = rec["plan"]["target"]
        assert sorted(rec["patched"]) == list(VCPUS)
        assert all(rec["patched"][c] == target for c in VCPUS), f"{where}: patched stream"
        assert rec["loaded"], f"{where}: load failed: {rec.get('error')} {rec.get('stderr')}"
        assert rec["readback_status"] == "completed"
        assert sorted(rec["kvm_holds"]) == list(VCPUS)
        for cpu in VCPUS:
            assert rec["kvm_holds"][cpu] == target, f"{where}: vCPU {cpu}: KVM holds"


@pytest.mark.parametrize(("label", "policy"), CASES, ids=CASE_IDS)
def test_plan_is_what_explain_says(lab: dict[str, LabKernel], label: str, policy: str) -> None:
    doc = enforce(lab, label)
    explain = doc["explain"][policy]
    assert explain["rc"] == 0, explain
    for version, q in by_qemu(doc["qemus"]).items():
        plan = q["policies"][policy]["plan"]
        assert plan["target"] == explain["json"]["target"], f"{label} QEMU {version}"
        assert plan["features"] == explain["json"]["features"], f"{label} QEMU {version}"


@pytest.mark.parametrize(("label", "policy"), CASES, ids=CASE_IDS)
def test_guest_sees_what_explain_says(lab: dict[str, LabKernel], label: str, policy: str) -> None:
    doc = enforce(lab, label)
    view, ptp = explained_view(doc["explain"][policy]["json"])
    for version, q in by_qemu(doc["qemus"]).items():
        rec = q["policies"][policy]
        where = f"{label} QEMU {version} {policy}"
        assert rec["exit"] == 0 and not rec.get("run_error"), f"{where}: {rec.get('stderr')}"
        check_probe(rec["probe"], view, ptp, where)


def test_the_policies_differ_from_each_other_and_from_the_defaults(
    lab: dict[str, LabKernel],
) -> None:
    """Three policies that give three different views, on every kernel (not a vacuous match)."""
    for label in LABELS:
        doc = enforce(lab, label)
        views = [str(explained_view(doc["explain"][p]["json"])) for p in POLICIES]
        assert len(set(views)) == len(POLICIES) >= 3, label
        saved = regs(next(iter(doc["qemus"].values()))["saved"]["0"])
        assert views.count(str(registers_view(saved))) <= 1, label


@pytest.mark.parametrize("label", LABELS)
def test_refused_value_leaves_the_guest_restorable(lab: dict[str, LabKernel], label: str) -> None:
    for version, q in by_qemu(enforce(lab, label)["qemus"]).items():
        rec = q["refused"]
        where = f"{label} QEMU {version} VENDOR_HYP_BMAP={rec['value']}"
        refused = rec["refused"]
        assert not refused["loaded"] and refused["exit"] != 0, f"{where}: loaded: {refused}"
        assert "Invalid argument" in refused["stderr"], f"{where}: {refused['stderr']}"
        assert rec["identical_after_undo"], f"{where}: the image is not the saved one again"
        restored = rec["restored"]
        assert restored["loaded"], f"{where}: the saved guest no longer loads: {restored}"
        saved = regs(q["saved"]["0"])
        for cpu in VCPUS:
            assert regs(restored["kvm_holds"][cpu]) == saved
        view, ptp = registers_view(saved)
        check_probe(restored["probe"], view, ptp, f"{where}, restored")


def libvirt_run(lab: dict[str, LabKernel], label: str) -> dict[str, Any]:
    k = lab[label]
    doc: dict[str, Any] = k.read_json("libvirt.json")
    assert "error" not in doc, f"{k.release}: {doc['error']}"
    assert k.rc("libvirt") == 0, f"{k.release}: lab/guest/libvirt_start.py failed"
    return doc


def applied(element: str) -> dict[int, int]:
    """The registers of ``<hvc:applied>`` in the live XML's ``<hvc:policy>`` element (libvirt
    declares the namespace on ``<metadata>``, outside the element)."""
    from hvcpolicy.domainxml import XMLNS, parse_domain

    prefix = element[1 : element.index(":")]
    xml = f'<domain><name>x</name><metadata xmlns:{prefix}="{XMLNS}">{element}</metadata></domain>'

    meta = parse_domain(xml, "live XML").meta
    assert meta is not None and meta.applied is not None, "no <hvc:applied> in the live XML"
    return dict(meta.applied.registers)


@pytest.mark.parametrize("label", LABELS)
def test_libvirt_start_enforces_the_policy(lab: dict[str, LabKernel], label: str) -> None:
    """libvirtd in the lab, the hook installed, the probe domain attached to lab-pinned and
    started: the probe sees what explain says, and the live XML records what was applied."""
    doc = libvirt_run(lab, label)
    explain = enforce(lab, label)["explain"][LIBVIRT_POLICY]["json"]
    view, ptp = explained_view(explain)
    target = regs(explain["target"])
    for version, rec in by_qemu(doc["domains"]).items():
        where = f"{label} libvirt QEMU {version} ({rec['mode']})"
        assert "error" not in rec, f"{where}: {rec['error']}"
        check_probe(rec["probe"], view, ptp, where)
        assert rec["live_policy"], f"{where}: no <hvc:policy> in the live XML"
        assert applied(rec["live_policy"]) == target, f"{where}: <hvc:applied>"
        if rec["mode"] == "virsh":
            # QEMU >= 11 no longer restores a raw image from libvirt's fd: sparse it is.
            sparse = tuple(map(int, version.split("."))) >= (11, 0)
            assert rec["image"]["kind"] == ("libvirt-sparse" if sparse else "libvirt-raw")
            assert rec["state_after_restore"] == "paused (migrating)"


def test_libvirt_snapshot_is_the_enforce_snapshot(lab: dict[str, LabKernel]) -> None:
    """The hook's host snapshot (taken in the libvirt job) and explain's agree on the registers."""
    import json

    for label in LABELS:
        snap = libvirt_run(lab, label)["snapshot"]
        other = json.loads(Path(lab[label].out / "enforce-host.json").read_text())
        assert snap["registers"] == other["registers"], label
