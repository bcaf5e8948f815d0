"""Talking QMP to QEMU: the firmware-register interface of SPEC §8, and nothing else.

One :class:`QMP` object is one connection, built on ``qemu.qmp``'s asyncio ``QMPClient`` (not its
GPL-only ``legacy`` module). Every wait — connect, greeting, negotiation, each command, disconnect —
is bounded by ``timeout`` seconds (default 5). Every failure is raised as one of
:class:`~hvcpolicy.errors.QMPError` (the exchange failed; carries ``sent`` and ``received``),
:class:`~hvcpolicy.errors.QMPTimeout` (a bounded wait ran out) or
:class:`~hvcpolicy.errors.InterfaceMissing` (no ``kvm-firmware-registers`` property), all exit 5.

Reading the registers of many vCPUs is pipelined: every ``qom-get`` is in flight at once, so the
cost is one round trip plus QEMU's work, not one round trip per vCPU.

``qemu.qmp`` (and with it most of asyncio) is imported only when a connection is opened.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hvcpolicy.catalogue import U64_MAX, fmt_id, fmt_value, is_firmware_reg, reg_name
from hvcpolicy.errors import InterfaceMissing, QMPError, QMPTimeout, bounded
from hvcpolicy.record import Record

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

DEFAULT_TIMEOUT = 5.0
CLOSE_TIMEOUT = 1.0  # a local close; never worth the whole timeout
PROPERTY = "kvm-firmware-registers"
WRITABLE_RUNSTATES = frozenset({"prelaunch", "inmigrate"})

Registers = dict[int, int]


class VCPU(Record):
    """One vCPU as ``query-cpus-fast`` lists it: its cpu-index and QOM path."""

    __slots__ = ("index", "qom_path")

    def __init__(self, index: int, qom_path: str) -> None:
        self.index = index
        self.qom_path = qom_path


def _plain(obj: object) -> object:
    """A JSON-able copy of a qemu.qmp Message (or anything) for error context."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _seconds(value: float) -> str:
    return f"{value:g} s"


def parse_registers(value: object, where: str) -> Registers:
    """The ``qom-get`` answer of ``kvm-firmware-registers`` -> {register id: value}.

    Ids are JSON object keys: ``0x``-hex (the documented form) or decimal strings. Values are
    integers in u64 range. Anything else is a malformed answer (QMPError naming ``where``).
    """
    if not isinstance(value, Mapping):
        raise QMPError(
            f"{where}: {PROPERTY} is not an object: {bounded(repr(value))}", received=value
        )
    regs: Registers = {}
    for key, val in value.items():
        rid: int | None
        try:
            rid = int(key, 0) if isinstance(key, str) else None
        except ValueError:
            rid = None
        if rid is None or not is_firmware_reg(rid):
            raise QMPError(
                f"{where}: {PROPERTY} names {bounded(repr(key))}, not a firmware register id",
                received=value,
            )
        if isinstance(val, bool) or not isinstance(val, int) or not 0 <= val <= U64_MAX:
            raise QMPError(
                f"{where}: {PROPERTY} gives {reg_name(rid)} the value {bounded(repr(val))}, "
                "not a u64",
                received=value,
            )
        regs[rid] = val
    return regs


def registers_argument(values: Mapping[int, int]) -> dict[str, int]:
    """{register id: value} -> the ``qom-set`` value object, ids as ``0x`` + 16 hex digits."""
    return {fmt_id(rid): val for rid, val in values.items()}


class QMP:
    """One QMP connection to a QEMU (or ``hvcpolicy simulate``) at a UNIX socket path.

    Use as ``async with QMP(path, timeout) as qmp: ...``; or ``await connect()`` / ``close()``.
    """

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self.address = address
        self.timeout = timeout
        self._client: QMPClient | None = None

    # -- connection ------------------------------------------------------------------------------

    async def connect(self) -> None:
        from qemu.qmp import QMPClient  # heavy: only when a connection is really opened
        from qemu.qmp import QMPError as LibError

        from hvcpolicy.trust import check_qmp_socket

        where = f"QMP socket {self.address}"
        try:
            check_qmp_socket(self.address)
        except FileNotFoundError:
            raise QMPError(f"{where}: cannot connect: No such file or directory") from None
        client = QMPClient("hvcpolicy")
        try:
            await asyncio.wait_for(client.connect(self.address), self.timeout)
        except TimeoutError:
            await self._abandon(client)
            raise QMPTimeout(
                f"{where}: no QMP greeting and negotiation within {_seconds(self.timeout)}"
            ) from None
        except LibError as err:
            await self._abandon(client)
            raise QMPError(f"{where}: cannot connect: {_connect_failure(err)}") from err
        except OSError as err:
            await self._abandon(client)
            raise QMPError(f"{where}: cannot connect: {_describe(err)}") from err
        except AssertionError:
            # qemu.qmp asserts its own state when the server garbles or hangs up during the
            # negotiation; what its reader received is the reason (and retrieving it here keeps
            # its "exception was never retrieved" traceback off stderr).
            failure = _reader_failure(client)
            await self._abandon(client)
            raise QMPError(
                f"{where}: cannot connect: QMP capabilities negotiation failed "
                f"({_describe(failure) if failure is not None else 'the server hung up'})",
                received=_received(failure),
            ) from None
        self._client = client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await self._abandon(client)

    async def _abandon(self, client: QMPClient) -> None:
        """Disconnect, bounded, ignoring whatever broke the session (it is already reported)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), min(self.timeout, CLOSE_TIMEOUT))

    async def __aenter__(self) -> QMP:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- commands --------------------------------------------------------------------------------

    async def command(self, name: str, arguments: Mapping[str, object] | None = None) -> object:
        """Execute one QMP command within the timeout; its ``return`` value."""
        from qemu.qmp import ExecInterruptedError, ExecuteError
        from qemu.qmp import QMPError as LibError

        sent: dict[str, object] = {"execute": name}
        if arguments is not None:
            sent["arguments"] = dict(arguments)
        if self._client is None:
            raise QMPError(f"QMP socket {self.address}: not connected", sent=sent)
        client = self._client
        try:
            return await asyncio.wait_for(client.execute(name, arguments), self.timeout)
        except TimeoutError:
            raise QMPTimeout(
                f"QMP socket {self.address}: no answer to {name!r} within {_seconds(self.timeout)}",
                sent=sent,
            ) from None
        except ExecuteError as err:
            raise QMPError(
                f"QMP socket {self.address}: {name!r} failed: {err.error_class}: "
                f"{bounded(str(err))}",
                sent=_plain(err.sent),
                received=_plain(err.received),
                error_class=err.error_class,
            ) from err
        except ExecInterruptedError as err:
            raise QMPError(
                f"QMP socket {self.address}: connection lost waiting for {name!r}"
                f"{self._why_lost()}",
                sent=sent,
            ) from err
        except LibError as err:  # BadReplyError, StateError, ...
            received = _plain(getattr(err, "msg", None))
            raise QMPError(
                f"QMP socket {self.address}: {name!r}: {_describe(err)}",
                sent=sent,
                received=received,
            ) from err

    def _why_lost(self) -> str:
        """What ended the session, if the reader saw it (EOF, garbage from the server, ...)."""
        exc = _reader_failure(self._client)
        return f" ({_describe(exc)})" if exc is not None else ""

    # -- the §8 interface ------------------------------------------------------------------------

    async def runstate(self) -> str:
        reply = await self.command("query-status")
        status = reply.get("status") if isinstance(reply, Mapping) else None
        if not isinstance(status, str):
            raise QMPError(
                f"QMP socket {self.address}: query-status answered no status",
                sent={"execute": "query-status"},
                received=_plain(reply),
            )
        return status

    async def vcpus(self) -> list[VCPU]:
        """Every vCPU, ordered by cpu-index; QMPError when QEMU lists none."""
        reply = await self.command("query-cpus-fast")
        sent = {"execute": "query-cpus-fast"}
        if not isinstance(reply, list):
            raise QMPError(
                f"QMP socket {self.address}: query-cpus-fast answered no list",
                sent=sent,
                received=_plain(reply),
            )
        cpus: list[VCPU] = []
        for i, item in enumerate(reply):
            path = item.get("qom-path") if isinstance(item, Mapping) else None
            index = item.get("cpu-index", i) if isinstance(item, Mapping) else None
            if not isinstance(path, str) or not isinstance(index, int):
                raise QMPError(
                    f"QMP socket {self.address}: query-cpus-fast entry {i} has no qom-path",
                    sent=sent,
                    received=_plain(reply),
                )
            cpus.append(VCPU(index, path))
        if not cpus:
            raise QMPError(
                f"QMP socket {self.address}: query-cpus-fast lists no vCPU",
                sent=sent,
                received=_plain(reply),
            )
        cpus.sort(key=lambda c: c.index)
        return cpus

    async def has_interface(self, vcpu: VCPU) -> bool:
        """Whether the vCPU object has the ``kvm-firmware-registers`` property (``qom-list``)."""
        reply = await self.command("qom-list", {"path": vcpu.qom_path})
        if not isinstance(reply, list):
            raise QMPError(
                f"QMP socket {self.address}: qom-list {vcpu.qom_path} answered no list",
                sent={"execute": "qom-list", "arguments": {"path": vcpu.qom_path}},
                received=_plain(reply),
            )
        return any(isinstance(p, Mapping) and p.get("name") == PROPERTY for p in reply)

    async def require_interface(self, vcpu: VCPU) -> None:
        if not await self.has_interface(vcpu):
            raise InterfaceMissing(
                f"QMP socket {self.address}: this QEMU lacks the firmware-register interface "
                f"(vCPU {vcpu.qom_path} has no {PROPERTY!r} property)"
            )

    async def read_registers(self, vcpu: VCPU) -> Registers:
        reply = await self.command("qom-get", {"path": vcpu.qom_path, "property": PROPERTY})
        try:
            return parse_registers(reply, f"QMP socket {self.address}: vCPU {vcpu.index}")
        except QMPError as err:
            err.sent = {
                "execute": "qom-get",
                "arguments": {"path": vcpu.qom_path, "property": PROPERTY},
            }
            raise

    async def read_registers_all(self, vcpus: Sequence[VCPU]) -> list[Registers]:
        """The registers as every vCPU reads them, in the order given; all requests in flight
        at once. The first failure is raised once every request has ended (none left pending)."""
        results = await asyncio.gather(
            *(self.read_registers(v) for v in vcpus), return_exceptions=True
        )
        out: list[Registers] = []
        for res in results:
            if isinstance(res, BaseException):
                raise res
            out.append(res)
        return out

    async def write_registers(self, vcpu: VCPU, values: Mapping[int, int]) -> None:
        """One ``qom-set`` of ``values`` in their order; QEMU stops at the first the kernel
        refuses and answers an error naming register, value and errno."""
        if not values:
            return
        what = f"writing {_listing(values.items())} through vCPU {vcpu.index}"
        try:
            await self.command(
                "qom-set",
                {"path": vcpu.qom_path, "property": PROPERTY, "value": registers_argument(values)},
            )
        except QMPTimeout as err:
            raise QMPTimeout(
                f"{err.message} ({what}; the write may be partial)", sent=err.sent
            ) from err
        except QMPError as err:
            if err.error_class is None:
                raise
            # QEMU answered: the kernel refused a register; desc names it, its value and errno.
            raise QMPError(
                f"QMP socket {self.address}: {what} failed: {err.error_class}: "
                f"{bounded(_desc(err.received) or err.message)}",
                sent=err.sent,
                received=err.received,
                error_class=err.error_class,
            ) from err

    async def resume(self) -> None:
        await self.command("cont")


def _reader_failure(client: QMPClient | None) -> BaseException | None:
    """The exception qemu.qmp's background reader/writer ended with, if any (retrieving it
    marks it seen, so asyncio does not log it as never retrieved)."""
    tasks = getattr(client, "_bh_tasks", None) if client is not None else None
    if isinstance(tasks, asyncio.Future) and tasks.done() and not tasks.cancelled():
        exc: BaseException | None = tasks.exception()
        return exc
    return None


def _received(failure: BaseException | None) -> object:
    """What the server sent that qemu.qmp could not take, for -v and logs."""
    raw = getattr(failure, "raw", None)
    if isinstance(raw, bytes):
        return raw[:2000].decode("utf-8", "replace")
    return _plain(getattr(failure, "msg", None))


def _listing(items: Iterable[tuple[int, int]]) -> str:
    parts = [f"{reg_name(rid)}={fmt_value(val)}" for rid, val in items]
    text = ", ".join(parts[:6])
    return text + (f", ... ({len(parts)} registers)" if len(parts) > 6 else "")


def _desc(received: Any) -> str | None:
    if isinstance(received, Mapping):
        error = received.get("error")
        if isinstance(error, Mapping) and isinstance(error.get("desc"), str):
            return str(error["desc"])
    return None


def _connect_failure(err: BaseException) -> str:
    """Why qemu.qmp's connect failed, in words: the OS's reason, a hang-up, or a server that
    does not speak QMP (ConnectError wraps GreetingError/NegotiationError wraps the cause)."""
    chain: list[BaseException] = [err]
    while len(chain) < 8:
        inner = getattr(chain[-1], "exc", None) or chain[-1].__cause__
        if not isinstance(inner, BaseException):
            break
        chain.append(inner)
    root = chain[-1]
    if isinstance(root, OSError | EOFError):
        return _describe(root)
    names = {type(e).__name__ for e in chain}
    if "GreetingError" in names:
        return f"not a QMP greeting ({_describe(root)})"
    if "NegotiationError" in names:
        return f"QMP capabilities negotiation failed ({_describe(root)})"
    return _describe(root)


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror
    elif isinstance(err, EOFError):
        text = "the server hung up"
    return bounded(text)
