"""The QMP adapter against a real QEMU (qemu-system-aarch64 -machine virt -cpu max -accel tcg -S).

No QEMU release has the kvm-firmware-registers property, so against real QEMU the adapter must
connect, read runstates and vCPUs, and detect -- quickly and without guessing -- that the
interface is missing.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hvcpolicy.errors import InterfaceMissing, QMPError
from hvcpolicy.qmp import PROPERTY, QMP, VCPU, interface_at
from tests.qmp.procs import qemu, qmp_commands


def run(fn, sock: Path, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    with QMP(str(sock), timeout) as qmp:
        return fn(qmp)


def test_connect_and_vcpus(sockdir: Path) -> None:
    with qemu(sockdir, smp=3) as q:

        def look(qmp: QMP) -> tuple[str, list[VCPU]]:
            return qmp.runstate(), qmp.vcpus()

        state, vcpus = run(look, q.sock)
        assert state == "prelaunch"
        assert [v.index for v in vcpus] == [0, 1, 2]
        assert [v.qom_path for v in vcpus] == [f"/machine/unattached/device[{i}]" for i in range(3)]


def test_runstates_follow_qemu(sockdir: Path) -> None:
    """prelaunch (-S) -> running (cont, through the adapter) -> paused (stop on the other
    monitor); the adapter reports each as QEMU does."""
    with qemu(sockdir) as q:

        def resume(qmp: QMP) -> tuple[str, str]:
            before = qmp.runstate()
            qmp.resume()
            return before, qmp.runstate()

        assert run(resume, q.sock) == ("prelaunch", "running")
        qmp_commands(q.mon, ("stop", None))

        assert run(QMP.runstate, q.sock) == "paused"


def test_inmigrate_runstate(sockdir: Path) -> None:
    with qemu(sockdir, incoming=True) as q:
        assert run(QMP.runstate, q.sock) == "inmigrate"


def test_interface_missing_is_detected(sockdir: Path) -> None:
    with qemu(sockdir, smp=2) as q:
        start = time.monotonic()
        assert interface_at(str(q.sock), 2.0) is False
        assert time.monotonic() - start < 2.0
        # and the flow's read says so, before any qom-get
        with pytest.raises(InterfaceMissing, match="lacks the firmware-register interface") as ei:
            run(QMP.read, q.sock)
        assert str(q.sock) in str(ei.value) and ei.value.exit_code == 5


def test_qom_get_error_carries_sent_and_received(sockdir: Path) -> None:
    """Reading the property from a QEMU that lacks it: QEMU's own GenericError, with the exact
    request and reply kept on the error."""
    with qemu(sockdir) as q:

        def read(qmp: QMP) -> object:
            return qmp.read_registers(qmp.vcpus()[:1])

        with pytest.raises(QMPError) as ei:
            run(read, q.sock)
        err = ei.value
        assert err.error_class == "GenericError"
        assert isinstance(err.sent, dict) and isinstance(err.received, dict)
        assert err.sent["execute"] == "qom-get"
        assert err.sent["arguments"] == {
            "path": "/machine/unattached/device[0]",
            "property": PROPERTY,
        }
        received_error = err.received["error"]
        assert isinstance(received_error, dict)
        assert PROPERTY in received_error["desc"]
        assert err.received["id"] == err.sent["id"]
        assert "qom-get" in str(err) and PROPERTY in str(err)


def test_unknown_command_error(sockdir: Path) -> None:
    with qemu(sockdir) as q:

        def bad(qmp: QMP) -> object:
            return qmp.command("no-such-command")

        with pytest.raises(QMPError) as ei:
            run(bad, q.sock)
        assert ei.value.error_class == "CommandNotFound"
        assert "'no-such-command' failed" in str(ei.value)


def test_connect_after_qemu_exit_fails_fast(sockdir: Path) -> None:
    """QEMU gone, socket file left behind: a prompt QMPError (connection refused), no hang."""
    with qemu(sockdir) as q:
        sock = q.sock
        q.proc.kill()
        q.proc.wait(5)
        start = time.monotonic()
        with pytest.raises(QMPError, match="cannot connect") as ei:
            run(lambda qmp: qmp.runstate(), sock, 3.0)
        assert time.monotonic() - start < 3.0
        assert str(sock) in str(ei.value)
