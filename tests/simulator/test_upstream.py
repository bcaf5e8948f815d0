"""``simulate --upstream``: the interface layered over a real QEMU (qemu-system-aarch64, TCG).

Everything but the firmware-register property is the real QEMU's: greeting version, runstate,
vCPUs, other QOM properties, errors and events; "the VM has run" follows the real RESUME, also
when the vCPUs were started through another monitor (as libvirt does).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from hvcpolicy.simulator.harness import simulator_process, stop_process
from tests.simulator.conftest import RawQMP, arun

QEMU = shutil.which("qemu-system-aarch64")
PROP = "kvm-firmware-registers"
VHYP = "0x6030000000160002"

# Not a skip: the project's setup installs QEMU (scripts/setup.sh, package qemu-system-arm).
assert QEMU is not None, "qemu-system-aarch64 missing: run scripts/setup.sh"


def _connectable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


@contextlib.contextmanager
def real_qemu(*qmp_paths: str) -> Iterator[subprocess.Popen[bytes]]:
    assert QEMU is not None
    cmd = [QEMU, "-machine", "virt", "-cpu", "max", "-accel", "tcg", "-smp", "2", "-m", "128"]
    cmd += ["-S", "-nographic", "-nic", "none", "-nodefaults"]
    for path in qmp_paths:
        cmd += ["-qmp", f"unix:{path},server=on,wait=off"]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 15
        while not all(_connectable(p) for p in qmp_paths[:1]):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline, "QEMU's QMP socket did not come up"
            time.sleep(0.05)
        yield proc
    finally:
        stop_process(proc)
        if proc.stderr is not None:
            proc.stderr.close()


async def next_event(client: QMPClient, name: str, timeout: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        async for event in client.events:
            if event["event"] == name:
                return dict(event)
    raise AssertionError("unreachable")


def test_layered_over_real_qemu(sock: str) -> None:
    qsock = sock + ".qemu"
    with real_qemu(qsock) as qemu, simulator_process(sock, "6.18", "--upstream", qsock) as sim:

        async def body() -> None:
            client = QMPClient("upstream-test")
            await client.connect(sock)
            version: Any = client.greeting.QMP.version  # type: ignore[union-attr]
            assert version["qemu"]["major"] >= 7 and version["package"] != "hvcpolicy-simulate"
            status: Any = await client.execute("query-status")
            assert status["status"] == "prelaunch" and status["running"] is False
            cpus: Any = await client.execute("query-cpus-fast")
            assert len(cpus) == 2 and all(c["target"] == "aarch64" for c in cpus)
            paths = [c["qom-path"] for c in cpus]
            props: Any = await client.execute("qom-list", {"path": paths[0]})
            names = [p["name"] for p in props]
            assert "midr" in names and names.count(PROP) == 1  # the real list, plus ours
            midr: Any = await client.execute("qom-get", {"path": paths[0], "property": "midr"})
            assert isinstance(midr, int) and midr > 0  # served by the real QEMU
            with pytest.raises(ExecuteError) as info:
                await client.execute("qom-get", {"path": "/machine", "property": PROP})
            assert info.value.error_class == "GenericError"  # not a vCPU: the real answer
            with pytest.raises(ExecuteError) as info:
                await client.execute("no-such-command")
            assert info.value.error_class == "CommandNotFound"
            regs: Any = await client.execute("qom-get", {"path": paths[1], "property": PROP})
            assert regs[VHYP] == 3 and regs["0x6030000000140000"] == 0x10003
            await client.execute(
                "qom-set", {"path": paths[0], "property": PROP, "value": {VHYP: 1}}
            )
            regs = await client.execute("qom-get", {"path": paths[1], "property": PROP})
            assert regs[VHYP] == 1
            waiter = asyncio.create_task(next_event(client, "RESUME"))
            await asyncio.sleep(0)
            await client.execute("cont")
            resume = await waiter
            assert set(resume["timestamp"]) == {"seconds", "microseconds"}
            status = await client.execute("query-status")
            assert status["status"] == "running"
            with pytest.raises(ExecuteError) as info:
                await client.execute(
                    "qom-set", {"path": paths[0], "property": PROP, "value": {VHYP: 3}}
                )
            assert str(info.value).endswith(f"KVM_SET_ONE_REG {VHYP}=0x3 failed: EBUSY")
            await client.execute(
                "qom-set", {"path": paths[0], "property": PROP, "value": {VHYP: 1}}
            )
            waiter = asyncio.create_task(next_event(client, "SHUTDOWN"))
            await asyncio.sleep(0)
            await client.execute("quit")
            await waiter
            with contextlib.suppress(EOFError):
                await client.disconnect()

        arun(body())
        assert qemu.wait(10) == 0
        assert sim.wait(10) == 0
        assert not os.path.exists(sock)


def test_run_through_another_monitor_counts(sock: str) -> None:
    """libvirt resumes the vCPUs on its own monitor: the real RESUME still freezes bitmaps."""
    qsock, direct = sock + ".qemu", sock + ".libvirt"
    with real_qemu(qsock, direct), simulator_process(sock, "6.1", "--upstream", qsock):

        async def body() -> None:
            c = await RawQMP.open(sock)
            path = (await c.ok("query-cpus-fast"))[0]["qom-path"]
            args = {"path": path, "property": PROP, "value": {VHYP: 2}}
            assert "return" in await c.cmd("qom-set", args)
            libvirt = await RawQMP.open(direct)
            await libvirt.ok("cont")
            # The RESUME reaches our client through the simulator, as real QEMU's event.
            async with asyncio.timeout(5):
                while not any(e["event"] == "RESUME" for e in c.events):
                    await c.ok("query-status")
            args["value"] = {VHYP: 0}
            reply = await c.cmd("qom-set", args)
            assert reply["error"]["desc"].endswith("failed: EBUSY")
            await libvirt.close()
            await c.close()

        arun(body())


def test_qemu_going_away_ends_the_simulator(sock: str) -> None:
    qsock = sock + ".qemu"
    with real_qemu(qsock) as qemu, simulator_process(sock, "6.18", "--upstream", qsock) as sim:

        async def body() -> None:
            c = await RawQMP.open(sock)
            await c.ok("query-status")
            qemu.kill()
            assert await c.eof(10)

        arun(body())
        assert sim.wait(10) == 5
        assert sim.stderr is not None
        err = sim.stderr.read().decode()
        assert err.count("\n") == 1 and "upstream QEMU closed" in err


def test_has_run_override_with_upstream(sock: str) -> None:
    qsock = sock + ".qemu"
    with real_qemu(qsock), simulator_process(sock, "6.1", "--upstream", qsock, "--has-run", "yes"):

        async def body() -> None:
            c = await RawQMP.open(sock)
            assert (await c.ok("query-status"))["status"] == "prelaunch"
            path = (await c.ok("query-cpus-fast"))[0]["qom-path"]
            reply = await c.cmd("qom-set", {"path": path, "property": PROP, "value": {VHYP: 1}})
            assert reply["error"]["desc"].endswith("failed: EBUSY")
            await c.close()

        arun(body())


def test_resume_fault_resumes_the_real_qemu(sock: str) -> None:
    qsock = sock + ".qemu"
    with (
        real_qemu(qsock),
        simulator_process(sock, "6.18", "--upstream", qsock, "--fault", "resume@qom-set"),
    ):

        async def body() -> None:
            c = await RawQMP.open(sock)
            path = (await c.ok("query-cpus-fast"))[0]["qom-path"]
            reply = await c.cmd("qom-set", {"path": path, "property": PROP, "value": {VHYP: 1}})
            assert reply["error"]["desc"].endswith("failed: EBUSY")
            assert [e["event"] for e in c.events] == ["RESUME"]  # the real QEMU's event
            assert (await c.ok("query-status"))["status"] == "running"
            await c.close()

        arun(body())
