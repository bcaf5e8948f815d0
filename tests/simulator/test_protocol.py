"""QEMU-like QMP behaviour of the simulator, checked with a raw client (bytes on the wire)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from hvcpolicy.simulator.harness import simulator
from tests.simulator.conftest import RawQMP, arun

CPU0 = "/machine/unattached/device[0]"
PROP = "kvm-firmware-registers"


def test_greeting_and_negotiation(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.1"):
            c = await RawQMP.open(sock, negotiate=False)
            greeting = await c.recv()
            assert set(greeting["QMP"]) == {"version", "capabilities"}
            assert greeting["QMP"]["capabilities"] == ["oob"]
            assert set(greeting["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}
            # Before qmp_capabilities every other command is CommandNotFound, id echoed.
            for name in ("query-status", "nope", "quit"):
                reply = await c.cmd(name, id=7)
                assert reply["id"] == 7
                assert reply["error"]["class"] == "CommandNotFound"
            assert await c.cmd("qmp_capabilities", {"enable": ["oob"]}, id="n") == {
                "return": {},
                "id": "n",
            }
            again = await c.cmd("qmp_capabilities")
            assert again["error"]["class"] == "CommandNotFound"
            assert (await c.cmd("query-status"))["return"]["status"] == "prelaunch"
            await c.close()

    arun(body())


def test_bad_capability(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.1"):
            c = await RawQMP.open(sock, negotiate=False)
            await c.recv()
            reply = await c.cmd("qmp_capabilities", {"enable": ["warp"]})
            assert reply["error"]["class"] == "GenericError"
            assert (await c.cmd("query-status"))["error"]["class"] == "CommandNotFound"
            await c.close()

    arun(body())


@pytest.mark.parametrize(
    "ident", [1, "x", {"a": [1, None]}, [1, 2], None, True, 1.5, "ü\u2603"], ids=repr
)
def test_id_echoed_verbatim(ident: Any, sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.1"):
            c = await RawQMP.open(sock)
            assert (await c.cmd("query-version", id=ident))["id"] == ident
            assert (await c.cmd("no-such-command", id=ident))["id"] == ident
            assert (await c.cmd("qom-get", {"path": CPU0}, id=ident))["id"] == ident
            await c.close()

    arun(body())


def test_stream_is_json_not_lines(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.1"):
            c = await RawQMP.open(sock)
            # One message in three writes, no newline anywhere.
            for part in (b'{"execute": "query-st', b'atus", "id"', b": 1}"):
                await c.send(part)
                await asyncio.sleep(0.01)
            assert (await c.reply())["id"] == 1
            # Three messages in one write, one with a brace inside a string.
            await c.send(
                b'{"execute":"query-version","id":2}{"execute":"qom-list",'
                b'"arguments":{"path":"/machine/unattached/device[0]"},"id":"}{"}'
                b'  \r\n{"execute":"query-kvm","id":3}'
            )
            ids = [(await c.reply())["id"] for _ in range(3)]
            assert ids == [2, "}{", 3]
            await c.close()

    arun(body())


@pytest.mark.parametrize(
    ("raw", "desc"),
    [
        (b"[1]", "QMP input must be a JSON object"),
        (b'{"foo": 1}', "QMP input member 'foo' is unexpected"),
        (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
        (b'{"execute": "query-status", "arguments": []}', "member 'arguments' must be an object"),
        (b'{"id": 4}', "QMP input lacks member 'execute'"),
        (b"{bad json}", "JSON parse error"),
        (b'{"exec-oob": "query-status"}', "QMP input member 'exec-oob' is unexpected"),
    ],
)
def test_malformed_input_is_generic_error(raw: bytes, desc: str, sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.1"):
            c = await RawQMP.open(sock)
            await c.send(raw)
            reply = await c.reply()
            assert reply["error"]["class"] == "GenericError"
            assert desc in reply["error"]["desc"]
            # The connection survives.
            assert (await c.cmd("query-status", id=9))["id"] == 9
            await c.close()

    arun(body())


def test_unknown_command_and_bad_arguments(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.1"):
            c = await RawQMP.open(sock)
            assert (await c.cmd("human-monitor-command-x"))["error"] == {
                "class": "CommandNotFound",
                "desc": "The command human-monitor-command-x has not been found",
            }
            cases: list[tuple[str, dict[str, Any], str]] = [
                ("query-status", {"x": 1}, "Parameter 'x' is unexpected"),
                ("qom-get", {"path": CPU0}, "Parameter 'property' is missing"),
                ("qom-list", {"path": 5}, "Invalid parameter type for 'path', expected: string"),
                ("qom-set", {"path": CPU0, "property": PROP}, "Parameter 'value' is missing"),
            ]
            for name, args, desc in cases:
                reply = await c.cmd(name, args)
                assert reply["error"] == {"class": "GenericError", "desc": desc}
            missing = await c.cmd("qom-list", {"path": "/machine/peripheral/nothing"})
            assert missing["error"]["class"] == "DeviceNotFound"
            prop = await c.cmd("qom-get", {"path": CPU0, "property": "nope"})
            assert prop["error"] == {
                "class": "GenericError",
                "desc": "Property 'host-arm-cpu.nope' not found",
            }
            ro = await c.cmd("qom-set", {"path": CPU0, "property": "realized", "value": False})
            assert ro["error"]["class"] == "GenericError"
            assert (await c.ok("qom-get", {"path": CPU0, "property": "realized"})) is True
            await c.close()

    arun(body())


def test_qom_interface(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", vcpus=3):
            c = await RawQMP.open(sock)
            cpus = await c.ok("query-cpus-fast")
            assert [x["cpu-index"] for x in cpus] == [0, 1, 2]
            for cpu in cpus:
                assert set(cpu) == {"cpu-index", "qom-path", "thread-id", "props", "target"}
                assert cpu["target"] == "aarch64"
                props = await c.ok("qom-list", {"path": cpu["qom-path"]})
                assert {"name": PROP, "type": "any"} in props
                regs = await c.ok("qom-get", {"path": cpu["qom-path"], "property": PROP})
                assert all(len(k) == 18 and k == k.lower() for k in regs)
                assert all(isinstance(v, int) for v in regs.values())
            machine = await c.ok("qom-list", {"path": "/machine"})
            assert PROP not in {p["name"] for p in machine}
            await c.close()

    arun(body())


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ([1], "expected an object"),
        ({"0x6030000000160002": "0x1"}, "must be an integer"),
        ({"0x6030000000160002": True}, "must be an integer"),
        ({"0x6030000000160002": -1}, "must be an integer"),
        ({"0x6030000000160002": 1 << 64}, "must be an integer"),
        ({"0x6030000000160002": 1.0}, "must be an integer"),
        ({"0X6030000000160002": 1}, "not a register id"),
        ({"6030000000160002": 1}, "not a register id"),
        ({"0x6030000000150002": 1}, "not a firmware register"),
        ({"0x6030000000160002": 1, "0x60300000001600": 1}, "not a register id"),
    ],
)
def test_bad_register_values_write_nothing(value: Any, fragment: str, sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18") as server:
            c = await RawQMP.open(sock)
            reply = await c.cmd("qom-set", {"path": CPU0, "property": PROP, "value": value})
            assert reply["error"]["class"] == "GenericError"
            assert reply["error"]["desc"].startswith(f"{PROP}: ")
            assert fragment in reply["error"]["desc"]
            assert server.vm.get(0x6030000000160002) == 0x3
            await c.close()

    arun(body())


def _event_names(c: RawQMP) -> list[str]:
    return [e["event"] for e in c.events]


def test_events_and_runstates(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.1") as server:
            a = await RawQMP.open(sock)
            b = await RawQMP.open(sock)
            idle = await RawQMP.open(sock, negotiate=False)
            await idle.recv()  # greeting only: must get no events
            assert await a.ok("query-status") == {
                "status": "prelaunch",
                "singlestep": False,
                "running": False,
            }
            assert await a.ok("stop") == {}  # stop in prelaunch: nothing happens (QEMU 7.2)
            assert (await a.ok("query-status"))["status"] == "prelaunch"
            assert not server.vm.has_run
            await a.send({"execute": "cont", "id": 1})
            reply = await a.reply()
            assert reply == {"return": {}, "id": 1}
            assert _event_names(a) == ["RESUME"]  # the event comes before the reply
            ev = a.events[0]
            assert ev["data"] == {} and set(ev["timestamp"]) == {"seconds", "microseconds"}
            assert server.vm.has_run
            assert (await a.ok("query-status"))["running"] is True
            assert await a.ok("cont") == {}  # already running: no second RESUME
            await a.ok("stop")
            assert (await a.ok("query-status")) == {
                "status": "paused",
                "singlestep": False,
                "running": False,
            }
            await a.ok("stop")  # already paused: no second STOP
            assert _event_names(a) == ["RESUME", "STOP"]
            await b.ok("query-status")  # b saw the same events
            assert _event_names(b) == ["RESUME", "STOP"]
            await a.send({"execute": "quit", "id": "q"})
            assert (await a.reply())["id"] == "q"
            assert _event_names(a)[-1] == "SHUTDOWN"
            assert a.events[-1]["data"] == {"guest": False, "reason": "host-qmp-quit"}
            assert await a.eof()
            assert await b.eof()
            assert not await idle.reader.read(65536)  # closed, and no events were sent to it
            await asyncio.wait_for(server.wait(), 2)

    arun(body())


@pytest.mark.parametrize(
    ("runstate", "status", "ran"),
    [
        ("prelaunch", "prelaunch", False),
        ("running", "running", True),
        ("paused", "paused", True),
        ("restored", "paused", False),
        ("inmigrate", "inmigrate", False),
    ],
)
def test_initial_runstate(runstate: str, status: str, ran: bool, sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.1", runstate=runstate) as server:
            c = await RawQMP.open(sock)
            assert (await c.ok("query-status"))["status"] == status
            # A bitmap change is refused exactly when the VM has run.
            reply = await c.cmd(
                "qom-set", {"path": CPU0, "property": PROP, "value": {"0x6030000000160002": 1}}
            )
            assert ("error" in reply) == ran
            if ran:
                assert reply["error"]["desc"].endswith("failed: EBUSY")
            await c.ok("cont")
            assert (await c.ok("query-status"))["status"] == "running"
            assert _event_names(c) == ([] if runstate == "running" else ["RESUME"])
            assert server.vm.has_run
            await c.close()

    arun(body())


def test_inmigrate_stop_then_cont(sock: str) -> None:
    """QEMU: stop during inmigrate only clears autostart; the simulator's cont completes it."""

    async def body() -> None:
        async with simulator(sock, "6.18", runstate="inmigrate"):
            c = await RawQMP.open(sock)
            await c.ok("stop")
            assert (await c.ok("query-status"))["status"] == "inmigrate"
            assert c.events == []
            await c.ok("cont")
            assert _event_names(c) == ["RESUME"]
            await c.close()

    arun(body())


def test_replies_end_with_newline_and_are_single_lines(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", vcpus=2):
            c = await RawQMP.open(sock, negotiate=False)
            line = await c.recv_line()
            assert line.endswith(b"\r\n") and b"\n" not in line[:-1]
            await c.send({"execute": "qmp_capabilities"})
            await c.send({"execute": "qom-get", "arguments": {"path": CPU0, "property": PROP}})
            await c.recv_line()
            line = await c.recv_line()
            assert json.loads(line)["return"]["0x6030000000160003"] == 0
            await c.close()

    arun(body())


@pytest.mark.parametrize(
    "garbage",
    [
        b"[" * 5000 + b"]" * 5000,
        b'{"execute": ' + b"[" * 990 + b"]" * 990 + b"}",
        b'{"execute": "query-status", "id": "\xff\xfe"}',
        b"}}}]]]",
        b'"just a string" 12 null true',
        b'{"execute": "qom-list", "arguments": {"path": ["a"]}}',
        b'{"execute": "qom-get", "arguments": {"path": {}, "property": 1}}',
        b'{"execute": "query-status", "arguments": {}, "id": NaN}',
        b"\x00\x01\x02",
    ],
)
def test_garbage_never_kills_the_connection(garbage: bytes, sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18"):
            c = await RawQMP.open(sock)
            await c.send(garbage)
            await c.send({"execute": "query-status", "id": "after"})
            while True:
                reply = await c.reply()
                if reply.get("id") == "after":
                    break
                assert reply["error"]["class"] == "GenericError"
                assert "internal error" not in reply["error"]["desc"]
            assert reply["return"]["status"] == "prelaunch"
            await c.close()

    arun(body())


@pytest.mark.parametrize(
    ("runstate", "has_run"), [("paused", False), ("prelaunch", True), ("running", False)]
)
def test_has_run_override(runstate: str, has_run: bool, sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18", runstate=runstate, has_run=has_run) as server:
            assert server.vm.has_run is has_run
            c = await RawQMP.open(sock)
            assert (await c.ok("query-status"))["status"] == runstate
            value = {"0x6030000000160002": 0}
            reply = await c.cmd("qom-set", {"path": CPU0, "property": PROP, "value": value})
            assert ("error" in reply) is has_run
            await c.close()

    arun(body())
