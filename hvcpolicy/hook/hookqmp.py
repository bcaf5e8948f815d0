"""The hook's own small, synchronous, bounded QMP client."""

from __future__ import annotations

import os

from hvcpolicy.errors import Unavailable

TYPE_CHECKING = False  # typing costs more than the interpreter's start-up: checker-only names
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any


class HookQMP:
    """A blocking QMP client for the hook: no asyncio to import, every wait bounded.

    Speaks the firmware-register interface of SPEC.md section 8: vCPUs from ``query-cpus-fast``,
    the QOM property ``kvm-firmware-registers`` on each vCPU (ids as ``0x`` strings).

    ``timeout`` bounds each command as a whole (and connect, greeting and negotiation together):
    a QEMU that drips a reply a few bytes at a time cannot stretch it. Every command carries its
    own id; events and replies with another id are skipped; a message is at most ``MAX_MESSAGE``
    bytes.
    """

    PROP = "kvm-firmware-registers"
    MAX_MESSAGE = 1 << 20

    def __init__(self, path: str, timeout: float) -> None:
        import time

        from hvcpolicy.errors import QMPTimeout

        self.path = path
        self.timeout = timeout
        self.sock = self._socket()
        self.buf = bytearray()
        self._scanned = 0  # bytes of self.buf already known to hold no newline
        self._ids = 0
        self._vcpus: list[str] | None = None
        deadline = time.monotonic() + timeout
        try:
            self._connect(path, deadline)
            greeting = self._message(deadline)
            if not isinstance(greeting.get("QMP"), dict):
                raise Unavailable(f"QMP {path}: not a QMP greeting (no 'QMP' object)")
            self.cmd("qmp_capabilities", expect=dict, deadline=deadline)
        except TimeoutError:
            self.close()
            raise QMPTimeout(f"QMP {path}: no answer within {timeout:g} s") from None
        except OSError as err:
            self.close()
            raise Unavailable(f"QMP {path}: cannot connect: {err.strerror or err}") from None
        except BaseException:
            self.close()
            raise

    def _connect(self, path: str, deadline: float) -> None:
        """QEMU (or a proxy in front of it) may still be creating the socket: retry until the
        deadline. Each attempt first checks the socket is one root can trust (trust.py)."""
        import time

        from hvcpolicy.trust import check_qmp_socket

        while True:
            try:
                check_qmp_socket(path)
                self._settimeout(deadline)
                self.sock.connect(path)
                return
            except (FileNotFoundError, ConnectionRefusedError, PermissionError):
                if time.monotonic() >= deadline:
                    raise
                self.sock.close()
                self.sock = self._socket()
                time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    def _socket(self) -> Any:
        import _socket  # socket.py imports enum, selectors and more; the C module is enough

        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        return sock

    def _settimeout(self, deadline: float) -> None:
        """The socket's timeout: what is left until ``deadline``; past it, TimeoutError."""
        import time

        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)

    def __enter__(self) -> HookQMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _message(self, deadline: float) -> dict[str, Any]:
        """The next message, whole, before ``deadline`` (TimeoutError past it)."""
        from hvcpolicy.lean import json_loads  # json imports re and compiles its patterns

        while True:
            end = self.buf.find(b"\n", self._scanned)
            if end >= 0:
                break
            self._scanned = len(self.buf)
            if len(self.buf) > self.MAX_MESSAGE:
                raise Unavailable(
                    f"QMP {self.path}: a message larger than {self.MAX_MESSAGE >> 20} MiB"
                )
            self._settimeout(deadline)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Unavailable(f"QMP {self.path}: connection closed")
            self.buf += chunk
        if end > self.MAX_MESSAGE:
            raise Unavailable(
                f"QMP {self.path}: a message larger than {self.MAX_MESSAGE >> 20} MiB"
            )
        line = bytes(self.buf[:end])
        del self.buf[: end + 1]
        self._scanned = 0
        try:
            doc = json_loads(line)
        except (ValueError, RecursionError):
            raise Unavailable(f"QMP {self.path}: not JSON: {line[:80]!r}") from None
        if not isinstance(doc, dict):
            raise Unavailable(f"QMP {self.path}: not a JSON object")
        return doc

    def _next_id(self) -> str:
        self._ids += 1
        return f"hvc-{os.getpid()}-{self._ids}"

    def _send(self, data: bytes, deadline: float) -> None:
        self._settimeout(deadline)
        self.sock.sendall(data)

    def _result(self, name: str, msg: dict[str, Any], reply: dict[str, Any], expect: Any) -> Any:
        """The ``return`` of ``reply`` (of type ``expect`` when given); QMPError on ``error``."""
        from hvcpolicy.errors import QMPError, bounded

        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            cls = bounded(str(err.get("class", "?")))
            desc = bounded(str(err.get("desc", "")))
            raise QMPError(f"QMP {name}: {cls}: {desc}", sent=msg, received=reply, error_class=cls)
        if "return" not in reply:
            raise QMPError(
                f"QMP {name}: a reply with neither 'return' nor 'error'", sent=msg, received=reply
            )
        ret = reply["return"]
        if expect is not None and not isinstance(ret, expect):
            raise QMPError(
                f"QMP {name}: 'return' is {type(ret).__name__}, not {expect.__name__}",
                sent=msg,
                received=reply,
            )
        return ret

    def cmd(
        self,
        name: str,
        arguments: dict[str, Any] | None = None,
        expect: Any = None,
        deadline: float | None = None,
    ) -> Any:
        """Run one command; its reply within ``timeout`` (or ``deadline``) as a whole."""
        import time

        from hvcpolicy.errors import QMPTimeout
        from hvcpolicy.lean import json_dumps

        if deadline is None:
            deadline = time.monotonic() + self.timeout
        msg: dict[str, Any] = {"execute": name, "id": self._next_id()}
        if arguments is not None:
            msg["arguments"] = arguments
        try:
            self._send(json_dumps(msg).encode(), deadline)
            while True:
                reply = self._message(deadline)
                if reply.get("id") != msg["id"] or "event" in reply:
                    continue  # an event, or a stray reply: not ours
                return self._result(name, msg, reply, expect)
        except TimeoutError:
            raise QMPTimeout(f"QMP {name}: no answer within {self.timeout:g} s", sent=msg) from None
        except OSError as err:
            raise Unavailable(f"QMP {name}: {err.strerror or err}") from None

    def pipelined(self, name: str, batch: list[dict[str, Any]], expect: Any = None) -> list[Any]:
        """Send every command of ``batch`` at once, then collect the replies by id: one round
        trip plus QEMU's work, not one round trip per vCPU. ``timeout`` bounds the batch."""
        import time

        from hvcpolicy.errors import QMPTimeout
        from hvcpolicy.lean import json_dumps

        deadline = time.monotonic() + self.timeout
        msgs = [{"execute": name, "arguments": a, "id": self._next_id()} for a in batch]
        wanted = {str(m["id"]) for m in msgs}
        replies: dict[str, dict[str, Any]] = {}
        try:
            self._send("".join(json_dumps(m) for m in msgs).encode(), deadline)
            while len(replies) < len(msgs):
                reply = self._message(deadline)
                rid = reply.get("id")
                if isinstance(rid, str) and rid in wanted and "event" not in reply:
                    replies[rid] = reply
        except TimeoutError:
            raise QMPTimeout(f"QMP {name}: no answer within {self.timeout:g} s") from None
        except OSError as err:
            raise Unavailable(f"QMP {name}: {err.strerror or err}") from None
        return [self._result(name, m, replies[str(m["id"])], expect) for m in msgs]

    def runstate(self) -> str:
        status = self.cmd("query-status", expect=dict).get("status")
        if not isinstance(status, str):
            raise Unavailable("QMP query-status: no 'status' string")
        return status

    def vcpus(self) -> list[str]:
        if self._vcpus is None:
            cpus = self.cmd("query-cpus-fast", expect=list)
            paths = [c.get("qom-path") if isinstance(c, dict) else None for c in cpus]
            if not all(isinstance(p, str) for p in paths):
                raise Unavailable("QMP query-cpus-fast: a vCPU without a 'qom-path' string")
            if not paths:
                raise Unavailable("QMP query-cpus-fast: no vCPUs")
            props = self.cmd("qom-list", {"path": paths[0]}, expect=list)
            if not any(isinstance(p, dict) and p.get("name") == self.PROP for p in props):
                from hvcpolicy.errors import InterfaceMissing

                raise InterfaceMissing(
                    f"QEMU at {self.path} has no {self.PROP} property on its vCPUs: it offers no "
                    "firmware-register interface"
                )
            self._vcpus = [str(p) for p in paths]
        return self._vcpus

    def read(self, path: str) -> dict[int, int]:
        return self._registers(
            self.cmd("qom-get", {"path": path, "property": self.PROP}, expect=dict)
        )

    def _registers(self, doc: Any) -> dict[int, int]:
        if not isinstance(doc, dict):
            raise Unavailable(f"QMP qom-get {self.PROP}: not an object")
        try:
            out = {int(k, 0): v for k, v in doc.items()}
        except (TypeError, ValueError):
            raise Unavailable(f"QMP qom-get {self.PROP}: ids and values malformed") from None
        if not all(type(v) is int for v in out.values()):
            raise Unavailable(f"QMP qom-get {self.PROP}: ids and values malformed")
        return out

    def read_all(self) -> dict[int, int]:
        """Registers are per VM: the first vCPU's view."""
        return self.read(self.vcpus()[0])

    def read_every_vcpu(self) -> dict[int, int]:
        paths = self.vcpus()
        docs = self.pipelined(
            "qom-get", [{"path": p, "property": self.PROP} for p in paths], expect=dict
        )
        first = self._registers(docs[0])
        for path, doc in zip(paths[1:], docs[1:], strict=True):
            if self._registers(doc) != first:
                raise Unavailable(f"vCPU {path} reads other firmware registers than {paths[0]}")
        return first

    def write(self, writes: Mapping[int, int]) -> None:
        value = {f"0x{rid:016x}": v for rid, v in writes.items()}
        self.cmd("qom-set", {"path": self.vcpus()[0], "property": self.PROP, "value": value})
