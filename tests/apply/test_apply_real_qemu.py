"""``hvcpolicy apply`` against a real QEMU (qemu-system-aarch64 -machine virt -cpu max -accel tcg
-S), alone (it lacks the interface) and behind ``hvcpolicy simulate --upstream`` (the simulator
serves only the firmware-register property; runstate, vCPUs, cont and events are QEMU's).

QEMU gets two QMP monitors: one for the code under test, one for the test's own checks.
"""

from __future__ import annotations

from pathlib import Path

from tests.apply.policies import PSCI, STD_HYP, VENDOR, portable
from tests.qmp.procs import hexregs, hvcpolicy, qemu, registers, runstate, simulator

# The missing interface is detected by asking (qom-list), not by waiting for a timeout: the run
# ends well within the default 5 s bound, and as fast with a 30 s one.
LONG = 30.0
DETECTED_WITHIN = 5.0


def test_real_qemu_without_interface_refuse_exits_5(sockdir: Path) -> None:
    policy = portable(sockdir)  # enforcement.unsupported-qemu: refuse
    with qemu(sockdir, smp=2) as q:
        run = hvcpolicy(
            "apply",
            "--qmp",
            str(q.sock),
            "--policy",
            str(policy),
            "--resume",
        )
        assert run.rc == 5, run
        assert run.err.count("\n") == 1 and run.err.startswith("hvcpolicy: ")
        assert "this QEMU lacks the firmware-register interface" in run.err
        assert "kvm-firmware-registers" in run.err and "unsupported-qemu: refuse" in run.err
        assert run.elapsed < DETECTED_WITHIN, run
        assert runstate(q.mon) == "prelaunch"  # not resumed


def test_real_qemu_without_interface_warn_exits_0(sockdir: Path) -> None:
    policy = portable(sockdir, unsupported_qemu="warn")
    with qemu(sockdir) as q:
        run = hvcpolicy(
            "apply", "--qmp", str(q.sock), "--policy", str(policy), "--timeout", str(LONG)
        )
        assert run.rc == 0, run
        assert run.err.startswith("hvcpolicy: warning: ") and run.err.count("\n") == 1
        assert "lacks the firmware-register interface" in run.err
        assert "outcome: unsupported-qemu-warned" in run.out
        assert run.elapsed < DETECTED_WITHIN, run
        assert runstate(q.mon) == "prelaunch"  # no --resume: left as it was
        run = hvcpolicy(
            "apply", "--qmp", str(q.sock), "--policy", str(policy), "--resume", "--format", "json"
        )
        assert run.rc == 0, run
        assert run.json()["outcome"] == "unsupported-qemu-warned"
        assert runstate(q.mon) == "running"  # warn: the guest is not held back


def test_upstream_apply_resume_then_verify_only(sockdir: Path) -> None:
    """Layered over a real QEMU: apply in prelaunch writes and resumes the real QEMU; a second
    apply sees it running and only verifies."""
    policy = portable(sockdir)
    layer = sockdir / "layer.qmp"
    with (
        qemu(sockdir, smp=2) as q,
        simulator(layer, "6.18", "--upstream", str(q.sock)),
    ):
        (fresh, _) = registers(layer)
        run = hvcpolicy(
            "apply", "--qmp", str(layer), "--policy", str(policy), "--resume", "--format", "json"
        )
        assert run.rc == 0, run
        doc = run.json()
        assert doc["runstate"] == "prelaunch" and doc["vcpus"] == 2
        assert doc["outcome"] == "applied" and doc["resumed"] is True
        assert doc["written"] == hexregs({STD_HYP: 0, VENDOR: 1, PSCI: 0x10000})
        # The real QEMU, asked on its own monitor, runs now; its vCPUs are the ones apply saw.
        assert runstate(q.mon) == "running"
        want = {**fresh, STD_HYP: 0, VENDOR: 1, PSCI: 0x10000}
        assert registers(layer) == [want, want]

        again = hvcpolicy(
            "apply", "--qmp", str(layer), "--policy", str(policy), "--resume", "--format", "json"
        )
        assert again.rc == 0, again
        doc = again.json()
        assert doc["runstate"] == "running"
        assert doc["outcome"] == "verified"
        assert doc["written"] == {} and doc["resumed"] is False
        assert registers(layer) == [want, want]


def test_upstream_after_run_a_changed_policy_is_refused_not_written(sockdir: Path) -> None:
    """Once the real QEMU ran, a stricter policy can no longer be written: refused, exit 3."""
    policy = portable(sockdir)
    strict = sockdir / "strict.yaml"
    strict.write_text(
        policy.read_text()
        .replace("trng: allow", "trng: deny")
        .replace("name: portable", "name: strict")
    )
    layer = sockdir / "layer.qmp"
    with qemu(sockdir) as q, simulator(layer, "6.12", "--upstream", str(q.sock)):
        assert hvcpolicy("apply", "--qmp", str(layer), "--policy", str(policy), "--resume").rc == 0
        before = registers(layer)
        run = hvcpolicy("apply", "--qmp", str(layer), "--policy", str(strict))
        assert run.rc == 3, run
        assert "STD_BMAP" in run.err and "hvcpolicy start" in run.err
        assert registers(layer) == before
        assert runstate(q.mon) == "running"


def test_upstream_inmigrate(sockdir: Path) -> None:
    """A real QEMU started with -incoming defer: inmigrate; only bitmaps are written."""
    policy = portable(sockdir)
    layer = sockdir / "layer.qmp"
    with (
        qemu(sockdir, incoming=True) as q,
        simulator(layer, "6.18", "--upstream", str(q.sock)),
    ):
        run = hvcpolicy("apply", "--qmp", str(layer), "--policy", str(policy), "--format", "json")
        assert run.rc == 0, run
        doc = run.json()
        assert doc["runstate"] == "inmigrate"
        assert doc["written"] == hexregs({STD_HYP: 0, VENDOR: 1})
        assert runstate(q.mon) == "inmigrate"
