"""Talking QMP to QEMU: hvcpolicy's one QMP client, and the QMP backend of the Firmware interface.

Every QMP conversation — ``apply``, ``start``, ``status`` and the libvirt hook — goes through
:class:`QMP`: a small synchronous facade over ``qemu.qmp``'s asyncio ``QMPClient`` (not its
GPL-only ``legacy`` module), with an event loop of its own. Every wait — connect, greeting,
negotiation, each command, disconnect — is bounded by ``timeout`` seconds (default 5).

qemu.qmp's exceptions are mapped here, at one edge (:func:`_session_error`), by their public
classes, into :class:`~hvcpolicy.errors.QMPError` (carries ``sent`` and ``received``),
:class:`~hvcpolicy.errors.QMPTimeout` or :class:`~hvcpolicy.errors.InterfaceMissing`, all exit 5.
:func:`parse_registers` is the one parser of a ``kvm-firmware-registers`` answer and
:data:`PROPERTY` the one name of that property.

Reading many vCPUs is pipelined: every ``qom-get`` is in flight at once, so the cost is one round
trip plus QEMU's work, not one round trip per vCPU.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from hvcpolicy.catalogue import U64_MAX, fmt_id, fmt_value, is_firmware_reg, reg_name
from hvcpolicy.errors import InterfaceMissing, QMPError, QMPTimeout, Unavailable, bounded
from hvcpolicy.firmware import QMP_BACKEND, Registers
from hvcpolicy.firmware import QMP_PROPERTY as PROPERTY
from hvcpolicy.record import Record

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

DEFAULT_TIMEOUT = 5.0
CLOSE_TIMEOUT = 1.0  # a local close; never worth the whole timeout
RETRY_PAUSE = 0.02  # the socket may not exist yet (QEMU, or a proxy, still creating it)
MAX_MESSAGE = 1 << 20  # one QMP message, at most (64 vCPUs' registers: ~10 KiB)

T = TypeVar("T")


class VCPU(Record):
    """One vCPU as ``query-cpus-fast`` lists it: its cpu-index and QOM path."""

    __slots__ = ("index", "qom_path")

    def __init__(self, index: int, qom_path: str) -> None:
        self.index = index
        self.qom_path = qom_path


def parse_registers(value: object, where: str) -> Registers:
    """The ``qom-get`` answer of ``kvm-firmware-registers`` -> {register id: value}.

    Ids are JSON object keys: ``0x``-hex (the documented form) or decimal strings, each a
    firmware register id. Values are integers in u64 range. Anything else is a malformed answer
    (QMPError naming ``where``, with what was received).
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
    """One QMP connection to a QEMU (or ``hvcpolicy simulate``) at a UNIX socket path, and the
    QMP backend of :class:`hvcpolicy.firmware.Firmware`.

    ``with QMP(path, timeout) as qmp: ...`` (or ``connect()`` / ``close()``). Synchronous: the
    object owns its event loop; nothing of asyncio leaks out.
    """

    backend = QMP_BACKEND

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self.address = address
        self.timeout = timeout
        self.where = f"QMP socket {address}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: QMPClient | None = None
        self._vcpus: list[VCPU] | None = None
        self._interface: bool | None = None

    # -- connection ------------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect, greet and negotiate, all within ``timeout``. A socket that does not exist yet
        (QEMU or a proxy still creating it) is retried until then; one that refuses is not
        (a QEMU gone, its socket left behind)."""
        from hvcpolicy.trust import check_qmp_socket

        _import_qemu_qmp()
        loop = asyncio.new_event_loop()
        # qemu.qmp's background tasks may end with an exception nobody awaits (a server that
        # garbles or hangs up): that failure is reported as one line, never as a traceback.
        loop.set_exception_handler(_quiet)
        self._loop = loop
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                try:
                    check_qmp_socket(self.address)
                    self._client = self._run(self._open(deadline))
                    return
                except FileNotFoundError as err:
                    if time.monotonic() + RETRY_PAUSE >= deadline:
                        raise QMPError(f"{self.where}: cannot connect: {_describe(err)}") from None
                    time.sleep(RETRY_PAUSE)
        except BaseException:
            self.close()
            raise

    async def _open(self, deadline: float) -> QMPClient:
        client = _client_class()("hvcpolicy", readbuflen=MAX_MESSAGE)
        left = max(deadline - time.monotonic(), 0.001)
        try:
            await asyncio.wait_for(client.connect(self.address), left)
        except TimeoutError:
            await self._abandon(client)
            raise QMPTimeout(
                f"{self.where}: no QMP greeting and negotiation within {_seconds(self.timeout)}"
            ) from None
        except BaseException as err:
            cause = await self._abandon(client)
            raised = _connect_error(err, cause, self.where)
            raise raised from None  # FileNotFoundError included: connect() retries it
        return client

    def close(self) -> None:
        """Disconnect (bounded) and close the event loop; safe to call twice."""
        loop, self._loop = self._loop, None
        client, self._client = self._client, None
        if loop is None:
            return
        try:
            if client is not None:
                loop.run_until_complete(self._abandon(client))
        finally:
            loop.close()

    async def _abandon(self, client: QMPClient) -> BaseException | None:
        """Disconnect, bounded; -> what ended the session, if its reader or writer failed
        (``disconnect`` re-raises that: the public way to learn why a session ended)."""
        try:
            await asyncio.wait_for(client.disconnect(), min(self.timeout, CLOSE_TIMEOUT))
        except Exception as err:  # the session's own failure: already reported
            return None if isinstance(err, TimeoutError) else err
        return None

    def __enter__(self) -> QMP:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T], name: str | None = None, sent: object = None) -> T:
        """Run one request (``name``: its command, ``sent``: what it sends) to its end, within
        the timeout: one bound for the request as a whole, however many commands it pipelines
        (a server that answers each slowly cannot stretch it)."""
        if self._loop is None:
            coro.close()
            raise QMPError(f"{self.where}: not connected", sent=sent)
        try:
            if name is None:  # connect: bounded inside
                return self._loop.run_until_complete(coro)
            return self._loop.run_until_complete(asyncio.wait_for(coro, self.timeout))
        except TimeoutError:
            raise QMPTimeout(
                f"{self.where}: no answer to {name!r} within {_seconds(self.timeout)}", sent=sent
            ) from None
        except _Lost as lost:
            # The session ended under a command: what ended it is what disconnect re-raises
            # (asked once, here, however many requests were in flight).
            client, self._client = self._client, None
            cause = None
            if client is not None:
                cause = self._loop.run_until_complete(self._abandon(client))
            why = f" ({_describe(cause)})" if cause is not None else ""
            raise QMPError(
                f"{self.where}: connection lost waiting for {lost.name!r}{why}",
                sent=lost.sent,
                received=_received(cause),
            ) from None

    # -- commands --------------------------------------------------------------------------------

    def command(self, name: str, arguments: Mapping[str, object] | None = None) -> object:
        """Execute one QMP command within the timeout; its ``return`` value."""
        return self._run(self._command(name, arguments), name, _sent(name, arguments))

    async def _command(self, name: str, arguments: Mapping[str, object] | None = None) -> object:
        """One command, unbounded here: :meth:`_run` bounds the request it is part of."""
        client = self._client
        if client is None:
            raise QMPError(f"{self.where}: not connected", sent=_sent(name, arguments))
        try:
            return await client.execute(name, arguments)
        except Exception as err:
            raise _command_error(err, self.where, name, _sent(name, arguments)) from None

    async def _settle(self, coros: Iterable[Coroutine[Any, Any, T]]) -> list[T | Exception]:
        """Every request in flight at once; each one's result or exception, once all have ended
        (none is left pending)."""
        results = await asyncio.gather(*coros, return_exceptions=True)
        for res in results:
            if isinstance(res, _Lost):
                raise res  # the session ended: every request did (``_run`` says why, once)
            if isinstance(res, BaseException) and not isinstance(res, Exception):
                raise res  # cancelled, interrupted: not an answer
        return results  # type: ignore[return-value]

    def _all(
        self, coros: Iterable[Coroutine[Any, Any, T]], name: str, sent: object = None
    ) -> list[T]:
        """Every request in flight at once; the first failure (in request order) is raised."""
        results = self._run(self._settle(coros), name, sent)
        for res in results:
            if isinstance(res, Exception):
                raise res
        return results  # type: ignore[return-value]

    # -- the §8 interface ------------------------------------------------------------------------

    def runstate(self) -> str:
        """QEMU's runstate (``query-status``). The first call also lists the vCPUs, in the same
        round trip (every caller needs them next)."""
        if self._vcpus is None:
            reply, cpus = self._all(
                [self._command("query-status"), self._command("query-cpus-fast")],
                "query-status",
                _sent("query-status", None),
            )
            self._vcpus = self._parse_vcpus(cpus)
        else:
            reply = self.command("query-status")
        status = reply.get("status") if isinstance(reply, Mapping) else None
        if not isinstance(status, str):
            raise QMPError(
                f"{self.where}: query-status answered no status",
                sent={"execute": "query-status"},
                received=_plain(reply),
            )
        return status

    def vcpus(self) -> list[VCPU]:
        """Every vCPU, ordered by cpu-index (asked once per connection); QMPError when QEMU
        lists none."""
        if self._vcpus is None:
            self._vcpus = self._parse_vcpus(self.command("query-cpus-fast"))
        return list(self._vcpus)

    def _parse_vcpus(self, reply: object) -> list[VCPU]:
        sent = {"execute": "query-cpus-fast"}
        if not isinstance(reply, list):
            raise QMPError(
                f"{self.where}: query-cpus-fast answered no list", sent=sent, received=_plain(reply)
            )
        cpus: list[VCPU] = []
        for i, item in enumerate(reply):
            path = item.get("qom-path") if isinstance(item, Mapping) else None
            index = item.get("cpu-index", i) if isinstance(item, Mapping) else None
            if not isinstance(path, str) or isinstance(index, bool) or not isinstance(index, int):
                raise QMPError(
                    f"{self.where}: query-cpus-fast entry {i} has no qom-path",
                    sent=sent,
                    received=_plain(reply),
                )
            cpus.append(VCPU(index, path))
        if not cpus:
            raise QMPError(
                f"{self.where}: query-cpus-fast lists no vCPU", sent=sent, received=_plain(reply)
            )
        cpus.sort(key=lambda c: c.index)
        return cpus

    def has_interface(self) -> bool:
        """Whether this QEMU's vCPUs have the ``kvm-firmware-registers`` property (``qom-list``
        on the first vCPU): the detection of the QMP backend. Asked once per connection."""
        if self._interface is None:
            self._interface = self._lists_property(self.command(*self._qom_list()))
        return self._interface

    def _qom_list(self) -> tuple[str, dict[str, object]]:
        return "qom-list", {"path": self.vcpus()[0].qom_path}

    def _lists_property(self, reply: object) -> bool:
        if not isinstance(reply, list):
            name, arguments = self._qom_list()
            raise QMPError(
                f"{self.where}: qom-list {arguments['path']} answered no list",
                sent={"execute": name, "arguments": arguments},
                received=_plain(reply),
            )
        return any(isinstance(p, Mapping) and p.get("name") == PROPERTY for p in reply)

    def require_interface(self) -> None:
        """InterfaceMissing (exit 5) unless the vCPUs have the property."""
        if not self.has_interface():
            raise InterfaceMissing(
                f"{self.where}: this QEMU lacks the firmware-register interface (its vCPUs have "
                f"no {PROPERTY} property)"
            )

    def read(self) -> list[Registers]:
        """Every vCPU's firmware registers, in vCPU order (Firmware.read); InterfaceMissing
        when QEMU lacks the property. The first read asks ``qom-list`` in the same round trip
        as the ``qom-get``s (which fail when the property is missing: the listing decides)."""
        vcpus = self.vcpus()
        if self._interface is not None:
            self.require_interface()
            return self.read_registers(vcpus)
        listing, *regs = self._run(
            self._settle([self._command(*self._qom_list()), *(self._read_one(v) for v in vcpus)]),
            "qom-get",
            _sent("qom-get", _get(vcpus[0])),
        )
        if isinstance(listing, Exception):
            raise listing
        self._interface = self._lists_property(listing)
        self.require_interface()
        for res in regs:
            if isinstance(res, Exception):
                raise res
        return regs  # type: ignore[return-value]

    def read_registers(self, vcpus: Sequence[VCPU]) -> list[Registers]:
        """The registers as each of ``vcpus`` reads them, every ``qom-get`` in flight at once."""
        sent = _sent("qom-get", _get(vcpus[0])) if vcpus else None
        return self._all((self._read_one(v) for v in vcpus), "qom-get", sent)

    async def _read_one(self, vcpu: VCPU) -> Registers:
        arguments = _get(vcpu)
        reply = await self._command("qom-get", arguments)
        try:
            return parse_registers(reply, f"{self.where}: vCPU {vcpu.index}")
        except QMPError as err:
            err.sent = _sent("qom-get", arguments)
            raise

    def write(self, writes: Mapping[int, int]) -> None:
        """Firmware.write: one ``qom-set`` of ``writes`` in their order through the first vCPU
        (registers are per VM). QEMU stops at the first the kernel refuses and answers an error
        naming register, value and errno."""
        if not writes:
            return
        self.require_interface()
        vcpu = self.vcpus()[0]
        what = f"writing {_listing(writes.items())} through vCPU {vcpu.index}"
        arguments = {
            "path": vcpu.qom_path,
            "property": PROPERTY,
            "value": registers_argument(writes),
        }
        try:
            self.command("qom-set", arguments)
        except QMPTimeout as err:
            raise QMPTimeout(
                f"{err.message} ({what}; the write may be partial)", sent=err.sent
            ) from None
        except QMPError as err:
            if err.error_class is None:
                raise
            # QEMU answered: the kernel refused a register; desc names it, its value and errno.
            raise QMPError(
                f"{self.where}: {what} failed: {err.error_class}: "
                f"{bounded(_desc(err.received) or err.message)}",
                sent=err.sent,
                received=err.received,
                error_class=err.error_class,
            ) from None

    def resume(self) -> None:
        """Firmware.resume: QMP ``cont``."""
        self.command("cont")


def interface_at(address: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Detection: does the QEMU at ``address`` offer the QMP property? (QMPError when it
    cannot be asked at all.)"""
    with QMP(address, timeout) as qmp:
        return qmp.has_interface()


def _client_class() -> type[QMPClient]:
    """qemu.qmp's QMPClient, its message hooks logging lazily. Its base hooks (documented as the
    place for subclasses to filter messages) format every message for the debug log, as JSON
    with indent (pure Python), even when nothing logs: a third of the cost of reading 64 vCPUs."""
    global _CLIENT
    if _CLIENT is None:
        from qemu.qmp import Message, QMPClient

        class Client(QMPClient):
            def _cb_outbound(self, msg: Message) -> Message:
                self.logger.debug("--> %s", msg)
                return msg

            def _cb_inbound(self, msg: Message) -> Message:
                self.logger.debug("<-- %s", msg)
                return msg

        _CLIENT = Client
    return _CLIENT


_CLIENT: type[QMPClient] | None = None


def _import_qemu_qmp() -> None:
    """qemu.qmp, or Unavailable saying how to get it. The hook's ``-I -S`` interpreter finds it
    beside ``hvcpolicy`` (where the packages ship it); a pip install has it in site-packages,
    which the hook adds only then (its slow path, as for a policy the cache lacks)."""
    try:
        import qemu.qmp
    except ImportError:
        from hvcpolicy.policystore import enable_site

        enable_site()
        try:
            import qemu.qmp  # noqa: F401 - imported for its side effect: importable now
        except ImportError as err:
            raise Unavailable(
                f"this Python ({sys.executable}) cannot import qemu.qmp, hvcpolicy's QMP library "
                f"({err}): install hvcpolicy's package, or `pip install qemu.qmp`"
            ) from None


# --- the one edge where qemu.qmp's exceptions become hvcpolicy's ----------------------------------


class _Lost(Exception):
    """The session ended while ``name`` waited; :meth:`QMP._run` says why, once."""

    def __init__(self, name: str, sent: object) -> None:
        super().__init__(name)
        self.name = name
        self.sent = sent


def _command_error(err: BaseException, where: str, name: str, sent: object) -> Exception:
    from qemu.qmp import ExecInterruptedError, ExecuteError, StateError
    from qemu.qmp import QMPError as LibError

    if isinstance(err, ExecuteError):
        return QMPError(
            f"{where}: {name!r} failed: {err.error_class}: {bounded(str(err))}",
            sent=_plain(err.sent),
            received=_plain(err.received),
            error_class=err.error_class,
        )
    if isinstance(err, ExecInterruptedError | StateError):
        return _Lost(name, sent)
    if isinstance(err, LibError | OSError | EOFError | ValueError):  # BadReplyError, ...
        return QMPError(f"{where}: {name!r}: {_describe(err)}", sent=sent, received=_received(err))
    return QMPError(f"{where}: {name!r}: {type(err).__name__}: {_describe(err)}", sent=sent)


def _connect_error(err: BaseException, cause: BaseException | None, where: str) -> BaseException:
    """Why qemu.qmp's connect failed, as an hvcpolicy error; a missing socket stays
    FileNotFoundError (the caller retries it). ``cause``: what ``disconnect`` said ended the
    session."""
    from qemu.qmp import ConnectError
    from qemu.qmp.qmp_client import GreetingError, NegotiationError

    if not isinstance(err, Exception):
        return err  # KeyboardInterrupt, CancelledError: not ours to translate
    root: BaseException = err
    phase = ""
    for _ in range(4):  # ConnectError wraps GreetingError/NegotiationError wraps the cause
        if isinstance(root, GreetingError):
            phase = "not a QMP greeting"
        elif isinstance(root, NegotiationError):
            phase = "QMP capabilities negotiation failed"
        if isinstance(root, ConnectError | GreetingError | NegotiationError):
            root = root.exc
        else:
            break
    if isinstance(root, FileNotFoundError):
        return root
    if isinstance(root, AssertionError):
        # qemu.qmp asserts its own state when the server garbles or hangs up mid-negotiation:
        # what its reader met (re-raised by disconnect) is the reason.
        phase = phase or "QMP capabilities negotiation failed"
        root = cause if cause is not None else EOFError()
    text = _describe(root)
    return QMPError(
        f"{where}: cannot connect: {f'{phase} ({text})' if phase else text}",
        received=_received(root),
    )


def _received(failure: BaseException | None) -> object:
    """What the server sent that qemu.qmp could not take, for -v and logs."""
    from qemu.qmp.message import DeserializationError, UnexpectedTypeError
    from qemu.qmp.qmp_client import BadReplyError, ServerParseError

    if isinstance(failure, DeserializationError):
        return failure.raw[:2000].decode("utf-8", "replace")
    if isinstance(failure, UnexpectedTypeError):
        return _plain(failure.value)
    if isinstance(failure, BadReplyError | ServerParseError):
        return _plain(failure.msg)
    return None


def _quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's exception handler: stray background-task failures are logged at debug
    level (visible with -v logging), never printed as tracebacks."""
    import logging

    logging.getLogger("hvcpolicy.qmp").debug("background: %s", context.get("message"))


# --- text ---------------------------------------------------------------------------------------


def _sent(name: str, arguments: Mapping[str, object] | None) -> dict[str, object]:
    """A command as sent (for errors: ``sent``), without qemu.qmp's id."""
    sent: dict[str, object] = {"execute": name}
    if arguments is not None:
        sent["arguments"] = dict(arguments)
    return sent


def _get(vcpu: VCPU) -> dict[str, object]:
    return {"path": vcpu.qom_path, "property": PROPERTY}


def _plain(obj: object) -> object:
    """A JSON-able copy of a qemu.qmp Message (or anything) for error context."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _seconds(value: float) -> str:
    return f"{value:g} s"


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


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror
    elif isinstance(err, EOFError):
        text = "the server hung up"
    return bounded(text)
