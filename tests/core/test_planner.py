"""The planner on the real-host fixtures: what the guest sees, refusals, migration verdicts."""

from __future__ import annotations

import pytest

from hvcpolicy import catalogue as cat
from hvcpolicy.domainxml import parse_domain
from hvcpolicy.planner import check_migration, plan_inmigrate, plan_start, verify
from hvcpolicy.policy import Policy, load_policy_file, parse_policy
from hvcpolicy.snapshot import Snapshot, load_snapshot
from tests.conftest import EXAMPLES, FIXTURE_HOSTS


def host(name: str) -> Snapshot:
    return load_snapshot(str(FIXTURE_HOSTS / f"{name}.json"))


def policy(name: str) -> Policy:
    found = list((EXAMPLES / "policies").glob(f"{name}.*"))
    return load_policy_file(str(found[0]))


def inline(**spec: object) -> Policy:
    doc = {
        "apiVersion": "hvcpolicy/v1",
        "kind": "FirmwarePolicy",
        "metadata": {"name": "t"},
        "spec": spec,
    }
    return parse_policy(doc, "t.yaml")


def applied(name: str) -> dict[int, int]:
    d = parse_domain((EXAMPLES / "domains" / name).read_text())
    assert d.meta is not None and d.meta.applied is not None
    return d.meta.applied.registers


def test_fleet_policy_on_6_18() -> None:
    plan = plan_start(policy("fleet-2026"), host("neoverse-n1_linux-6.18").registers)
    assert plan.ok
    assert plan.writes == {cat.PSCI_VERSION: 0x10001, cat.STD_HYP_BMAP: 0}
    seen = {v.name: v.visible for v in plan.features}
    assert seen == {
        "trng": True,
        "pv-time": False,
        "kvm-features": True,
        "ptp": True,
        "discover-impl-ver": False,
        "discover-impl-cpus": False,
    }
    assert plan.target[cat.VENDOR_HYP_BMAP_2] == 0


@pytest.mark.parametrize("kernel", ["4.14", "5.10"])
def test_require_on_hosts_without_bitmaps_names_the_register(kernel: str) -> None:
    plan = plan_start(policy("fleet-2026"), host(f"neoverse-v1_linux-{kernel}").registers)
    assert not plan.ok
    assert any(
        "requires kvm-features" in r and "VENDOR_HYP_BMAP (0x6030000000160002)" in r
        for r in plan.refusals
    )
    assert not plan.writes or cat.PSCI_VERSION not in plan.writes
    # Nothing can hide those services there: say so rather than claim the guest sees nothing.
    views = {v.name: v for v in plan.features}
    assert views["pv-time"].visible is None and views["pv-time"].offered is None
    assert any("STD_HYP_BMAP" in n and "stays visible" in n for n in plan.notes)


def test_legacy_policy_runs_everywhere() -> None:
    for name in ("4.14", "5.10", "6.1", "6.18"):
        plan = plan_start(policy("legacy-4-14"), host(f"neoverse-n1_linux-{name}").registers)
        assert plan.ok, plan.refusals
        for rid, value in plan.target.items():
            if cat.is_bitmap(rid):
                assert value == 0


def test_unknown_refuse_catches_new_bits_and_registers() -> None:
    regs = dict(host("neoverse-n1_linux-6.18").registers)
    p = inline(
        features={"trng": "allow", "pv-time": "allow", "kvm-features": "allow"}, unknown="refuse"
    )
    plan = plan_start(p, regs)
    assert [r for r in plan.refusals if "ptp" in r]
    regs[cat.VENDOR_HYP_BMAP] = 0x7  # a newer kernel's bit 2
    regs[0x6030000000160004] = 0x0  # and a whole new bitmap register
    regs[0x6030000000140004] = 0x1  # and a new firmware register
    plan = plan_start(p, regs)
    text = " ".join(plan.refusals)
    assert "0x6030000000160002:2" in text
    assert "0x6030000000160004" in text
    assert "0x6030000000140004" in text


def test_unknown_deny_and_allow() -> None:
    regs = dict(host("neoverse-n1_linux-6.18").registers)
    regs[cat.VENDOR_HYP_BMAP] = 0x7
    deny = plan_start(inline(features={"ptp": "allow"}), regs)
    assert deny.target[cat.VENDOR_HYP_BMAP] == 0x2
    allow = plan_start(inline(features={"ptp": "deny"}, unknown="allow"), regs)
    assert allow.target[cat.VENDOR_HYP_BMAP] == 0x5
    named = plan_start(inline(features={"0x6030000000160002:2": "allow"}), regs)
    assert named.target[cat.VENDOR_HYP_BMAP] == 0x4
    # Unknown non-bitmap registers are left alone unless unknown: refuse.
    regs[0x6030000000140004] = 0x1
    assert 0x6030000000140004 not in deny.writes
    assert plan_start(inline(), regs).target[0x6030000000140004] == 0x1


def test_psci_pin_refused_when_host_lacks_it() -> None:
    plan = plan_start(inline(psci={"version": "1.3"}), host("neoverse-n1_linux-6.1").registers)
    assert not plan.ok and "psci.version 1.3" in plan.refusals[0]
    assert cat.PSCI_VERSION not in plan.writes
    ok = plan_start(inline(psci={"version": "1.3"}), host("neoverse-n1_linux-6.18").registers)
    assert ok.ok and cat.PSCI_VERSION not in ok.writes


def test_workaround_minimums() -> None:
    regs = host("neoverse-n1_linux-6.1").registers  # WA1 2, WA2 0, WA3 1
    assert plan_start(inline(workarounds={"smccc-arch-workaround-1": "not-required"}), regs).ok
    assert plan_start(inline(workarounds={"smccc-arch-workaround-3": "available"}), regs).ok
    no3 = plan_start(inline(workarounds={"smccc-arch-workaround-3": "not-required"}), regs)
    assert "smccc-arch-workaround-3" in no3.refusals[0]
    no2 = plan_start(inline(workarounds={"smccc-arch-workaround-2": "available"}), regs)
    assert "smccc-arch-workaround-2" in no2.refusals[0]
    assert plan_start(inline(workarounds={"smccc-arch-workaround-2": "any"}), regs).ok
    wa2_3 = {**regs, cat.SMCCC_ARCH_WORKAROUND_2: 3}
    assert plan_start(inline(workarounds={"smccc-arch-workaround-2": "not-required"}), wa2_3).ok


def test_inmigrate_with_and_without_record() -> None:
    live = host("neoverse-n1_linux-6.18").registers
    carried = applied("web1-applied-6.1.xml")
    plan = plan_inmigrate(policy("fleet-2026"), live, carried)
    assert plan.writes == {}  # BMAP_2 is new but already 0 on a fresh 6.18 VM
    live_b2 = {**live, cat.VENDOR_HYP_BMAP_2: 0x3}
    assert plan_inmigrate(policy("fleet-2026"), live_b2, carried).writes == {
        cat.VENDOR_HYP_BMAP_2: 0
    }
    bare = plan_inmigrate(policy("fleet-2026"), live, None)
    assert bare.writes == {cat.STD_HYP_BMAP: 0}
    assert all(v & ~live[r] == 0 for r, v in bare.writes.items())


def test_verify_reports_mismatches() -> None:
    target = {cat.PSCI_VERSION: 0x10001, cat.STD_BMAP: 0, cat.SMCCC_ARCH_WORKAROUND_1: 1}
    live = {cat.PSCI_VERSION: 0x10001, cat.STD_BMAP: 1, cat.SMCCC_ARCH_WORKAROUND_1: 2}
    out = verify(target, live)
    assert len(out) == 1 and "STD_BMAP" in out[0]


# --- migration: the named cases ---------------------------------------------------


def test_refuse_nonzero_bmap2_to_6_1() -> None:
    v = check_migration(None, host("neoverse-n1_linux-6.1"), applied("web1-applied-6.18.xml"))
    assert not v.ok
    assert "VENDOR_HYP_BMAP_2 (0x6030000000160003) = 0x1" in v.reasons[0]


def test_refuse_psci_1_3_to_6_1() -> None:
    v = check_migration(None, host("neoverse-n1_linux-6.1"), applied("batch7-psci-1.3.xml"))
    assert any("PSCI_VERSION" in r and "PSCI 1.3" in r and "EINVAL" in r for r in v.reasons)
    by_policy = check_migration(inline(psci={"version": "1.3"}), host("neoverse-n1_linux-6.1"))
    assert not by_policy.ok and "psci.version 1.3" in by_policy.reasons[0]


def test_accept_6_1_guest_on_6_18_and_name_what_is_cleared() -> None:
    v = check_migration(None, host("neoverse-n1_linux-6.18"), applied("web1-applied-6.1.xml"))
    assert v.ok, v.reasons
    assert v.clears == [cat.VENDOR_HYP_BMAP_2]


def test_bmap2_zero_depends_on_destination_qemu() -> None:
    carried = applied("web1-applied-6.18-bmap2-zero.xml")
    old = load_snapshot(str(EXAMPLES / "fleet" / "node-6-1-qemu-7.2.json"))
    new = load_snapshot(str(EXAMPLES / "fleet" / "node-6-1-qemu-11.1.json"))
    refused = check_migration(None, old, carried)
    assert not refused.ok and "11.1" in refused.reasons[0] and "7.2.19" in refused.reasons[0]
    assert check_migration(None, new, carried).ok
    unknown = check_migration(None, host("neoverse-n1_linux-6.1"), carried)
    assert not unknown.ok and "version unknown" in unknown.reasons[0]
    assert not check_migration(None, new, {**carried, cat.VENDOR_HYP_BMAP_2: 1}).ok


def test_migration_bits_and_mitigations() -> None:
    dest = host("neoverse-n1_linux-6.1")
    assert (
        "bits 0x6030000000160002:2"
        in check_migration(None, dest, {**dest.registers, cat.VENDOR_HYP_BMAP: 0x7}).reasons[0]
    )
    wa = check_migration(None, dest, {**dest.registers, cat.SMCCC_ARCH_WORKAROUND_3: 2})
    assert "SMCCC_ARCH_WORKAROUND_3" in wa.reasons[0] and "level is 1" in wa.reasons[0]
    assert check_migration(None, dest, {**dest.registers, cat.SMCCC_ARCH_WORKAROUND_2: 1}).ok


def test_migration_from_policy_and_source() -> None:
    v = check_migration(
        policy("fleet-2026"), host("neoverse-n1_linux-6.1"), source=host("neoverse-n1_linux-6.18")
    )
    assert not v.ok and v.basis == "source"  # the 6.18 plan carries BMAP_2, QEMU unknown
    ok = check_migration(
        policy("fleet-2026"), host("neoverse-n1_linux-6.18"), source=host("neoverse-n1_linux-6.1")
    )
    assert ok.ok and ok.clears == [cat.VENDOR_HYP_BMAP_2]
    pol = check_migration(policy("fleet-2026"), host("neoverse-n1_linux-5.10"))
    assert not pol.ok and pol.basis == "policy"


def test_refuse_an_applied_bit_the_destination_lacks() -> None:
    dest = host("neoverse-n1_linux-6.1")
    no_ptp = Snapshot(dest.host, dest.kernel, "kvm", {**dest.registers, cat.VENDOR_HYP_BMAP: 0x1})
    carried = {**dest.registers, cat.VENDOR_HYP_BMAP: 0x3}
    v = check_migration(None, no_ptp, carried)
    assert not v.ok and "bits ptp are not supported there (EINVAL)" in v.reasons[0]
    assert check_migration(None, no_ptp, {**carried, cat.VENDOR_HYP_BMAP: 0x1}).ok
