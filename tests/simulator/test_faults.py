"""Every --fault mode, as a client sees it. The apply-side tests build on these behaviours."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from hvcpolicy.errors import InvalidInput
from hvcpolicy.simulator.faults import KINDS, Faults, parse_fault
from hvcpolicy.simulator.harness import simulator
from tests.simulator.conftest import RawQMP, arun

CPU0 = "/machine/unattached/device[0]"
CPU1 = "/machine/unattached/device[1]"
PROP = "kvm-firmware-registers"
VHYP = "0x6030000000160002"
STD = "0x6030000000160000"
STD_HYP = "0x6030000000160001"


def qom_set(value: dict[str, int], path: str = CPU0) -> dict[str, Any]:
    return {"execute": "qom-set", "arguments": {"path": path, "property": PROP, "value": value}}


async def silent(c: RawQMP, seconds: float = 0.3) -> bool:
    """True when nothing arrives for ``seconds``."""
    try:
        await asyncio.wait_for(c.reader.read(65536), seconds)
    except TimeoutError:
        return True
    return False  # data, or the connection closed


def test_every_fault_kind_has_a_test() -> None:
    source = Path(__file__).read_text()
    missing = [name for name in KINDS if f'"{name}' not in source.replace("'", '"')]
    assert missing == []


def test_no_greeting(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=["no-greeting"]):
            c = await RawQMP.open(sock, negotiate=False)
            assert await silent(c)
            await c.send({"execute": "qmp_capabilities"})
            assert await silent(c)  # nothing is ever answered
            await c.close()
            client = QMPClient("t")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.connect(sock), 0.5)

    arun(body())


def test_hang_on_a_command(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=["hang@qom-set"]) as server:
            c = await RawQMP.open(sock)
            assert "return" in await c.cmd("query-status")
            await c.send(qom_set({VHYP: 1}))
            assert await silent(c)
            await c.send({"execute": "query-status"})
            assert await silent(c)  # a hung monitor answers nothing after it either
            assert server.vm.get(int(VHYP, 16)) == 3
            await c.close()
            # A qemu.qmp client sees its own bounded wait expire.
            client = QMPClient("t")
            await client.connect(sock)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(
                    client.execute("qom-set", qom_set({VHYP: 1})["arguments"]), 0.3
                )
            await client.disconnect()

    arun(body())


def test_hang_on_the_nth_occurrence(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=["hang@qom-get#2"]):
            c = await RawQMP.open(sock)
            args = {"path": CPU0, "property": PROP}
            assert "return" in await c.cmd("qom-get", args)
            await c.send({"execute": "qom-get", "arguments": args})
            assert await silent(c)
            await c.close()
            d = await RawQMP.open(sock)  # the third qom-get (another connection) is answered
            assert "return" in await d.cmd("qom-get", args)
            await d.close()

    arun(body())


def test_hang_without_command_hangs_negotiation(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=["hang"]):
            c = await RawQMP.open(sock, negotiate=False)
            assert "QMP" in await c.recv()
            await c.send({"execute": "qmp_capabilities"})
            assert await silent(c)
            await c.close()

    arun(body())


def test_drop_mid_write(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=["drop@qom-get"]):
            c = await RawQMP.open(sock)
            await c.send({"execute": "qom-get", "arguments": {"path": CPU0, "property": PROP}})
            data = await asyncio.wait_for(c.reader.read(), 3)  # to EOF
            assert data and not data.endswith(b"\n")
            with pytest.raises(json.JSONDecodeError):
                json.loads(data)
            assert data.startswith(b'{"return": {"0x60300000001400')
            await c.close()
            client = QMPClient("t")
            await client.connect(sock)
            with pytest.raises(Exception) as info:  # qemu.qmp: the connection went away
                await asyncio.wait_for(
                    client.execute("qom-get", {"path": CPU0, "property": PROP}), 3
                )
            assert not isinstance(info.value, TimeoutError)
            with pytest.raises(Exception):  # noqa: B017 - qemu.qmp re-raises the reader's error
                await client.disconnect()

    arun(body())


def test_error_on_a_command(sock: str) -> None:
    async def body() -> None:
        faults = ["error@cont", "error@qom-list=DeviceNotFound"]
        async with simulator(sock, "6.18", faults=faults) as server:
            c = await RawQMP.open(sock)
            reply = await c.cmd("cont", id=3)
            assert reply["id"] == 3 and reply["error"]["class"] == "GenericError"
            assert "simulated failure of cont" in reply["error"]["desc"]
            assert not server.vm.has_run
            assert c.events == []
            reply = await c.cmd("qom-list", {"path": CPU0})
            assert reply["error"]["class"] == "DeviceNotFound"
            assert (await c.ok("query-status"))["status"] == "prelaunch"
            await c.close()

    arun(body())


def test_slow_replies(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=["slow=0.3"]):
            t0 = time.monotonic()
            c = await RawQMP.open(sock)  # greeting and qmp_capabilities: two delays
            assert time.monotonic() - t0 >= 0.55
            t0 = time.monotonic()
            await c.ok("query-status")
            assert time.monotonic() - t0 >= 0.28
            await c.close()

    arun(body())


def test_slow_one_command(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=["slow@qom-set=0.4"]):
            t0 = time.monotonic()
            c = await RawQMP.open(sock)
            await c.ok("query-status")
            assert time.monotonic() - t0 < 0.4  # a delayed reply would take >= 0.4 s
            t0 = time.monotonic()
            await c.send(qom_set({VHYP: 1}))
            assert await silent(c, 0.2)
            assert "return" in await c.reply()
            assert time.monotonic() - t0 >= 0.38
            await c.close()

    arun(body())


def test_no_interface(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=["no-interface"]):
            c = await RawQMP.open(sock)
            props = await c.ok("qom-list", {"path": CPU0})
            names = {p["name"] for p in props}
            assert PROP not in names and "kvm-steal-time" in names
            reply = await c.cmd("qom-get", {"path": CPU0, "property": PROP})
            assert reply["error"] == {
                "class": "GenericError",
                "desc": f"Property 'host-arm-cpu.{PROP}' not found",
            }
            reply = await c.cmd("qom-set", qom_set({VHYP: 1})["arguments"])
            assert reply["error"]["class"] == "GenericError"
            await c.close()

    arun(body())


@pytest.mark.parametrize(("fault", "written"), [("partial-write", 1), ("partial-write=2", 2)])
def test_partial_write(fault: str, written: int, sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=[fault]) as server:
            vm = server.vm
            c = await RawQMP.open(sock)
            order = [STD, STD_HYP, VHYP]
            reply = await c.cmd("qom-set", qom_set({STD: 0, STD_HYP: 0, VHYP: 0})["arguments"])
            failed = order[written]
            assert reply["error"] == {
                "class": "GenericError",
                "desc": f"{PROP}: KVM_SET_ONE_REG {failed}=0x0 failed: EIO",
            }
            values = [vm.get(int(r, 16)) for r in order]
            assert values == [0] * written + [1, 1, 3][written:]
            await c.close()

    arun(body())


def test_malformed_reply(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=["malformed@query-status"]):
            c = await RawQMP.open(sock)
            await c.send({"execute": "query-status", "id": 1})
            line = await c.recv_line()
            assert line.endswith(b"\n")
            with pytest.raises(json.JSONDecodeError):
                json.loads(line)
            assert (await c.cmd("query-version", id=2))["id"] == 2
            await c.close()

    arun(body())


def test_truncated_reply(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=["truncated@qom-get"]):
            c = await RawQMP.open(sock)
            await c.send({"execute": "qom-get", "arguments": {"path": CPU0, "property": PROP}})
            line = await c.recv_line()
            assert line.startswith(b'{"return": {') and line.endswith(b"\r\n")
            with pytest.raises(json.JSONDecodeError):
                json.loads(line)
            assert "return" in await c.cmd("query-status")  # the connection stays up
            await c.close()

    arun(body())


def test_oversized_reply(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=["oversized@query-status=200000"]):
            c = await RawQMP.open(sock)
            await c.send({"execute": "query-status", "id": 5})
            line = await c.recv_line()
            assert len(line) > 200000
            msg = json.loads(line)
            assert msg["id"] == 5 and msg["return"]["status"] == "prelaunch"
            await c.close()
        async with simulator(sock, "6.18", faults=["oversized@query-status"]):
            # Default: 16 MiB, above qemu.qmp's 10 MB line limit.
            client = QMPClient("t")
            await client.connect(sock)
            with pytest.raises(Exception) as info:
                await asyncio.wait_for(client.execute("query-status"), 10)
            assert not isinstance(info.value, TimeoutError)
            with pytest.raises(Exception):  # noqa: B017 - qemu.qmp reports the read error
                await client.disconnect()

    arun(body())


def test_wrong_id_and_stray_reply(sock: str) -> None:
    async def body() -> None:
        faults = ["wrong-id@query-status", "stray-reply@query-version"]
        async with simulator(sock, "6.18", faults=faults):
            c = await RawQMP.open(sock)
            reply = await c.cmd("query-status", id="mine")
            assert reply["id"] != "mine" and "return" in reply
            await c.send({"execute": "query-version", "id": "v"})
            first, second = await c.reply(), await c.reply()
            assert first == {"return": {}, "id": "hvcpolicy-simulate-stray"}
            assert second["id"] == "v" and "qemu" in second["return"]
            await c.close()

    arun(body())


def test_reorder(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=["reorder@query-status#1"]):
            c = await RawQMP.open(sock)
            await c.send(b'{"execute":"query-status","id":1}{"execute":"query-version","id":2}')
            assert [(await c.reply())["id"] for _ in range(2)] == [2, 1]
            # Alone, a held reply still comes, late (<= 1 s): here not held (#1 only).
            assert (await c.cmd("query-status", id=3))["id"] == 3
            await c.close()
        async with simulator(sock, "6.18", faults=["reorder@query-status"]):
            c = await RawQMP.open(sock)
            t0 = time.monotonic()
            assert (await c.cmd("query-status", id=4))["id"] == 4
            assert time.monotonic() - t0 >= 0.9
            await c.close()

    arun(body())


@pytest.mark.parametrize(("fault", "stale"), [("vcpu-disagree", 2), ("vcpu-disagree=1", 1)])
def test_vcpus_disagree_after_a_write(fault: str, stale: int, sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", vcpus=3, faults=[fault]):
            c = await RawQMP.open(sock)
            assert "return" in await c.cmd("qom-set", qom_set({VHYP: 1})["arguments"])
            seen = []
            for i in range(3):
                path = f"/machine/unattached/device[{i}]"
                regs = await c.ok("qom-get", {"path": path, "property": PROP})
                seen.append(regs[VHYP])
            assert seen == [3 if i == stale else 1 for i in range(3)]
            await c.close()

    arun(body())


def test_exit_mid_apply(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=["exit@qom-set#2"]) as server:
            c = await RawQMP.open(sock)
            other = await RawQMP.open(sock)
            assert "return" in await c.cmd("qom-set", qom_set({VHYP: 1})["arguments"])
            await c.send(qom_set({STD: 0}))
            assert await c.eof()
            assert await other.eof()
            assert await asyncio.wait_for(server.wait(), 2) == 0
            await asyncio.sleep(0.05)
            assert os.path.exists(sock)  # a dead QEMU leaves its socket file
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_unix_connection(sock)

    arun(body())


@pytest.mark.parametrize(
    "spec",
    [
        "warp-drive",
        "slow",
        "slow=fast",
        "slow=-1",
        "no-greeting@qom-set",
        "hang=3",
        "hang@qom-set#0",
        "error=Generic Error",
        "partial-write@qom-set",
        "hang@",
        "",
    ],
)
def test_bad_fault_specs(spec: str) -> None:
    with pytest.raises(InvalidInput):
        parse_fault(spec)


def test_fault_spec_round_trip() -> None:
    faults = Faults.parse(["hang@qom-set#2", "slow=0.5", "error@cont=DeviceNotFound"])
    assert [str(f) for f in faults.faults] == [
        "hang@qom-set#2",
        "slow=0.5",
        "error@cont=DeviceNotFound",
    ]
    assert faults.global_slow() == 0.5


def test_bad_greeting(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=["bad-greeting"]):
            c = await RawQMP.open(sock, negotiate=False)
            greeting = await c.recv()
            assert "QMP" not in greeting
            await c.close()
            client = QMPClient("t")
            with pytest.raises(Exception) as info:  # qemu.qmp refuses the greeting
                await asyncio.wait_for(client.connect(sock), 3)
            assert not isinstance(info.value, TimeoutError)

    arun(body())


def test_resume_races_the_write(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=["resume@qom-set"]) as server:
            c = await RawQMP.open(sock)
            assert (await c.ok("query-status"))["status"] == "prelaunch"
            reply = await c.cmd("qom-set", qom_set({VHYP: 1})["arguments"])
            assert reply["error"]["desc"].endswith(f"{VHYP}=0x1 failed: EBUSY")
            assert [e["event"] for e in c.events] == ["RESUME"]  # the event came first
            assert server.vm.has_run and server.vm.get(int(VHYP, 16)) == 3
            assert (await c.ok("query-status"))["status"] == "running"
            await c.close()

    arun(body())


def test_one_client_at_a_time(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", faults=["one-client"]):
            first = await RawQMP.open(sock)
            second = await RawQMP.open(sock, negotiate=False)  # the kernel accepts it ...
            assert await silent(second)  # ... but no greeting while the first is there
            await first.ok("query-status")
            await first.close()
            assert "QMP" in await second.recv()
            await second.send({"execute": "qmp_capabilities"})
            assert await second.reply() == {"return": {}}
            await second.close()

    arun(body())
