"""A QMP server on a unix socket, with QEMU's framing, negotiation, ids, errors and events.

The protocol side (:class:`Session`) is the same for both backends:

- :class:`SimBackend` serves a whole simulated QEMU around a :class:`SimVM`;
- :class:`UpstreamBackend` forwards to a real QEMU's QMP socket and only serves the
  ``kvm-firmware-registers`` property itself.

QEMU's behaviour reproduced here was checked against QEMU 7.2 (Debian 12): greeting with the
``oob`` capability; before ``qmp_capabilities`` every command is ``CommandNotFound``; ``id`` is
echoed verbatim (any JSON value); ill-formed input gets a ``GenericError`` without id; ``cont``
emits RESUME, ``stop`` STOP (only when running), ``quit`` SHUTDOWN; events go to every negotiated
connection. One difference: events without data carry ``"data": {}`` (QEMU omits the member).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Any

from hvcpolicy.errors import InvalidInput, Unavailable
from hvcpolicy.simulator.faults import Fault, Faults
from hvcpolicy.simulator.firmware import PROPERTY, PROPERTY_TYPE, CommandError, FirmwareRegisters
from hvcpolicy.simulator.jsonstream import Chunk, JSONStreamSplitter
from hvcpolicy.simulator.vm import SimVM

SIM_PACKAGE = "hvcpolicy-simulate"
SIM_QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}
CPU_TYPE = "host-arm-cpu"
OVERSIZED_DEFAULT = 16 << 20
REORDER_HOLD = 1.0
UPSTREAM_TIMEOUT = 5.0

RUNSTATES = ("prelaunch", "running", "paused", "restored", "inmigrate")

JSON = Any


def timestamp() -> dict[str, int]:
    now = time.time()
    return {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}


def event_message(name: str, data: dict[str, JSON] | None = None) -> dict[str, JSON]:
    return {"timestamp": timestamp(), "event": name, "data": data if data is not None else {}}


# ---------------------------------------------------------------------------------------------
# Argument checking, with QEMU's messages.

_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "any": (object,), "list": (list,)}


def check_args(args: dict[str, JSON], spec: dict[str, tuple[str, bool]]) -> None:
    """``spec``: name -> (type, required)."""
    for name in args:
        if name not in spec:
            raise CommandError("GenericError", f"Parameter '{name}' is unexpected")
    for name, (kind, required) in spec.items():
        if name not in args:
            if required:
                raise CommandError("GenericError", f"Parameter '{name}' is missing")
            continue
        if not isinstance(args[name], _TYPES[kind]):
            expected = {"str": "string", "list": "array"}.get(kind, kind)
            raise CommandError(
                "GenericError", f"Invalid parameter type for '{name}', expected: {expected}"
            )


# ---------------------------------------------------------------------------------------------
# Backends.


class Backend:
    """What a session's commands run against."""

    server: QMPServer
    vm: SimVM | None = None

    def greeting(self) -> dict[str, JSON]:
        raise NotImplementedError

    async def execute(self, name: str, args: dict[str, JSON], has_args: bool) -> JSON:
        raise NotImplementedError

    def quits_locally(self, name: str) -> bool:
        """True when the server itself must stop once this command was answered."""
        return False

    async def resume_elsewhere(self) -> None:
        """Another monitor (libvirt) resumes the vCPUs: the ``resume`` fault."""
        await self.execute("cont", {}, False)

    async def close(self) -> None:
        return None


def _cpu_entry(index: int) -> dict[str, JSON]:
    return {
        "cpu-index": index,
        "qom-path": f"/machine/unattached/device[{index}]",
        "thread-id": os.getpid() + 1 + index,
        "props": {"core-id": index, "thread-id": 0, "socket-id": 0, "cluster-id": 0},
        "target": "aarch64",
    }


class SimBackend(Backend):
    """A simulated QEMU: runstate, vCPUs, QOM tree and the firmware-register property.

    ``runstate``: prelaunch (default; never ran), running and paused (the VM has run),
    restored (reports ``paused`` like a restored or freshly migrated-in QEMU, and has not run),
    inmigrate (never ran; ``cont`` completes the incoming migration: RESUME, running, has run).
    ``has_run`` overrides whether the VM starts out as having run.
    """

    def __init__(
        self,
        vm: SimVM,
        runstate: str = "prelaunch",
        faults: Faults | None = None,
        has_run: bool | None = None,
    ) -> None:
        if runstate not in RUNSTATES:
            raise InvalidInput(f"--runstate {runstate!r}: expected one of {', '.join(RUNSTATES)}")
        self.vm: SimVM = vm
        self.faults = faults or Faults()
        self.firmware = FirmwareRegisters(vm, self.faults)
        self.interface = not self.faults.has("no-interface")
        self.status = "paused" if runstate == "restored" else runstate
        if has_run if has_run is not None else runstate in ("running", "paused"):
            vm.run()
        self.cpus = [_cpu_entry(i) for i in range(vm.vcpus)]
        self.paths = {c["qom-path"]: c["cpu-index"] for c in self.cpus}

    def greeting(self) -> dict[str, JSON]:
        return {
            "QMP": {
                "version": {"qemu": dict(SIM_QEMU_VERSION), "package": SIM_PACKAGE},
                "capabilities": ["oob"],
            }
        }

    def quits_locally(self, name: str) -> bool:
        return name == "quit"

    # Commands -------------------------------------------------------------------------------

    async def execute(self, name: str, args: dict[str, JSON], has_args: bool) -> JSON:
        handler: Callable[[dict[str, JSON]], JSON] | None = getattr(
            self, "cmd_" + name.replace("-", "_"), None
        )
        if handler is None:
            raise CommandError("CommandNotFound", f"The command {name} has not been found")
        return handler(args)

    def cmd_query_status(self, args: dict[str, JSON]) -> JSON:
        check_args(args, {})
        return {"status": self.status, "singlestep": False, "running": self.status == "running"}

    def cmd_query_cpus_fast(self, args: dict[str, JSON]) -> JSON:
        check_args(args, {})
        return [dict(c) for c in self.cpus]

    def cmd_query_version(self, args: dict[str, JSON]) -> JSON:
        check_args(args, {})
        return {"qemu": dict(SIM_QEMU_VERSION), "package": SIM_PACKAGE}

    def cmd_query_kvm(self, args: dict[str, JSON]) -> JSON:
        check_args(args, {})
        return {"enabled": True, "present": True}

    def cmd_query_commands(self, args: dict[str, JSON]) -> JSON:
        check_args(args, {})
        names = sorted(n[4:].replace("_", "-") for n in dir(self) if n.startswith("cmd_"))
        return [{"name": n} for n in ["qmp_capabilities", *names]]

    def cmd_cont(self, args: dict[str, JSON]) -> JSON:
        check_args(args, {})
        if self.status != "running":
            # From inmigrate QEMU only sets autostart; with no migration stream to wait for,
            # the simulator completes the incoming migration at once and starts the vCPUs.
            self.status = "running"
            self.vm.run()
            self.server.emit(event_message("RESUME"))
        return {}

    def cmd_stop(self, args: dict[str, JSON]) -> JSON:
        check_args(args, {})
        if self.status == "running":
            self.status = "paused"
            self.server.emit(event_message("STOP"))
        return {}

    def cmd_quit(self, args: dict[str, JSON]) -> JSON:
        check_args(args, {})
        self.status = "shutdown"
        self.server.emit(event_message("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}))
        return {}

    # QOM ------------------------------------------------------------------------------------

    def _cpu_props(self, index: int) -> dict[str, tuple[str, JSON]]:
        props: dict[str, tuple[str, JSON]] = {
            "type": ("string", CPU_TYPE),
            "realized": ("bool", True),
            "hotplugged": ("bool", False),
            "hotpluggable": ("bool", False),
            "start-powered-off": ("bool", index != 0),
            "mp-affinity": ("uint64", index),
            "psci-conduit": ("uint32", 2),
            "kvm-no-adjvtime": ("bool", False),
            "kvm-steal-time": ("bool", True),
        }
        if self.interface:
            props[PROPERTY] = (PROPERTY_TYPE, None)  # value served by self.firmware
        return props

    def _object(self, path: str) -> tuple[str, dict[str, tuple[str, JSON]]]:
        """(type name, properties) of a QOM path, or DeviceNotFound."""
        if path in self.paths:
            return CPU_TYPE, self._cpu_props(self.paths[path])
        children = {
            "/": ("container", {"machine": "child<virt-7.2-machine>"}),
            "/machine": ("virt-7.2-machine", {"unattached": "child<container>"}),
            "/machine/unattached": (
                "container",
                {f"device[{i}]": f"child<{CPU_TYPE}>" for i in range(self.vm.vcpus)},
            ),
        }
        if path.rstrip("/") in children or path == "/":
            typename, kids = children[path.rstrip("/") or "/"]
            props: dict[str, tuple[str, JSON]] = {"type": ("string", typename)}
            props.update((k, (v, None)) for k, v in kids.items())
            return typename, props
        raise CommandError("DeviceNotFound", f"Device '{path}' not found")

    def cmd_qom_list(self, args: dict[str, JSON]) -> JSON:
        check_args(args, {"path": ("str", True)})
        _, props = self._object(args["path"])
        return [{"name": name, "type": kind} for name, (kind, _) in props.items()]

    def cmd_qom_get(self, args: dict[str, JSON]) -> JSON:
        check_args(args, {"path": ("str", True), "property": ("str", True)})
        path, prop = args["path"], args["property"]
        typename, props = self._object(path)
        if prop not in props:
            raise CommandError("GenericError", f"Property '{typename}.{prop}' not found")
        if prop == PROPERTY:
            return self.firmware.get(self.paths[path])
        kind, value = props[prop]
        if kind.startswith(("child<", "link<")):
            return f"{path.rstrip('/')}/{prop}"
        return value

    def cmd_qom_set(self, args: dict[str, JSON]) -> JSON:
        check_args(args, {"path": ("str", True), "property": ("str", True), "value": ("any", True)})
        path, prop = args["path"], args["property"]
        typename, props = self._object(path)
        if prop not in props:
            raise CommandError("GenericError", f"Property '{typename}.{prop}' not found")
        if prop != PROPERTY:
            raise CommandError(
                "GenericError",
                f"Attempt to set property '{prop}' on device '{path}' (type '{typename}') "
                "after it was realized",
            )
        self.firmware.set(self.paths[path], args["value"])
        return {}


class UpstreamBackend(Backend):
    """Forward to a real QEMU; serve only the firmware-register property from a SimVM.

    The VM "has run" once the real QEMU emits RESUME (or was already running or paused when the
    simulator attached; prelaunch and inmigrate count as not run).
    """

    def __init__(
        self,
        path: str,
        vm_factory: Callable[[int], SimVM],
        faults: Faults,
        has_run: bool | None = None,
    ) -> None:
        self.path = path
        self.has_run = has_run
        self.vm_factory = vm_factory
        self.faults = faults
        self.interface = not faults.has("no-interface")
        self._greeting: dict[str, JSON] = {}
        self._pending: dict[str, asyncio.Future[dict[str, JSON]]] = {}
        self._counter = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._shutdown_seen = False
        self.paths: dict[str, int] = {}
        self.firmware: FirmwareRegisters | None = None
        self._queue: list[dict[str, JSON]] = []
        self._splitter = JSONStreamSplitter(max_message=64 << 20)

    async def _read_message(self) -> dict[str, JSON]:
        assert self._reader is not None
        while not self._queue:
            data = await self._reader.read(65536)
            if not data:
                raise EOFError
            for chunk in self._splitter.feed(data):
                if chunk.error is None:
                    msg = json.loads(chunk.text)
                    if isinstance(msg, dict):
                        self._queue.append(msg)
        return self._queue.pop(0)

    async def connect(self) -> None:
        try:
            async with asyncio.timeout(UPSTREAM_TIMEOUT):
                self._reader, self._writer = await asyncio.open_unix_connection(self.path)
                greeting = await self._read_message()
                if "QMP" not in greeting:
                    raise Unavailable(f"--upstream {self.path}: not a QMP greeting")
                self._greeting = greeting
                self._send({"execute": "qmp_capabilities", "id": "hvcpolicy-simulate-0"})
                reply = await self._read_message()
                if "return" not in reply:
                    raise Unavailable(f"--upstream {self.path}: capabilities negotiation failed")
        except (OSError, EOFError, TimeoutError, ValueError) as err:
            raise Unavailable(f"--upstream {self.path}: {type(err).__name__}: {err}") from None
        self._task = asyncio.get_running_loop().create_task(self._read_loop())
        cpus = await self.forward("query-cpus-fast", {})
        status = await self.forward("query-status", {})
        self.paths = {c["qom-path"]: c["cpu-index"] for c in cpus}
        self.vm = self.vm_factory(max(1, len(cpus)))
        self.firmware = FirmwareRegisters(self.vm, self.faults)
        ran = self.has_run
        if ran is None:
            ran = status.get("status") not in ("prelaunch", "inmigrate", "restore-vm")
        if ran:
            self.vm.run()

    def _send(self, msg: dict[str, JSON]) -> None:
        assert self._writer is not None
        self._writer.write(json.dumps(msg).encode())

    async def _read_loop(self) -> None:
        code = 0
        try:
            while True:
                msg = await self._read_message()
                if "event" in msg:
                    if msg["event"] == "RESUME" and self.vm is not None:
                        self.vm.run()
                    if msg["event"] == "SHUTDOWN":
                        self._shutdown_seen = True
                    self.server.emit(msg)
                    continue
                fut = self._pending.pop(str(msg.get("id")), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (EOFError, OSError, ValueError):
            if not self._shutdown_seen:
                code = 5
                self.server.note = "upstream QEMU closed its QMP connection"
        for fut in self._pending.values():
            fut.cancel()
        self.server.request_stop(code)

    async def forward(self, name: str, args: dict[str, JSON] | None) -> JSON:
        self._counter += 1
        ident = f"hvcpolicy-simulate-{self._counter}"
        msg: dict[str, JSON] = {"execute": name, "id": ident}
        if args is not None:
            msg["arguments"] = args
        fut: asyncio.Future[dict[str, JSON]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = fut
        self._send(msg)
        reply = await fut
        if "error" in reply:
            err = reply["error"]
            raise CommandError(str(err.get("class")), str(err.get("desc")))
        return reply.get("return")

    def greeting(self) -> dict[str, JSON]:
        version = self._greeting.get("QMP", {}).get("version", {})
        return {"QMP": {"version": version, "capabilities": ["oob"]}}

    async def execute(self, name: str, args: dict[str, JSON], has_args: bool) -> JSON:
        path = args.get("path")
        if not isinstance(path, str):
            path = None
        ours = (
            self.interface
            and name in ("qom-get", "qom-set")
            and args.get("property") == PROPERTY
            and path in self.paths
        )
        if ours:
            assert self.firmware is not None and isinstance(path, str)
            if name == "qom-get":
                check_args(args, {"path": ("str", True), "property": ("str", True)})
                return self.firmware.get(self.paths[path])
            check_args(
                args, {"path": ("str", True), "property": ("str", True), "value": ("any", True)}
            )
            self.firmware.set(self.paths[path], args["value"])
            return {}
        result = await self.forward(name, args if has_args else None)
        if (
            name == "qom-list"
            and self.interface
            and path in self.paths
            and isinstance(result, list)
        ):
            result.append({"name": PROPERTY, "type": PROPERTY_TYPE})
        return result

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()


# ---------------------------------------------------------------------------------------------
# Protocol.


def _no_constant(name: str) -> JSON:
    raise ValueError(f"invalid keyword '{name}'")


def _error(klass: str, desc: str) -> dict[str, JSON]:
    return {"error": {"class": klass, "desc": desc}}


class Session:
    """One client connection."""

    def __init__(
        self, server: QMPServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        self.oob = False
        self.hung = False
        self.closed = False
        self.splitter = JSONStreamSplitter()
        self._held: bytes | None = None
        self._held_timer: asyncio.TimerHandle | None = None

    def write(self, data: bytes) -> None:
        if not self.closed and not self.writer.is_closing():
            self.writer.write(data)

    def send_event(self, msg: dict[str, JSON]) -> None:
        if self.negotiated and not self.hung:
            self.write(json.dumps(msg).encode() + b"\r\n")

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if abort:
            self.writer.transport.abort()
        else:
            self.writer.close()

    async def run(self) -> None:
        faults = self.server.faults
        if faults.has("one-client"):
            async with self.server.monitor_lock:
                await self._run(faults)
        else:
            await self._run(faults)

    async def _run(self, faults: Faults) -> None:
        try:
            if not faults.has("no-greeting"):
                delay = faults.global_slow()
                if delay:
                    await asyncio.sleep(delay)
                greeting = self.server.backend.greeting()
                if faults.has("bad-greeting"):
                    greeting = {"hello": "not QMP"}
                self.write(json.dumps(greeting).encode() + b"\r\n")
                await self.writer.drain()
            else:
                self.hung = True
            while not self.closed:
                data = await self.reader.read(65536)
                if not data:
                    break
                for chunk in self.splitter.feed(data):
                    if self.hung or self.closed:
                        continue
                    await self.handle(chunk)
        except (ConnectionError, OSError):
            pass
        finally:
            self.close()
            self.server.sessions.discard(self)

    async def handle(self, chunk: Chunk) -> None:
        if chunk.error is not None:
            await self.reply(_error("GenericError", chunk.error), {})
            return
        try:
            msg = json.loads(chunk.text, parse_constant=_no_constant)  # no NaN, as QEMU
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            desc = getattr(err, "msg", str(err))
            await self.reply(_error("GenericError", f"JSON parse error, {desc}"), {})
            return
        if not isinstance(msg, dict):
            await self.reply(_error("GenericError", "QMP input must be a JSON object"), {})
            return
        has_id = "id" in msg

        def with_id(resp: dict[str, JSON]) -> dict[str, JSON]:
            if has_id:
                resp["id"] = msg["id"]
            return resp

        problem = self._check_envelope(msg)
        if problem is not None:
            await self.reply(with_id(_error("GenericError", problem)), {})
            return
        oob = "exec-oob" in msg
        name: str = msg["exec-oob"] if oob else msg["execute"]
        args: dict[str, JSON] = msg.get("arguments", {})
        if not self.negotiated and name != "qmp_capabilities":
            desc = "Expecting capabilities negotiation with 'qmp_capabilities'"
            await self.reply(with_id(_error("CommandNotFound", desc)), {})
            return
        hits = self.server.faults.for_command(name)
        if "exit" in hits:
            self.server.crash()
            return
        if "hang" in hits:
            self.hung = True
            return
        if "resume" in hits:
            with contextlib.suppress(CommandError):
                await self.server.backend.resume_elsewhere()
        if "error" in hits:
            klass = hits["error"].value or "GenericError"
            desc = f"simulated failure of {name} (--fault {hits['error']})"
            await self.reply(with_id(_error(str(klass), desc)), hits)
            return
        try:
            if oob:
                raise CommandError("GenericError", f"The command {name} does not support OOB")
            if name == "qmp_capabilities":
                result = self._capabilities(args)
            else:
                result = await self.server.backend.execute(name, args, "arguments" in msg)
            resp: dict[str, JSON] = {"return": result}
        except CommandError as err:
            resp = _error(err.klass, err.desc)
        except Exception as err:  # a simulator bug: answer it rather than drop the client
            desc = f"hvcpolicy simulate internal error: {type(err).__name__}: {err}"
            resp = _error("GenericError", desc)
        await self.reply(with_id(resp), hits)
        if "return" in resp and self.server.backend.quits_locally(name):
            self.server.request_stop(0)

    def _check_envelope(self, msg: dict[str, JSON]) -> str | None:
        allowed = {"execute", "arguments", "id"} | ({"exec-oob", "control"} if self.oob else set())
        for key in msg:
            if key not in allowed:
                return f"QMP input member '{key}' is unexpected"
        for key in ("execute", "exec-oob"):
            if key in msg and not isinstance(msg[key], str):
                return f"QMP input member '{key}' must be a string"
        if "execute" in msg and "exec-oob" in msg:
            return "QMP input must not have both 'execute' and 'exec-oob'"
        if "execute" not in msg and "exec-oob" not in msg:
            return "QMP input lacks member 'execute'"
        if "arguments" in msg and not isinstance(msg["arguments"], dict):
            return "QMP input member 'arguments' must be an object"
        return None

    def _capabilities(self, args: dict[str, JSON]) -> JSON:
        if self.negotiated:
            raise CommandError(
                "CommandNotFound", "Capabilities negotiation is already complete, command ignored"
            )
        check_args(args, {"enable": ("list", False)})
        enable = args.get("enable", [])
        for cap in enable:
            if cap != "oob":
                raise CommandError("GenericError", f"Capability '{cap}' not available")
        self.oob = "oob" in enable
        self.negotiated = True
        return {}

    async def reply(self, resp: dict[str, JSON], hits: dict[str, Fault]) -> None:
        if "slow" in hits and isinstance(hits["slow"].value, float):
            await asyncio.sleep(hits["slow"].value)
        if self.closed:
            return
        if "wrong-id" in hits:
            resp["id"] = ["hvcpolicy-simulate-wrong-id", resp.get("id")]
        if "stray-reply" in hits:
            self.write(b'{"return": {}, "id": "hvcpolicy-simulate-stray"}\r\n')
        if "oversized" in hits:
            size = hits["oversized"].value
            resp["x-padding"] = "x" * (size if isinstance(size, int) else OVERSIZED_DEFAULT)
        data = json.dumps(resp).encode() + b"\r\n"
        if "malformed" in hits:
            data = b'{"return": {}, "id": <not json>}\r\n'
        if "truncated" in hits:
            data = data[: len(data) // 2] + b"\r\n"
        if "drop" in hits:
            self.write(data[: len(data) // 2])
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.drain()
            self.close()
            return
        if "reorder" in hits and self._held is None:
            self._held = data
            self._held_timer = asyncio.get_running_loop().call_later(REORDER_HOLD, self._flush_held)
            return
        self.write(data)
        self._flush_held()
        await self.writer.drain()

    def _flush_held(self) -> None:
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        if self._held is not None:
            held, self._held = self._held, None
            self.write(held)


# ---------------------------------------------------------------------------------------------
# The server.


def _check_socket_path(path: str) -> None:
    if len(os.fsencode(path)) > 107:
        raise InvalidInput(f"--socket {path}: longer than a unix socket path may be (107 bytes)")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidInput(f"--socket {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # a stale socket: nobody listens there
        return
    finally:
        probe.close()
    raise Unavailable(f"--socket {path}: another server is listening there")


def listen_unix(path: str) -> socket.socket:
    """A listening socket that appears at ``path`` only once it accepts connections."""
    _check_socket_path(path)
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(tmp)) <= 107:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            sock.bind(tmp)
            sock.listen(16)
            os.rename(tmp, path)  # atomic: the path appears already listening
        else:
            sock.bind(path)
            sock.listen(16)
    except OSError as err:
        sock.close()
        raise Unavailable(f"--socket {path}: {err.strerror or err}") from None
    return sock


class QMPServer:
    def __init__(self, backend: Backend, faults: Faults | None = None) -> None:
        self.backend = backend
        backend.server = self
        self.faults = faults or Faults()
        self.sessions: set[Session] = set()
        self.note: str | None = None  # why the server stopped, when it is worth saying
        self._server: asyncio.base_events.Server | None = None
        self._done: asyncio.Future[int] | None = None
        self._path: str | None = None
        self._keep_socket = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False
        self.monitor_lock = asyncio.Lock()  # the one-client fault
        self._early_stop: int | None = None

    @property
    def vm(self) -> SimVM:
        """The simulated VM (with --upstream: once connected)."""
        if self.backend.vm is None:
            raise RuntimeError("the upstream backend is not connected yet")
        return self.backend.vm

    async def start(self, path: str) -> None:
        self._done = asyncio.get_running_loop().create_future()
        if self._early_stop is not None:
            self._done.set_result(self._early_stop)
            return
        sock = listen_unix(path)
        self._path = path
        self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        self._watcher = asyncio.get_running_loop().create_task(self._close_when_done())

    async def _close_when_done(self) -> None:
        await self.wait()
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(self, reader, writer)
        self.sessions.add(session)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await session.run()
        except asyncio.CancelledError:
            pass  # the server is closing; ending quietly keeps asyncio from logging it
        finally:
            if task is not None:
                self._tasks.discard(task)

    def emit(self, msg: dict[str, JSON]) -> None:
        for session in list(self.sessions):
            session.send_event(msg)

    def request_stop(self, code: int) -> None:
        if self._done is None:  # not listening yet (e.g. SIGTERM while --upstream connects)
            self._early_stop = code if self._early_stop is None else self._early_stop
        elif not self._done.done():
            self._done.set_result(code)

    def crash(self) -> None:
        """Go away like a QEMU that died: connections cut, the socket file left behind."""
        self._keep_socket = True
        for session in list(self.sessions):
            session.close(abort=True)
        self.request_stop(0)

    async def wait(self) -> int:
        assert self._done is not None
        return await self._done

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions):
            session.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        await self.backend.close()
        if self._path is not None and not self._keep_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        self._path = None

    async def serve(self, path: str) -> int:
        """Listen at ``path`` until quit, a crash fault or :meth:`request_stop`."""
        await self.start(path)
        try:
            return await self.wait()
        finally:
            await self.close()
