"""The QMP client against hand-made QMP servers: bounds, error context, pipelining, parsing.

The servers run on an event loop of their own, in a background thread: the client is
synchronous and owns its loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hvcpolicy.errors import QMPError, QMPTimeout
from hvcpolicy.qmp import PROPERTY, QMP, VCPU, parse_registers, registers_argument

GREETING = {"QMP": {"version": {"qemu": {"major": 9, "minor": 0, "micro": 0}}, "capabilities": []}}
PSCI, STD, VENDOR = 0x6030000000140000, 0x6030000000160000, 0x6030000000160002

Handler = Callable[[dict[str, Any], asyncio.StreamWriter], Awaitable[None]]


def send(writer: asyncio.StreamWriter, msg: object) -> None:
    writer.write(json.dumps(msg).encode() + b"\r\n")


async def serve(path: Path, handler: Handler | None, greet: bool = True) -> asyncio.Server:
    """A QMP server: greeting, negotiation, then ``handler`` for every other command."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if greet:
            send(writer, GREETING)
        decoder, buf = json.JSONDecoder(), ""
        try:
            while data := await reader.read(65536):  # a JSON stream: no newline between messages
                buf += data.decode()
                while buf.strip():
                    try:
                        msg, end = decoder.raw_decode(buf.lstrip())
                    except json.JSONDecodeError:
                        break
                    buf = buf.lstrip()[end:]
                    if msg["execute"] == "qmp_capabilities":
                        send(writer, {"return": {}, "id": msg.get("id")})
                    elif handler is not None:
                        await handler(msg, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass

    return await asyncio.start_unix_server(client, str(path))


@contextlib.contextmanager
def served(path: Path, handler: Handler | None, greet: bool = True) -> Iterator[None]:
    """``serve`` on a background thread's event loop for the length of the block."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(serve(path, handler, greet), loop).result(5)
    try:
        yield
    finally:

        async def stop() -> None:
            server.close()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def reply(msg: dict[str, Any], value: object) -> dict[str, Any]:
    return {"return": value, "id": msg["id"]}


def test_missing_socket_is_retried_within_the_timeout(sockdir: Path) -> None:
    start = time.monotonic()
    with (
        pytest.raises(QMPError, match=r"absent\.qmp: cannot connect: No such file"),
        QMP(str(sockdir / "absent.qmp"), 0.5),
    ):
        pass
    assert 0.4 < time.monotonic() - start < 1.5


def test_a_socket_that_appears_late_is_connected(sockdir: Path) -> None:
    """QEMU (or a proxy in front of it) may still be creating the socket."""

    async def status(msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        if msg["execute"] == "query-cpus-fast":  # asked with the first query-status
            send(writer, reply(msg, [{"cpu-index": 0, "qom-path": "/cpu0"}]))
        else:
            send(writer, reply(msg, {"status": "prelaunch"}))

    def later() -> None:
        time.sleep(0.3)
        with served(sockdir / "s", status):
            time.sleep(1.5)

    thread = threading.Thread(target=later)
    thread.start()
    try:
        with QMP(str(sockdir / "s"), 1.0) as qmp:
            assert qmp.runstate() == "prelaunch"
    finally:
        thread.join()


def test_no_greeting_is_bounded(sockdir: Path) -> None:
    with served(sockdir / "s", None, greet=False):
        start = time.monotonic()
        with pytest.raises(QMPTimeout) as ei, QMP(str(sockdir / "s"), 0.5):
            pass
        elapsed = time.monotonic() - start
    assert "no QMP greeting" in str(ei.value) and "0.5 s" in str(ei.value)
    assert 0.45 < elapsed < 1.5


def test_command_timeout_carries_what_was_sent(sockdir: Path) -> None:
    async def silent(msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        return None  # never answers

    with served(sockdir / "s", silent), QMP(str(sockdir / "s"), 0.4) as qmp:
        start = time.monotonic()
        with pytest.raises(QMPTimeout) as ei:
            qmp.runstate()
        assert time.monotonic() - start < 1.0
    err = ei.value
    assert err.sent == {"execute": "query-status"}
    assert err.received is None
    assert "no answer to 'query-status' within 0.4 s" in str(err)
    assert err.exit_code == 5


def test_reads_are_pipelined(sockdir: Path) -> None:
    """The server answers nothing until it holds every vCPU's qom-get: a client that waits for
    one answer before asking the next would time out here."""
    n = 16
    held: list[dict[str, Any]] = []

    async def batch(msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        assert msg["execute"] == "qom-get" and msg["arguments"]["property"] == PROPERTY
        held.append(msg)
        if len(held) == n:
            for m in reversed(held):  # out of order, too: ids route them
                index = int(m["arguments"]["path"].rsplit("[", 1)[1].rstrip("]"))
                send(writer, reply(m, {f"0x{PSCI:016x}": 0x10000 + index}))

    with served(sockdir / "s", batch), QMP(str(sockdir / "s"), 2.0) as qmp:
        vcpus = [VCPU(i, f"/machine/unattached/device[{i}]") for i in range(n)]
        result = qmp.read_registers(vcpus)
    assert result == [{PSCI: 0x10000 + i} for i in range(n)]


def test_write_sends_ordered_ids_and_reports_the_refusal(sockdir: Path) -> None:
    seen: list[dict[str, Any]] = []

    async def refuse(msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        seen.append(msg)
        desc = f"{PROPERTY}: KVM_SET_ONE_REG 0x{VENDOR:016x}=0x4 failed: EINVAL"
        send(writer, {"error": {"class": "GenericError", "desc": desc}, "id": msg["id"]})

    async def refuse_writes(msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        if msg["execute"] == "query-cpus-fast":
            send(writer, reply(msg, [{"cpu-index": 0, "qom-path": "/cpu0"}]))
        elif msg["execute"] == "qom-list":
            send(writer, reply(msg, [{"name": PROPERTY, "type": "any"}]))
        else:
            await refuse(msg, writer)

    with (
        served(sockdir / "s", refuse_writes),
        QMP(str(sockdir / "s"), 1.0) as qmp,
        pytest.raises(QMPError) as ei,
    ):
        qmp.write({VENDOR: 0x4, STD: 0, PSCI: 1})
    err = ei.value
    value = seen[0]["arguments"]["value"]
    assert list(value.items()) == [
        ("0x6030000000160002", 4),
        ("0x6030000000160000", 0),
        ("0x6030000000140000", 1),
    ]
    assert err.error_class == "GenericError"
    assert isinstance(err.sent, dict) and err.sent["arguments"]["value"] == value
    assert isinstance(err.received, dict) and "EINVAL" in err.received["error"]["desc"]
    text = str(err)
    assert "VENDOR_HYP_BMAP (0x6030000000160002)=0x4" in text
    assert "EINVAL" in text and "vCPU 0" in text


def test_hangup_mid_reply(sockdir: Path) -> None:
    async def drop(msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(reply(msg, {"status": "prelaunch"})).encode()[:10])
        await writer.drain()
        writer.close()

    start = time.monotonic()
    with (
        served(sockdir / "s", drop),
        QMP(str(sockdir / "s"), 2.0) as qmp,
        pytest.raises(QMPError, match="connection lost waiting for 'query-status'") as ei,
    ):
        qmp.runstate()
    assert not isinstance(ei.value, QMPTimeout)
    assert time.monotonic() - start < 2.0


def test_empty_vcpu_list_is_an_error(sockdir: Path) -> None:
    async def none(msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        send(writer, reply(msg, []))

    with (
        served(sockdir / "s", none),
        QMP(str(sockdir / "s"), 1.0) as qmp,
        pytest.raises(QMPError, match="lists no vCPU") as ei,
    ):
        qmp.vcpus()
    assert ei.value.received == []


@pytest.mark.parametrize(
    ("value", "fault"),
    [
        ([1, 2], "is not an object"),
        ({"0x6030000000130000": 1}, "not a firmware register id"),
        ({"psci": 1}, "not a firmware register id"),
        ({"0x6030000000140000": "0x1"}, "not a u64"),
        ({"0x6030000000140000": True}, "not a u64"),
        ({"0x6030000000140000": -1}, "not a u64"),
        ({"0x6030000000140000": 1 << 64}, "not a u64"),
    ],
)
def test_malformed_register_answers(value: object, fault: str) -> None:
    with pytest.raises(QMPError, match=fault) as ei:
        parse_registers(value, "vCPU 0")
    assert ei.value.received == value


def test_register_round_trip() -> None:
    values = {VENDOR: 0x1, PSCI: 0x10001, STD: (1 << 64) - 1}
    wire = json.loads(json.dumps(registers_argument(values)))
    assert list(wire) == ["0x6030000000160002", "0x6030000000140000", "0x6030000000160000"]
    assert parse_registers(wire, "x") == values
    assert parse_registers({str(PSCI): 2}, "x") == {PSCI: 2}  # decimal keys tolerated
