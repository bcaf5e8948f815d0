"""A hostile QMP server for fuzzing hvcpolicy's QMP client (hvcpolicy.qmp).

It speaks just enough QMP to lead a client through an enforcement (greeting, capabilities,
query-status, query-cpus-fast, qom-list, qom-get, qom-set, cont), and for each connection takes
a *script* from the fuzzer: per message, send it as is, mutate its bytes, replace it by a
mutated tree, truncate it, pad it, drip it slowly, prepend a stray reply or event, give it a
wrong id, swap it with the next one, send nothing, or hang up.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from tests.hardening.fuzzlib import Mutator, mutate_tree

FRESH = {
    "0x6030000000140000": 0x10003,
    "0x6030000000140001": 2,
    "0x6030000000140002": 0,
    "0x6030000000140003": 1,
    "0x6030000000160000": 1,
    "0x6030000000160001": 1,
    "0x6030000000160002": 3,
    "0x6030000000160003": 0,
}
GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}
CPU = "/machine/unattached/device[0]"
KEYS = ["return", "error", "id", "event", "QMP", "class", "desc", "status", "qom-path", "name"]
QMP_TOKENS = [b"{", b"}", b"[", b"]", b",", b":", b'"', b"\r\n", b"\n", b"\\u0000", b"1e999"]
ACTIONS = (
    ["ok"] * 24
    + ["bytes", "bytes", "tree", "tree", "truncate", "stray", "event", "wrong-id", "swap"]
    + ["hangup", "pad", "drip", "hang", "garbage-after"]
)


def answer(cmd: dict[str, Any], written: dict[str, int]) -> dict[str, Any]:
    name = cmd.get("execute")
    ret: Any = {}
    if name == "query-status":
        ret = {"status": "prelaunch", "running": False, "singlestep": False}
    elif name == "query-cpus-fast":
        ret = [{"cpu-index": 0, "qom-path": CPU, "thread-id": 1, "target": "aarch64"}]
    elif name == "qom-list":
        ret = [
            {"name": "type", "type": "string"},
            {"name": "kvm-firmware-registers", "type": "any"},
        ]
    elif name == "qom-get":
        ret = {**FRESH, **written}
    elif name == "qom-set":
        args = cmd.get("arguments", {})
        value = args.get("value") if isinstance(args, dict) else None
        if isinstance(value, dict):
            written.update({k: v for k, v in value.items() if isinstance(v, int)})
    reply: dict[str, Any] = {"return": ret}
    if "id" in cmd:
        reply["id"] = cmd["id"]
    return reply


class HostileQMP:
    """Serves one connection at a time on ``path``; ``script(seed)`` arms the next one."""

    def __init__(self, path: str, drip_pause: float) -> None:
        self.path = path
        self.drip_pause = drip_pause
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.seed = 0
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def script(self, seed: int) -> None:
        self.seed = seed

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                self._session(conn, random.Random(self.seed))

    def _send(self, conn: socket.socket, rng: random.Random, msg: dict[str, Any]) -> bool:
        """Send one message under a random action; False: the session is over."""
        action = rng.choice(ACTIONS)
        data = json.dumps(msg).encode() + b"\r\n"
        if action == "bytes":
            data = Mutator([data], QMP_TOKENS, rng).one()
        elif action == "tree":
            data = json.dumps(mutate_tree(msg, rng, KEYS), allow_nan=True).encode() + b"\r\n"
        elif action == "truncate":
            data = data[: rng.randrange(len(data))] + rng.choice([b"\r\n", b""])
        elif action == "stray":
            data = json.dumps({"return": rng.choice([{}, [], 0, None])}).encode() + b"\r\n" + data
        elif action == "event":
            data = b'{"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 0}}\r\n' + data
        elif action == "wrong-id":
            data = json.dumps({**msg, "id": rng.choice(["x", 12345, [1], {"a": 1}])}).encode()
            data += b"\r\n"
        elif action == "pad":
            data = data[:-2] + b" " * rng.choice((1 << 16, 1 << 20, 3 << 20)) + b"\r\n"
        elif action == "garbage-after":
            data += rng.choice([b"}", b"\x00\xff", b"{" * 100, b"\r\n\r\n"])
        elif action == "hangup":
            conn.sendall(data[: rng.randrange(len(data) + 1)])
            return False
        elif action == "hang":
            time.sleep(self.drip_pause * 8)
            return False
        elif action == "drip":
            for i in range(0, len(data), 3):
                conn.sendall(data[i : i + 3])
                time.sleep(self.drip_pause)
                if self.stop:
                    return False
            return True
        conn.sendall(data)
        return True

    def _session(self, conn: socket.socket, rng: random.Random) -> None:
        conn.settimeout(self.drip_pause * 10)
        written: dict[str, int] = {}
        if not self._send(conn, rng, GREETING):
            return
        buf = b""
        decoder = json.JSONDecoder()
        held: dict[str, Any] | None = None
        while not self.stop:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
            while True:
                text = buf.decode("utf-8", "replace").lstrip()
                if not text:
                    buf = b""
                    break
                try:
                    cmd, end = decoder.raw_decode(text)
                except ValueError:
                    break
                buf = text[end:].encode()
                if not isinstance(cmd, dict):
                    continue
                reply = answer(cmd, written)
                if held is None and rng.random() < 0.03:  # hold this reply past the next one
                    held = reply
                    continue
                if not self._send(conn, rng, reply):
                    return
                if held is not None:
                    if not self._send(conn, rng, held):
                        return
                    held = None


@contextlib.contextmanager
def hostile_qmp(drip_pause: float) -> Iterator[HostileQMP]:
    d = tempfile.mkdtemp(prefix="hvf-", dir="/tmp")
    server = HostileQMP(os.path.join(d, "q.qmp"), drip_pause)
    try:
        yield server
    finally:
        server.close()
        with contextlib.suppress(OSError):
            os.unlink(server.path)
        os.rmdir(d)
