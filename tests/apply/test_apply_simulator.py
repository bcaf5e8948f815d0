"""``hvcpolicy apply`` against ``hvcpolicy simulate`` processes, for every kernel profile.

Each test looks at the simulated guest through its own QMP connection before and after the
CLI ran, so "written", "nothing written" and "not resumed" are observed, not taken from the
CLI's own report.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hvcpolicy.simulator.profiles import PROFILE_NAMES
from tests.apply.policies import (
    PSCI,
    STD,
    STD_HYP,
    VENDOR,
    VENDOR2,
    domain_xml,
    portable,
    write_policy,
)
from tests.qmp.procs import hexregs, hvcpolicy, registers, runstate, simulator


def expected_portable(before: dict[int, int]) -> dict[int, int]:
    """The ``portable`` policy worked by hand: PSCI 1.0; keep trng and kvm-features only."""
    out = dict(before)
    out[PSCI] = 0x10000
    for rid, keep in ((STD, 0x1), (STD_HYP, 0x0), (VENDOR, 0x1), (VENDOR2, 0x0)):
        if rid in out:
            out[rid] &= keep
    return out


@pytest.mark.parametrize("kernel", PROFILE_NAMES)
def test_writes_land_and_verify_on_every_profile(sockdir: Path, kernel: str) -> None:
    policy = portable(sockdir)
    sock = sockdir / "g.qmp"
    with simulator(sock, kernel, "--vcpus", "3"):
        (before, *_) = registers(sock)
        want = expected_portable(before)
        run = hvcpolicy(
            "apply", "--qmp", str(sock), "--policy", str(policy), "--resume", "--format", "json"
        )
        assert run.rc == 0, run
        doc = run.json()
        changed = {r: v for r, v in want.items() if before[r] != v}
        assert doc["runstate"] == "prelaunch"
        assert doc["outcome"] == ("applied" if changed else "unchanged")
        assert doc["written"] == hexregs(dict(sorted(changed.items())))
        assert doc["after"] == [hexregs(dict(sorted(want.items())))] * 3
        assert doc["resumed"] is True
        # Seen independently: every vCPU reads the policy's values, and the guest runs.
        assert registers(sock) == [want] * 3
        assert runstate(sock) == "running"
    if kernel not in ("4.14", "5.10"):  # kernels with bitmaps: something really was hidden
        assert changed[STD_HYP] == 0 and changed[VENDOR] == 0x1


# A feature each profile cannot offer: no VENDOR_HYP_BMAP before 5.19, no VENDOR_HYP_BMAP_2
# before 6.15, and from 6.15 on VENDOR_HYP_BMAP_2 is listed but resets to 0.
MISSING = {
    "4.14": ("kvm-features", "lacks register VENDOR_HYP_BMAP"),
    "5.10": ("ptp", "lacks register VENDOR_HYP_BMAP"),
    "6.1": ("discover-impl-ver", "lacks register VENDOR_HYP_BMAP_2"),
    "6.12": ("discover-impl-cpus", "lacks register VENDOR_HYP_BMAP_2"),
    "6.18": ("discover-impl-cpus", "does not offer it"),
    "7.3": ("discover-impl-ver", "does not offer it"),
}


def test_every_profile_has_a_missing_feature_case() -> None:
    assert set(MISSING) == set(PROFILE_NAMES)


@pytest.mark.parametrize(
    ("kernel", "feature", "why"), [(k, *MISSING[k]) for k in PROFILE_NAMES if k in MISSING]
)
def test_missing_require_refuses_and_writes_nothing(
    sockdir: Path, kernel: str, feature: str, why: str
) -> None:
    features = {"pv-time": "deny", feature: "require"}
    policy = write_policy(sockdir, "needs", features, psci="1.0")
    sock = sockdir / "g.qmp"
    with simulator(sock, kernel):
        before = registers(sock)
        run = hvcpolicy("apply", "--qmp", str(sock), "--policy", str(policy), "--resume")
        assert run.rc == 3, run
        assert run.err.count("\n") == 1 and run.err.startswith("hvcpolicy: ")
        assert feature in run.err and why in run.err
        assert "nothing was written" in run.err
        assert registers(sock) == before
        assert runstate(sock) == "prelaunch"


@pytest.mark.parametrize("kernel", PROFILE_NAMES)
@pytest.mark.parametrize("state", ["running", "paused", "restored"])
def test_running_or_paused_guest_is_never_written(sockdir: Path, kernel: str, state: str) -> None:
    policy = portable(sockdir)
    sock = sockdir / "g.qmp"
    with simulator(sock, kernel, "--vcpus", "2", "--runstate", state):
        before = registers(sock)
        status = runstate(sock)
        differs = expected_portable(before[0]) != before[0]
        run = hvcpolicy("apply", "--qmp", str(sock), "--policy", str(policy), "--resume")
        if differs:
            assert run.rc == 3, run
            assert run.err.count("\n") == 1
            assert "does not write" in run.err and "PSCI_VERSION" in run.err
            assert "hvcpolicy start" in run.err and "virsh start --paused" in run.err
            assert runstate(sock) == status  # refused: not resumed either
        else:  # 4.14 and 5.10 already read what the policy wants: verified
            assert run.rc == 0, run
            assert "outcome: verified" in run.out
        assert registers(sock) == before
    assert differs == (kernel not in ("4.14", "5.10"))


@pytest.mark.parametrize("state", ["running", "paused"])
def test_already_running_warn(sockdir: Path, state: str) -> None:
    policy = portable(sockdir, already_running="warn")
    sock = sockdir / "g.qmp"
    with simulator(sock, "6.12", "--runstate", state):
        before = registers(sock)
        run = hvcpolicy("apply", "--qmp", str(sock), "--policy", str(policy), "--format", "json")
        assert run.rc == 0, run
        assert run.err.startswith("hvcpolicy: warning: ") and run.err.count("\n") == 1
        assert "already-running: warn" in run.err
        doc = run.json()
        assert doc["outcome"] == "differs-warned" and doc["written"] == {}
        assert any("STD_HYP_BMAP" in m for m in doc["mismatches"])
        assert registers(sock) == before
        assert runstate(sock) == state


def test_second_apply_after_resume_only_verifies(sockdir: Path) -> None:
    policy = portable(sockdir)
    sock = sockdir / "g.qmp"
    with simulator(sock, "6.18", "--vcpus", "2"):
        first = hvcpolicy("apply", "--qmp", str(sock), "--policy", str(policy), "--resume")
        assert first.rc == 0, first
        assert "outcome: applied (read back through 2 vCPUs); resumed" in first.out
        after_first = registers(sock)
        second = hvcpolicy(
            "apply", "--qmp", str(sock), "--policy", str(policy), "--resume", "--format", "json"
        )
        assert second.rc == 0, second
        doc = second.json()
        assert doc["runstate"] == "running"
        assert doc["outcome"] == "verified"
        assert doc["written"] == {} and doc["mismatches"] == [] and doc["resumed"] is False
        assert registers(sock) == after_first


def test_dry_run_prints_the_plan_and_writes_nothing(sockdir: Path) -> None:
    policy = portable(sockdir)
    sock = sockdir / "g.qmp"
    with simulator(sock, "6.18"):
        before = registers(sock)
        run = hvcpolicy(
            "apply", "--qmp", str(sock), "--policy", str(policy), "--dry-run", "--resume"
        )
        assert run.rc == 0, run
        lines = run.out.splitlines()
        assert any(ln.startswith("STD_HYP_BMAP") and ln.endswith("would write") for ln in lines)
        assert any(ln.startswith("PSCI_VERSION") and "0x10000  would write" in ln for ln in lines)
        assert "outcome: dry-run" in run.out
        assert registers(sock) == before
        assert runstate(sock) == "prelaunch"


@pytest.mark.parametrize("kernel", PROFILE_NAMES)
def test_inmigrate_without_record_ands_bitmaps_only(sockdir: Path, kernel: str) -> None:
    """SPEC section 7: each bitmap's live value AND the policy's allowed bits; PSCI (and every
    other register) is the migration stream's, even though the policy pins it."""
    policy = portable(sockdir)
    sock = sockdir / "g.qmp"
    with simulator(sock, kernel, "--runstate", "inmigrate"):
        (before,) = registers(sock)
        allowed = {STD: 0x1, STD_HYP: 0x0, VENDOR: 0x1, VENDOR2: 0x0}
        writes = {
            rid: before[rid] & mask
            for rid, mask in allowed.items()
            if rid in before and before[rid] & mask != before[rid]
        }
        run = hvcpolicy("apply", "--qmp", str(sock), "--policy", str(policy), "--format", "json")
        assert run.rc == 0, run
        doc = run.json()
        assert doc["runstate"] == "inmigrate"
        assert doc["written"] == hexregs(writes)
        (after,) = registers(sock)
        assert after == {**before, **writes}
        assert after[PSCI] == before[PSCI]
        assert runstate(sock) == "inmigrate"
    assert bool(writes) == (kernel not in ("4.14", "5.10"))


def test_inmigrate_with_record_clears_what_the_guest_never_carried(sockdir: Path) -> None:
    """The guest came from a 5.10 host (no bitmaps): every bitmap this 6.18 host has is
    cleared; carried registers (PSCI, mitigations) are left to the stream."""
    portable(sockdir)
    sock = sockdir / "g.qmp"
    applied = {PSCI: 0x10000, 0x6030000000140001: 2, 0x6030000000140002: 0, 0x6030000000140003: 1}
    xml = sockdir / "web1.xml"
    xml.write_text(domain_xml("portable", sock, applied))
    with simulator(sock, "6.18", "--runstate", "inmigrate", "--vcpus", "2"):
        (before, _) = registers(sock)
        run = hvcpolicy(
            "apply",
            "--domain-xml",
            str(xml),
            "--policy-dir",
            str(sockdir),
            "--resume",
            "--format",
            "json",
        )
        assert run.rc == 0, run
        doc = run.json()
        assert doc["written"] == hexregs({STD: 0, STD_HYP: 0, VENDOR: 0})  # VENDOR2 reads 0
        want = {**before, STD: 0, STD_HYP: 0, VENDOR: 0}
        assert registers(sock) == [want, want]
        assert want[PSCI] == 0x10003  # not the carried 1.0: that is the stream's to load
        assert runstate(sock) == "running"  # --resume completed the (simulated) migration


def test_inmigrate_with_full_record_writes_nothing(sockdir: Path) -> None:
    portable(sockdir)
    sock = sockdir / "g.qmp"
    applied = {PSCI: 0x10000, STD: 1, STD_HYP: 0, VENDOR: 1, VENDOR2: 0}
    xml = sockdir / "web1.xml"
    xml.write_text(domain_xml("portable", sock, applied))
    with simulator(sock, "6.18", "--runstate", "inmigrate"):
        before = registers(sock)
        run = hvcpolicy(
            "apply", "--domain-xml", "-", "--policy-dir", str(sockdir), stdin=xml.read_text()
        )
        assert run.rc == 0, run
        assert "outcome: unchanged" in run.out
        assert registers(sock) == before


def test_paused_restore_verifies_against_the_record(sockdir: Path) -> None:
    """A restored guest (paused, has not run) whose registers match <hvc:applied>: verified,
    and --resume lets it run; one that differs is refused and stays paused."""
    portable(sockdir)
    sock = sockdir / "g.qmp"
    with simulator(sock, "6.18", "--runstate", "restored"):
        (live,) = registers(sock)
        good = sockdir / "good.xml"
        good.write_text(domain_xml("portable", sock, live))
        bad = sockdir / "bad.xml"
        bad.write_text(domain_xml("portable", sock, {**live, VENDOR: 0x1}))
        run = hvcpolicy("apply", "--domain-xml", str(bad), "--policy-dir", str(sockdir), "--resume")
        assert run.rc == 3, run
        assert "<hvc:applied>" in run.err and "VENDOR_HYP_BMAP" in run.err
        assert runstate(sock) == "paused"
        run = hvcpolicy(
            "apply", "--domain-xml", str(good), "--policy-dir", str(sockdir), "--resume"
        )
        assert run.rc == 0, run
        assert "outcome: verified" in run.out and "resumed" in run.out
        assert registers(sock) == [live]
        assert runstate(sock) == "running"


def test_unsupported_qemu_warn_and_refuse(sockdir: Path) -> None:
    sock = sockdir / "g.qmp"
    refuse = portable(sockdir)
    warn = portable(sockdir, name="lenient", unsupported_qemu="warn")
    with simulator(sock, "6.18", "--fault", "no-interface"):
        run = hvcpolicy("apply", "--qmp", str(sock), "--policy", str(refuse), "--resume")
        assert run.rc == 5, run
        assert "lacks the firmware-register interface" in run.err and run.err.count("\n") == 1
        assert runstate(sock) == "prelaunch"
        run = hvcpolicy("apply", "--qmp", str(sock), "--policy", str(warn), "--resume")
        assert run.rc == 0, run
        assert run.err.startswith("hvcpolicy: warning: ") and "unsupported-qemu: warn" in run.err
        assert "outcome: unsupported-qemu-warned" in run.out
        assert runstate(sock) == "running"  # warn: the guest is not held back


def test_usage_and_input_errors(sockdir: Path) -> None:
    policy = portable(sockdir)
    run = hvcpolicy("apply", "--policy", str(policy))
    assert run.rc == 2 and "--qmp" in run.err
    run = hvcpolicy("apply", "--qmp", "x", "--policy", str(policy), "--timeout", "0")
    assert run.rc == 2 and "--timeout" in run.err
    run = hvcpolicy("apply", "--qmp", "x", "--policy", str(sockdir / "absent.yaml"))
    assert run.rc == 4, run
    run = hvcpolicy("apply", "--qmp", str(sockdir / "absent.qmp"), "--policy", str(policy))
    assert run.rc == 5 and "cannot connect" in run.err and run.err.count("\n") == 1


def test_unmanaged_domain_is_left_alone(sockdir: Path) -> None:
    """No hvcpolicy metadata and no 'default' policy: exit 0 without touching QEMU."""
    xml = sockdir / "plain.xml"
    xml.write_text("<domain type='kvm'><name>plain</name><memory>1</memory></domain>\n")
    sock = sockdir / "g.qmp"
    with simulator(sock, "6.18"):
        before = registers(sock)
        run = hvcpolicy(
            "apply", "--qmp", str(sock), "--domain-xml", str(xml), "--policy-dir", str(sockdir)
        )
        assert run.rc == 0, run
        assert "leaves this domain alone" in run.out
        assert registers(sock) == before
