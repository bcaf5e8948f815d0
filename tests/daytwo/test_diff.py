"""``hvcpolicy diff``: the host's changes and each policy's verdict, pure and as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvcpolicy import catalogue as cat
from hvcpolicy.diff import diff, diff_hosts
from hvcpolicy.policy import Policy, load_policy_file, parse_policy
from hvcpolicy.snapshot import Snapshot, load_snapshot
from tests.conftest import EXAMPLES, REPO

HOSTS = EXAMPLES / "hosts"
FLEET = EXAMPLES / "fleet"
POLICIES = EXAMPLES / "policies"
OLD = HOSTS / "neoverse-n1_linux-6.1.json"
NEW = HOSTS / "neoverse-n1_linux-6.18.json"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hvcpolicy", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def example_policies() -> list[Policy]:
    return [load_policy_file(str(p)) for p in sorted(POLICIES.iterdir())]


def policy(name: str, spec: dict[str, object]) -> Policy:
    doc = {
        "apiVersion": "hvcpolicy/v1",
        "kind": "FirmwarePolicy",
        "metadata": {"name": name},
        "spec": spec,
    }
    return parse_policy(doc, f"{name}.yaml")


def with_regs(snap: Snapshot, **changes: int | None) -> Snapshot:
    """A copy of ``snap`` with registers (by catalogue name) set, or removed with None."""
    regs = dict(snap.registers)
    for name, value in changes.items():
        rid = getattr(cat, name) if hasattr(cat, name) else int(name[1:], 16)
        if value is None:
            regs.pop(rid, None)
        else:
            regs[rid] = value
    return Snapshot(snap.host + "-changed", snap.kernel, snap.source, regs, qemu=snap.qemu)


# --- the host side ------------------------------------------------------------------------------


def test_6_1_to_6_18_names_the_new_register_and_the_psci_change() -> None:
    host = diff_hosts(load_snapshot(str(OLD)), load_snapshot(str(NEW)))
    changes = {c.register: c for c in host.registers}
    assert set(changes) == {cat.PSCI_VERSION, cat.VENDOR_HYP_BMAP_2}
    bmap2 = changes[cat.VENDOR_HYP_BMAP_2]
    assert (bmap2.change, bmap2.old, bmap2.new, bmap2.offered) == ("added", None, 0, ())
    psci = changes[cat.PSCI_VERSION]
    assert (psci.change, psci.direction) == ("psci", "up")
    assert "1.1 -> 1.3" in psci.summary


def test_bits_offered_and_withdrawn_and_mitigations_up_and_down() -> None:
    old = load_snapshot(str(NEW))
    new = with_regs(
        old,
        VENDOR_HYP_BMAP=0x1,  # ptp withdrawn
        VENDOR_HYP_BMAP_2=0x3,  # both discovery calls offered
        SMCCC_ARCH_WORKAROUND_1=1,  # 2 -> 1: down
        SMCCC_ARCH_WORKAROUND_3=2,  # 1 -> 2: up
        STD_HYP_BMAP=None,  # gone
    )
    changes = {c.register: c for c in diff_hosts(old, new).registers}
    assert changes[cat.VENDOR_HYP_BMAP].withdrawn == ("ptp",)
    assert changes[cat.VENDOR_HYP_BMAP].offered == ()
    assert changes[cat.VENDOR_HYP_BMAP_2].offered == ("discover-impl-ver", "discover-impl-cpus")
    assert changes[cat.SMCCC_ARCH_WORKAROUND_1].direction == "down"
    assert changes[cat.SMCCC_ARCH_WORKAROUND_3].direction == "up"
    assert changes[cat.STD_HYP_BMAP].change == "removed"
    assert changes[cat.STD_HYP_BMAP].withdrawn == ("pv-time",)
    assert cat.PSCI_VERSION not in changes


def test_a_host_against_itself_changes_nothing() -> None:
    snap = load_snapshot(str(NEW))
    result = diff(snap, snap, example_policies())
    assert not result.host.changed
    assert result.affected == []
    assert all(not p.sees and not p.loses and not p.notes for p in result.policies)


# --- the policy side ----------------------------------------------------------------------------


def test_6_1_to_6_18_affects_the_example_policies_for_the_reasons_the_planner_gives() -> None:
    result = diff(load_snapshot(str(OLD)), load_snapshot(str(NEW)), example_policies())
    by_name = {p.policy: p for p in result.policies}
    assert set(by_name) == {"default", "fleet-2026", "legacy-4-14", "strict-review"}
    # default pins no PSCI: a guest started on 6.18 sees PSCI 1.3
    assert by_name["default"].sees == ["PSCI 1.3 (was PSCI 1.1)"]
    # pinned policies see nothing new
    for name in ("fleet-2026", "legacy-4-14", "strict-review"):
        assert by_name[name].sees == [] and by_name[name].loses == []
    # every guest started on 6.18 carries VENDOR_HYP_BMAP_2, which a 6.1 host (QEMU unknown)
    # cannot load; 6.1 -> 6.18 is fine for all
    for impact in result.policies:
        assert impact.affected
        directions = {m.direction: m for m in impact.migrations}
        assert directions["old-to-new"].verdict is not None
        assert directions["old-to-new"].verdict.ok, impact.policy
        assert [m.direction for m in impact.migration_refused] == ["new-to-old"]
        reasons = directions["new-to-old"].verdict.reasons  # type: ignore[union-attr]
        assert any("VENDOR_HYP_BMAP_2" in r for r in reasons)
    assert any("PSCI 1.3" in r for r in by_name["default"].migration_refused[0].verdict.reasons)  # type: ignore[union-attr]


def test_qemu_11_1_tolerates_the_missing_bitmap_so_only_the_unpinned_policy_is_affected() -> None:
    result = diff(
        load_snapshot(str(FLEET / "node-6-1-qemu-11.1.json")),
        load_snapshot(str(FLEET / "node-6-18.json")),
        example_policies(),
    )
    assert result.affected == ["default"]


def test_a_withdrawn_required_bit_refuses_and_a_lower_mitigation_refuses() -> None:
    old = load_snapshot(str(NEW))
    new = with_regs(old, STD_BMAP=0x0, SMCCC_ARCH_WORKAROUND_3=0)
    result = diff(old, new, example_policies())
    strict = next(p for p in result.policies if p.policy == "strict-review")
    assert strict.now_refused and "refused" in strict.outcomes
    assert any("trng" in r for r in strict.new_plan.refusals)
    assert any("smccc-arch-workaround-3" in r for r in strict.new_plan.refusals)
    # refused on the new host: no guest there to migrate from
    assert {m.direction: m.verdict is None for m in strict.migrations} == {
        "old-to-new": False,
        "new-to-old": True,
    }
    default = next(p for p in result.policies if p.policy == "default")
    assert not default.now_refused
    assert any(s.startswith("trng") for s in default.loses)
    assert (
        "smccc-arch-workaround-3 level 0 (any) (was smccc-arch-workaround-3 level 1 (available))"
        in default.loses
    )
    assert "loses" in default.outcomes and "sees-new" not in default.outcomes


def test_a_new_unknown_bit_is_seen_under_allow_and_refused_under_refuse() -> None:
    old = load_snapshot(str(NEW))
    new = with_regs(old, VENDOR_HYP_BMAP_2=0x3, x6030000000160004=0x5)
    allow = policy("open", {"unknown": "allow"})
    every = {name: "allow" for name in cat.FEATURES}
    refuse = policy("review", {"unknown": "refuse", "features": every})
    deny = policy("quiet", {"unknown": "deny"})
    result = diff(old, new, [allow, refuse, deny])
    by_name = {p.policy: p for p in result.policies}
    seen = by_name["open"].sees
    assert any(s.startswith("discover-impl-ver ") for s in seen)
    assert any(s.startswith("0x6030000000160004:0 ") for s in seen)
    assert any(s.startswith("0x6030000000160004:2 ") for s in seen)
    assert by_name["review"].old_plan.ok and by_name["review"].now_refused
    assert any("0x6030000000160004" in r for r in by_name["review"].new_plan.refusals)
    # deny hides every new bit: the guest sees nothing new, and nothing is refused
    quiet = by_name["quiet"]
    assert quiet.sees == [] and quiet.loses == [] and not quiet.now_refused
    # ... but a guest started there carries the new register, which the old kernel lacks
    assert [m.direction for m in quiet.migration_refused] == ["new-to-old"]
    reasons = quiet.migration_refused[0].verdict.reasons  # type: ignore[union-attr]
    assert reasons == [
        "0x6030000000160004 = 0x0: the destination kernel lacks this register, so QEMU fails "
        "the load"
    ]


def test_the_json_form_carries_everything_the_text_says() -> None:
    result = diff(load_snapshot(str(OLD)), load_snapshot(str(NEW)), example_policies())
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["changed"] is True
    assert {r["name"] for r in doc["registers"]} == {"PSCI_VERSION", "VENDOR_HYP_BMAP_2"}
    default = next(p for p in doc["policies"] if p["policy"] == "default")
    assert default["outcomes"] == ["sees-new", "migration-new-to-old-refused"]
    assert doc["affected"] == ["default", "fleet-2026", "legacy-4-14", "strict-review"]


# --- the command ----------------------------------------------------------------------------


def test_cli_6_1_to_6_18_exit_3_naming_register_psci_and_policies() -> None:
    r = run("diff", str(OLD), str(NEW), "--policy-dir", str(POLICIES))
    assert r.returncode == 3, r.stderr
    out = r.stdout
    assert "VENDOR_HYP_BMAP_2 (0x6030000000160003)" in out
    assert "PSCI default 1.1 -> 1.3 (up)" in out
    for name in ("default", "fleet-2026", "legacy-4-14", "strict-review"):
        assert f"  {name}: AFFECTED" in out
    assert "verdict: 4 of 4 policies affected" in out
    assert r.stderr == ""


def test_cli_host_against_itself_exit_0_says_nothing_changed() -> None:
    r = run("diff", str(NEW), str(NEW), "--policy-dir", str(POLICIES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "host: no firmware register changed" in r.stdout
    assert "verdict: nothing changed" in r.stdout
    j = run("diff", str(NEW), str(NEW), "--policy-dir", str(POLICIES), "--format", "json")
    assert j.returncode == 0
    doc = json.loads(j.stdout)
    assert (doc["changed"], doc["affected"], doc["registers"]) == (False, [], [])
    assert len(doc["policies"]) == 4


def test_cli_policy_by_name_and_by_path_repeatable() -> None:
    r = run(
        "diff",
        str(FLEET / "node-6-1-qemu-11.1.json"),
        str(FLEET / "node-6-18.json"),
        "--policy",
        "fleet-2026",
        "--policy",
        str(POLICIES / "default.yaml"),
        "--format",
        "json",
        env={"HVCPOLICY_POLICY_DIR": str(POLICIES)},
    )
    assert r.returncode == 3, r.stderr
    doc = json.loads(r.stdout)
    assert [p["policy"] for p in doc["policies"]] == ["fleet-2026", "default"]
    assert doc["affected"] == ["default"]
    assert doc["policies_from"] == "given"


def test_cli_host_change_without_affected_policy_exits_0() -> None:
    r = run(
        "diff",
        str(FLEET / "node-6-1-qemu-7.2.json"),
        str(FLEET / "node-6-1-qemu-11.1.json"),
        "--policy-dir",
        str(POLICIES),
    )
    assert r.returncode == 0, r.stdout
    assert "QEMU 7.2.19 -> 11.1.0" in r.stdout
    assert "verdict: the host changed, no policy is affected" in r.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((str(EXAMPLES / "broken" / "bad-snapshot.json"), str(NEW)), "bad-snapshot.json"),
        ((str(OLD), str(NEW), "--policy-dir", "/nonexistent/policies"), "/nonexistent/policies"),
        ((str(OLD), str(NEW), "--policy", "no-such-policy"), "no-such-policy"),
        ((str(OLD), str(NEW), "--policy-dir", str(EXAMPLES / "broken")), "broken/"),
    ],
)
def test_cli_invalid_input_exit_4_one_line(args: tuple[str, ...], needle: str) -> None:
    r = run("diff", *args, env={"HVCPOLICY_POLICY_DIR": str(POLICIES)})
    assert r.returncode == 4, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_usage_error_exit_2() -> None:
    r = run("diff", str(OLD))
    assert r.returncode == 2


def test_an_empty_policy_dir_reports_the_host_only(tmp_path: Path) -> None:
    r = run("diff", str(OLD), str(NEW), "--policy-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert f"policies: none found ({tmp_path})" in r.stdout
    assert "+ new register VENDOR_HYP_BMAP_2" in r.stdout


def test_a_new_unknown_firmware_register_is_seen_and_blocks_the_way_back() -> None:
    old = load_snapshot(str(NEW))
    new = with_regs(old, x6030000000140004=0x1)  # a WORKAROUND_4 this catalogue does not know
    host = diff_hosts(old, new)
    assert [(c.change, c.summary) for c in host.registers] == [
        ("added", "new register 0x6030000000140004 = 0x1: reads 0x1")
    ]
    impact = diff(old, new, [policy("quiet", {"unknown": "deny"})]).policies[0]
    assert impact.sees == ["0x6030000000140004 = 0x1 (the old kernel lacks the register)"]
    assert [m.direction for m in impact.migration_refused] == ["new-to-old"]
    every = {name: "allow" for name in cat.FEATURES}
    review = policy("review", {"unknown": "refuse", "features": every})
    reviewed = diff(old, new, [review]).policies[0]
    assert reviewed.old_plan.ok and reviewed.now_refused
    assert reviewed.new_plan.refusals == [
        "host has register 0x6030000000140004, which policy 'review' does not name "
        "(unknown: refuse)"
    ]
