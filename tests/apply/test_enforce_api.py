"""The Python API the hook, ``apply`` and ``start`` call: ``hvcpolicy.enforce.enforce`` over any
:class:`hvcpolicy.firmware.Firmware` (the QMP client here; the stream backend elsewhere).

Against a simulate process where the simulator has the state, and against a scripted Firmware
for runstates and faults a simulator cannot reach.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from hvcpolicy.enforce import APPLIED, VERIFIED, enforce, enforce_at, inspect
from hvcpolicy.errors import InterfaceMissing, QMPError, Refused, Unavailable
from hvcpolicy.firmware import Registers
from hvcpolicy.policy import load_policy
from hvcpolicy.qmp import QMP
from tests.apply.policies import PSCI, STD_HYP, VENDOR, portable
from tests.qmp.procs import registers, runstate, simulator


def test_enforce_records_every_register_as_left(sockdir: Path) -> None:
    policy = load_policy(str(portable(sockdir)))
    sock = sockdir / "g.qmp"
    with simulator(sock, "6.18", "--vcpus", "2"):
        with QMP(str(sock), 3.0) as qmp:
            result = enforce(qmp, policy, resume=True)
        assert result.outcome == APPLIED and result.resumed
        assert result.vcpus == 2 and result.backend == "qmp"
        assert result.written == {STD_HYP: 0, VENDOR: 1, PSCI: 0x10000}  # in any order
        live = registers(sock)
        # <hvc:applied> = every firmware register as left, written or not (8 on 6.18).
        assert result.applied_registers() == live[0] and len(live[0]) == 8
        assert result.after == live
        assert runstate(sock) == "running"
        again = enforce_at(str(sock), policy, timeout=3.0)
        assert again.outcome == VERIFIED and again.written == {}
        assert again.applied_registers() == live[0]


def test_enforce_raises_the_documented_errors(sockdir: Path) -> None:
    policy = load_policy(str(portable(sockdir)))
    sock = sockdir / "g.qmp"
    with simulator(sock, "6.18", "--fault", "no-interface"):
        with pytest.raises(InterfaceMissing) as ei:
            enforce_at(str(sock), policy, timeout=2.0)
        assert ei.value.exit_code == 5
    with pytest.raises(QMPError) as qe:
        enforce_at(str(sockdir / "absent"), policy, timeout=0.5)
    assert qe.value.exit_code == 5


class Scripted:
    """A Firmware whose guest is a script: a runstate, vCPUs and registers; records calls.
    ``holds``: whether a write lands (False: every vCPU still reads the old values)."""

    backend = "scripted"
    where = "scripted guest"

    def __init__(self, state: str, regs: Registers, vcpus: int = 1, holds: bool = True) -> None:
        self.state = state
        self.regs = [dict(regs) for _ in range(vcpus)]
        self.holds = holds
        self.sent: list[str] = []

    def runstate(self) -> str:
        return self.state

    def read(self) -> list[Registers]:
        self.sent.append("read")
        return [dict(r) for r in self.regs]

    def write(self, writes: Mapping[int, int]) -> None:
        self.sent.append("write")
        if self.holds:
            for regs in self.regs:
                regs.update(writes)

    def resume(self) -> None:
        self.sent.append("resume")


FRESH_6_18 = {PSCI: 0x10003, 0x6030000000160000: 1, STD_HYP: 1, VENDOR: 3, 0x6030000000160003: 0}


@pytest.mark.parametrize("state", ["postmigrate", "finish-migrate", "shutdown", "guest-panicked"])
def test_other_runstates_verify_only_and_are_not_resumed(sockdir: Path, state: str) -> None:
    policy = load_policy(str(portable(sockdir, already_running="warn")))
    fw = Scripted(state, FRESH_6_18, vcpus=3)
    result = enforce(fw, policy, resume=True)
    assert fw.sent == ["read"]  # neither a write nor a resume
    assert result.outcome == "differs-warned" and not result.resumed
    assert f"not resumed: the runstate is {state}" in result.notes
    assert len(result.after) == 3


def test_paused_with_record_verifies_against_it(sockdir: Path) -> None:
    policy = load_policy(str(portable(sockdir)))
    fw = Scripted("paused", FRESH_6_18)
    result = enforce(fw, policy, applied=FRESH_6_18, resume=True)
    assert result.outcome == VERIFIED and fw.sent == ["read", "resume"]
    fw = Scripted("paused", FRESH_6_18)
    with pytest.raises(Refused, match="<hvc:applied>"):
        enforce(fw, policy, applied={**FRESH_6_18, VENDOR: 1}, resume=True)
    assert fw.sent == ["read"]


def test_dry_run_sends_nothing(sockdir: Path) -> None:
    policy = load_policy(str(portable(sockdir)))
    fw = Scripted("prelaunch", FRESH_6_18)
    result = enforce(fw, policy, dry_run=True, resume=True)
    assert result.outcome == "dry-run" and fw.sent == ["read"] and result.written == {}
    assert set(result.writes) == {PSCI, STD_HYP, VENDOR}


@pytest.mark.parametrize("state", ["prelaunch", "inmigrate"])
def test_a_write_that_does_not_hold_is_exit_5_and_never_resumed(sockdir: Path, state: str) -> None:
    """One read-back rule for every writable runstate (the hook once never read back on
    inmigrate) and one exit code for a write that did not hold (start once said 3, apply 5)."""
    policy = load_policy(str(portable(sockdir)))
    fw = Scripted(state, {**FRESH_6_18, 0x6030000000160003: 1}, vcpus=2, holds=False)
    with pytest.raises(Unavailable, match="the write did not hold") as ei:
        enforce(fw, policy, resume=True)
    assert ei.value.exit_code == 5 and not isinstance(ei.value, Refused)
    assert fw.sent == ["read", "write", "read"]  # read back after the write, never resumed


def test_vcpus_that_disagree_are_never_written(sockdir: Path) -> None:
    policy = load_policy(str(portable(sockdir)))
    fw = Scripted("prelaunch", FRESH_6_18, vcpus=2)
    fw.regs[1][VENDOR] = 1
    with pytest.raises(Unavailable, match=r"vCPU 1: VENDOR_HYP_BMAP .* reads 0x1, vCPU 0 0x3"):
        enforce(fw, policy, resume=True)
    assert fw.sent == ["read"]


def test_inspect_never_refuses_and_holds_every_vcpu(sockdir: Path) -> None:
    policy = load_policy(str(portable(sockdir)))
    fw = Scripted("running", FRESH_6_18, vcpus=2)
    assert inspect(fw, policy, applied=FRESH_6_18).outcome == VERIFIED
    fw.regs[1][VENDOR] = 1
    result = inspect(fw, policy, applied=FRESH_6_18)
    assert result.outcome == "differs" and fw.sent == ["read", "read"]
    assert result.mismatches == [
        "vCPU 1: VENDOR_HYP_BMAP (0x6030000000160002) reads 0x1, vCPU 0 0x3"
    ]
