"""``hvcpolicy apply --resume`` against every ``hvcpolicy simulate --fault`` mode.

Each fault must end the run within the QMP timeout (plus the interpreter's start and a bounded
close), with a non-zero exit, a one-line message on stderr, and the guest not resumed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hvcpolicy.simulator.faults import KINDS
from tests.apply.policies import portable
from tests.qmp.procs import hvcpolicy, registers, runstate, simulator

TIMEOUT = 1.5
# Interpreter start-up (~0.3 s here, more on a loaded 2-core CI box) plus a close bounded at 1 s.
SLACK = 2.5

# (fault, what the message must say, the runstate after: None where the test cannot ask)
P = "prelaunch"
FAULTS = [
    ("no-greeting", "no QMP greeting", None),
    ("bad-greeting", "not a QMP greeting", None),
    ("hang@query-status#1", "no answer to 'query-status' within 1.5 s", P),
    ("hang@qom-get", "within 1.5 s", P),
    ("hang@qom-set", "the write may be partial", P),
    ("hang@cont", "no answer to 'cont'", P),
    ("drop@query-cpus-fast", "connection lost waiting for 'query-cpus-fast'", P),
    ("drop@qom-set", "connection lost waiting for 'qom-set'", P),
    ("drop@qom-get#2", "connection lost waiting for 'qom-get'", P),  # the read-back
    ("error@qom-set", "simulated failure of qom-set", P),
    ("error@qom-list=DeviceNotFound", "DeviceNotFound", P),
    ("error@cont", "'cont' failed", P),
    ("slow@qom-get=6", "within 1.5 s", P),
    ("slow=6", "no QMP greeting", None),
    ("no-interface", "lacks the firmware-register interface", P),
    ("partial-write", "EIO", P),
    ("partial-write=0", "EIO", P),
    ("exit@qom-set", "connection lost waiting for 'qom-set'", None),
    ("exit@query-status", "connection lost", None),
    ("malformed@qom-get", "qom-get", P),
    ("truncated@query-status#1", "query-status", P),
    ("oversized@qom-get", "qom-get", P),
    ("wrong-id@query-cpus-fast", "query-cpus-fast", P),
    ("vcpu-disagree", "vCPU 1", P),
    # Another monitor (libvirt) resumes the guest under our feet: the write meets EBUSY, or
    # (resumed before the write) the runstate re-read right before qom-set refuses to write.
    ("resume@qom-set", "EBUSY", "running"),
    ("resume@query-cpus-fast", "from prelaunch to running before the write", "running"),
]

# Faults a correct client rides out: the run succeeds.
TOLERATED = [
    "one-client",
    "stray-reply@query-status",
    "reorder@query-status",
    "reorder@qom-get",
    "slow@qom-set=0.3",
]


def test_every_documented_fault_mode_is_covered() -> None:
    covered = {f.split("@")[0].split("=")[0] for f, _, _ in FAULTS}
    covered |= {f.split("@")[0].split("=")[0] for f in TOLERATED}
    assert set(KINDS) - covered == set(), "a fault mode without an apply test"


@pytest.mark.parametrize(("fault", "says", "state"), FAULTS, ids=[f for f, _, _ in FAULTS])
def test_fault_ends_bounded_nonzero_one_line_not_resumed(
    sockdir: Path, fault: str, says: str, state: str | None
) -> None:
    policy = portable(sockdir)  # three writes on 6.18: PSCI, STD_HYP_BMAP, VENDOR_HYP_BMAP
    sock = sockdir / "g.qmp"
    with simulator(sock, "6.18", "--vcpus", "2", "--fault", fault) as proc:
        start = time.monotonic()
        run = hvcpolicy(
            "apply",
            "--qmp",
            str(sock),
            "--policy",
            str(policy),
            "--resume",
            "--timeout",
            str(TIMEOUT),
        )
        elapsed = time.monotonic() - start
        assert run.rc == 5, run
        assert elapsed < TIMEOUT + SLACK, run
        assert run.err.startswith("hvcpolicy: ") and run.err.count("\n") == 1, run
        assert "Traceback" not in run.err
        assert says in run.err, run
        if state is not None and proc.poll() is None:
            assert runstate(sock) == state
        else:
            # Nothing answered, or the "QEMU" died before any cont could be sent.
            assert "'cont'" not in run.err


@pytest.mark.parametrize("fault", TOLERATED)
def test_tolerated_faults(sockdir: Path, fault: str) -> None:
    policy = portable(sockdir)
    sock = sockdir / "g.qmp"
    with simulator(sock, "6.18", "--vcpus", "2", "--fault", fault):
        run = hvcpolicy(
            "apply", "--qmp", str(sock), "--policy", str(policy), "--resume", "--timeout", "3"
        )
        assert run.rc == 0, run
        assert "outcome: applied (read back through 2 vCPUs); resumed" in run.out
        regs = registers(sock)
        assert regs[0] == regs[1] and regs[0][0x6030000000160001] == 0
        assert runstate(sock) == "running"


def test_partial_write_leaves_the_guest_paused_and_says_so(sockdir: Path) -> None:
    """A write that stopped half way: exit 5 naming the registers, and the guest, whose
    registers now match neither the policy nor the kernel's defaults, never runs."""
    policy = portable(sockdir)
    sock = sockdir / "g.qmp"
    with simulator(sock, "6.18", "--fault", "partial-write=1"):
        run = hvcpolicy("apply", "--qmp", str(sock), "--policy", str(policy), "--resume")
        assert run.rc == 5, run
        planned = {0x6030000000140000: 0x10000, 0x6030000000160001: 0, 0x6030000000160002: 1}
        for rid, value in planned.items():
            assert f"(0x{rid:016x})=0x{value:x}" in run.err
        assert "EIO" in run.err
        (regs,) = registers(sock)
        landed = [rid for rid, value in planned.items() if regs[rid] == value]
        assert len(landed) == 1  # the first write landed, the second failed, the third never ran
        assert runstate(sock) == "prelaunch"


def test_verbose_shows_the_failed_exchange(sockdir: Path) -> None:
    policy = portable(sockdir)
    sock = sockdir / "g.qmp"
    with simulator(sock, "6.18", "--fault", "error@qom-set"):
        run = hvcpolicy("apply", "--qmp", str(sock), "--policy", str(policy), "-v")
        assert run.rc != 0
        sent = next(ln for ln in run.err.splitlines() if ln.startswith("hvcpolicy: QMP sent: "))
        got = next(ln for ln in run.err.splitlines() if ln.startswith("hvcpolicy: QMP received: "))
        assert '"execute": "qom-set"' in sent and '"0x6030000000160001": 0' in sent
        assert "simulated failure of qom-set" in got
        assert runstate(sock) == "prelaunch"
