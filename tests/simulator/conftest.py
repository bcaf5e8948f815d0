"""Shared helpers for the simulator tests: short socket paths, a raw QMP client, bounded runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

TIMEOUT = 20.0


def arun(coro: Coroutine[Any, Any, Any], timeout: float = TIMEOUT) -> Any:
    """Run one test body in a fresh event loop, bounded."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture
def sock() -> Iterator[str]:
    """A socket path short enough for sun_path (pytest's tmp_path can exceed 107 bytes)."""
    d = tempfile.mkdtemp(prefix="hvcsim", dir="/tmp")
    try:
        yield str(Path(d) / "qmp.sock")
    finally:
        shutil.rmtree(d, ignore_errors=True)


class RawQMP:
    """A deliberately dumb client: bytes in, one JSON message per line out, every read bounded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, path: str, negotiate: bool = True) -> RawQMP:
        reader, writer = await asyncio.open_unix_connection(path, limit=64 << 20)
        client = cls(reader, writer)
        if negotiate:
            greeting = await client.recv()
            assert "QMP" in greeting
            reply = await client.cmd("qmp_capabilities")
            assert reply == {"return": {}}
        return client

    async def send(self, msg: dict[str, Any] | bytes) -> None:
        self.writer.write(msg if isinstance(msg, bytes) else json.dumps(msg).encode())
        await self.writer.drain()

    async def recv_line(self, timeout: float = 3.0) -> bytes:
        return await asyncio.wait_for(self.reader.readline(), timeout)

    async def recv(self, timeout: float = 3.0) -> dict[str, Any]:
        line = await self.recv_line(timeout)
        if not line:
            raise EOFError
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg

    async def reply(self, timeout: float = 3.0) -> dict[str, Any]:
        """The next non-event message; events are kept in ``self.events``."""
        while True:
            msg = await self.recv(timeout)
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    async def cmd(
        self, name: str, args: dict[str, Any] | None = None, **extra: Any
    ) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": name, **extra}
        if args is not None:
            msg["arguments"] = args
        await self.send(msg)
        return await self.reply()

    async def ok(self, name: str, args: dict[str, Any] | None = None) -> Any:
        reply = await self.cmd(name, args)
        assert "return" in reply, reply
        return reply["return"]

    async def eof(self, timeout: float = 3.0) -> bool:
        """True when the server closed the connection (after any data still in flight)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except (ConnectionError, OSError):
            return True
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 2)
