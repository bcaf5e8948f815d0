"""The Python API the hook and ``start`` can call: ``hvcpolicy.enforce.enforce``/``enforce_async``.

Against a simulate process where the simulator has the state, and against a scripted adapter for
runstates a simulator cannot reach.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from hvcpolicy.enforce import APPLIED, VERIFIED, enforce, enforce_async
from hvcpolicy.errors import InterfaceMissing, QMPError, Refused
from hvcpolicy.policy import load_policy
from hvcpolicy.qmp import QMP, VCPU, Registers
from tests.apply.policies import PSCI, STD_HYP, VENDOR, portable
from tests.qmp.procs import registers, runstate, simulator


def test_enforce_records_every_register_as_left(sockdir: Path) -> None:
    policy = load_policy(str(portable(sockdir)))
    sock = sockdir / "g.qmp"
    with simulator(sock, "6.18", "--vcpus", "2"):
        result = enforce(str(sock), policy, timeout=3.0, resume=True)
        assert result.outcome == APPLIED and result.resumed
        assert [v.index for v in result.vcpus] == [0, 1]
        assert result.written == {STD_HYP: 0, VENDOR: 1, PSCI: 0x10000}  # in any order
        live = registers(sock)
        # <hvc:applied> = every firmware register as left, written or not (8 on 6.18).
        assert result.applied_registers() == live[0] and len(live[0]) == 8
        assert result.after == live
        assert runstate(sock) == "running"
        again = enforce(str(sock), policy, timeout=3.0)
        assert again.outcome == VERIFIED and again.written == {}
        assert again.applied_registers() == live[0]


def test_enforce_raises_the_documented_errors(sockdir: Path) -> None:
    policy = load_policy(str(portable(sockdir)))
    sock = sockdir / "g.qmp"
    with simulator(sock, "6.18", "--fault", "no-interface"):
        with pytest.raises(InterfaceMissing) as ei:
            enforce(str(sock), policy, timeout=2.0)
        assert ei.value.exit_code == 5
    with pytest.raises(QMPError) as qe:
        enforce(str(sockdir / "absent"), policy, timeout=2.0)
    assert qe.value.exit_code == 5


class Scripted(QMP):
    """An adapter whose QEMU is a script: a runstate, vCPUs and registers; records commands."""

    def __init__(self, state: str, regs: Registers, vcpus: int = 1) -> None:
        super().__init__("scripted", 1.0)
        self.state = state
        self.regs = dict(regs)
        self.count = vcpus
        self.sent: list[str] = []

    async def runstate(self) -> str:
        return self.state

    async def vcpus(self) -> list[VCPU]:
        return [VCPU(i, f"/cpu{i}") for i in range(self.count)]

    async def has_interface(self, vcpu: VCPU) -> bool:
        return True

    async def read_registers(self, vcpu: VCPU) -> Registers:
        return dict(self.regs)

    async def read_registers_all(self, vcpus: Sequence[VCPU]) -> list[Registers]:
        return [dict(self.regs) for _ in vcpus]

    async def write_registers(self, vcpu: VCPU, values: Mapping[int, int]) -> None:
        self.sent.append("qom-set")
        self.regs.update(values)

    async def resume(self) -> None:
        self.sent.append("cont")


FRESH_6_18 = {PSCI: 0x10003, 0x6030000000160000: 1, STD_HYP: 1, VENDOR: 3, 0x6030000000160003: 0}


@pytest.mark.parametrize("state", ["postmigrate", "finish-migrate", "shutdown", "guest-panicked"])
def test_other_runstates_verify_only_and_are_not_resumed(sockdir: Path, state: str) -> None:
    policy = load_policy(str(portable(sockdir, already_running="warn")))
    qmp = Scripted(state, FRESH_6_18, vcpus=3)
    result = asyncio.run(enforce_async(qmp, policy, resume=True))
    assert qmp.sent == []  # neither qom-set nor cont
    assert result.outcome == "differs-warned" and not result.resumed
    assert f"not resumed: QEMU's runstate is {state}" in result.notes
    assert len(result.after) == 3


def test_paused_with_record_verifies_against_it(sockdir: Path) -> None:
    policy = load_policy(str(portable(sockdir)))
    qmp = Scripted("paused", FRESH_6_18)
    result = asyncio.run(enforce_async(qmp, policy, applied=FRESH_6_18, resume=True))
    assert result.outcome == VERIFIED and qmp.sent == ["cont"]
    qmp = Scripted("paused", FRESH_6_18)
    with pytest.raises(Refused, match="<hvc:applied>"):
        asyncio.run(enforce_async(qmp, policy, applied={**FRESH_6_18, VENDOR: 1}, resume=True))
    assert qmp.sent == []


def test_dry_run_sends_nothing(sockdir: Path) -> None:
    policy = load_policy(str(portable(sockdir)))
    qmp = Scripted("prelaunch", FRESH_6_18)
    result = asyncio.run(enforce_async(qmp, policy, dry_run=True, resume=True))
    assert result.outcome == "dry-run" and qmp.sent == [] and result.written == {}
    assert set(result.writes) == {PSCI, STD_HYP, VENDOR}
