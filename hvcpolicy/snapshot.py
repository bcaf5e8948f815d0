"""Host snapshots (SPEC.md section 5): what one host's KVM lists, and the fleet's baseline.

Stdlib only at import time: the hook and the arm64 lab load snapshots without jsonschema. The
hand-written checks here and schemas/snapshot.schema.json agree (tests hold them together).
"""

from __future__ import annotations

import json
import re

from hvcpolicy import catalogue as cat
from hvcpolicy.errors import InvalidInput, bounded
from hvcpolicy.files import read_bounded
from hvcpolicy.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

API_VERSION = "hvcpolicy/v1"
KIND = "HostSnapshot"
SOURCES = ("kvm", "qmp", "simulated", "baseline")
DEFAULT_PATH = "/var/lib/hvcpolicy/host.json"
_FIELDS = {"apiVersion", "kind", "host", "kernel", "taken", "source", "qemu", "registers"}


class Snapshot(Record):
    __slots__ = ("host", "kernel", "qemu", "registers", "source", "taken")

    def __init__(
        self,
        host: str,
        kernel: str,
        source: str,
        registers: dict[int, int],
        taken: str | None = None,
        qemu: str | None = None,
    ) -> None:
        self.host = host
        self.kernel = kernel
        self.source = source
        self.registers = registers
        self.taken = taken
        self.qemu = qemu

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "host": self.host,
            "kernel": self.kernel,
        }
        if self.taken is not None:
            doc["taken"] = self.taken
        doc["source"] = self.source
        if self.qemu is not None:
            doc["qemu"] = self.qemu
        doc["registers"] = {
            cat.fmt_id(rid): cat.fmt_value(v) for rid, v in sorted(self.registers.items())
        }
        return doc

    def register_key(self) -> tuple[tuple[tuple[int, int], ...], str | None]:
        """What decides every verdict about this host: its registers and its QEMU."""
        return tuple(sorted(self.registers.items())), self.qemu


_QEMU_VERSION = re.compile(r"([0-9]+)\.([0-9]+)(?:\.([0-9]+))?")  # a prefix: "7.2.0-rc1"
_TAKEN = re.compile(  # RFC 3339, as `host probe` writes it
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})"
)


def qemu_version(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    m = _QEMU_VERSION.match(text)
    if m is None:
        return None
    return int(m[1]), int(m[2]), int(m[3] or 0)


def parse_snapshot(doc: object, where: str) -> Snapshot:
    """Check a decoded snapshot document; InvalidInput names the field at fault."""
    if not isinstance(doc, dict):
        raise InvalidInput("a host snapshot must be a JSON object", where)
    for key in doc:
        if key not in _FIELDS:
            raise InvalidInput(f"unknown field {bounded(str(key), 60)!r}", where)
    if doc.get("apiVersion") != API_VERSION:
        raise InvalidInput(f"apiVersion: must be {API_VERSION!r}", where)
    if doc.get("kind") != KIND:
        raise InvalidInput(f"kind: must be {KIND!r}", where)
    text: dict[str, str] = {}
    for key in ("host", "kernel"):
        value = doc.get(key)
        if not isinstance(value, str) or not 0 < len(value) <= 256:
            raise InvalidInput(f"{key}: must be a non-empty string (at most 256 chars)", where)
        text[key] = value
    source = doc.get("source")
    if source not in SOURCES:
        raise InvalidInput(f"source: must be one of {', '.join(SOURCES)}", where)
    taken = doc.get("taken")
    if taken is not None and (not isinstance(taken, str) or not _TAKEN.fullmatch(taken)):
        raise InvalidInput("taken: must be an RFC 3339 date-time like 2026-11-24T23:00:00Z", where)
    qemu = doc.get("qemu")
    if qemu is not None and (
        not isinstance(qemu, str) or len(qemu) > 64 or qemu_version(qemu) is None
    ):
        raise InvalidInput("qemu: must be a QEMU version like '7.2.0'", where)
    regs = doc.get("registers")
    if not isinstance(regs, dict):
        raise InvalidInput("registers: must be an object of register id -> value", where)
    registers = cat.parse_register_map(
        regs.items(), where, "registers", lambda rid: f"registers.{rid}"
    )
    return Snapshot(
        host=text["host"],
        kernel=text["kernel"],
        source=str(source),
        registers=registers,
        taken=taken,
        qemu=qemu,
    )


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {bounded(key, 60)!r}")
        out[key] = value
    return out


def decode_json(data: bytes, where: str) -> object:
    """JSON with duplicate keys refused (the last one silently winning is how policies lie)."""
    try:
        return json.loads(data, object_pairs_hook=_reject_duplicates)
    except RecursionError:
        raise InvalidInput("JSON nested too deeply", where) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidInput(f"not valid JSON: {bounded(str(err), 120)}", where) from None


def load_snapshot(path: str) -> Snapshot:
    return parse_snapshot(decode_json(read_bounded(path), path), path)


def dumps(snap: Snapshot) -> str:
    import json

    return json.dumps(snap.to_json(), indent=2) + "\n"


def save_snapshot(snap: Snapshot, path: str) -> None:
    """Write atomically: a reader sees the old file or the new one, never a torn one."""
    from hvcpolicy.files import write_atomic

    write_atomic(path, dumps(snap), 0o644, ".host.")


# --- baseline ------------------------------------------------------------------------------


def _meet_value(rid: int, a: int, b: int) -> int | None:
    """The least-common value of one register on two hosts; None when there is none."""
    kind = cat.kind_of(rid)
    if kind is cat.Kind.BITMAP or kind is cat.Kind.UNKNOWN_BITMAP:
        return a & b
    if kind is cat.Kind.PSCI or kind is cat.Kind.WORKAROUND or kind is cat.Kind.WORKAROUND2:
        return min(a, b)
    # A firmware register the catalogue does not know has no known order: keep it only where
    # every host agrees, so that a guest carrying it is never promised a host that differs.
    return a if a == b else None


def _kernel_order(kernel: str) -> tuple[tuple[int, int], str]:
    from hvcpolicy.kernel import parse_version

    return parse_version(kernel) or (0, 0), kernel


def meet(a: Snapshot, b: Snapshot) -> Snapshot:
    """The least-common snapshot of two: commutative, associative, idempotent on registers."""
    regs: dict[int, int] = {}
    for rid in a.registers.keys() & b.registers.keys():
        value = _meet_value(rid, a.registers[rid], b.registers[rid])
        if value is not None:
            regs[rid] = value
    qa, qb = qemu_version(a.qemu), qemu_version(b.qemu)
    qemu = None
    if qa is not None and qb is not None and a.qemu is not None and b.qemu is not None:
        qemu = min((qa, a.qemu), (qb, b.qemu))[1]
    kernel = min(a.kernel, b.kernel, key=_kernel_order)
    return Snapshot(
        host="baseline",
        kernel=kernel,
        source="baseline",
        registers=dict(sorted(regs.items())),
        qemu=qemu,
    )


def baseline(snaps: Iterable[Snapshot]) -> Snapshot:
    """Registers on every host, bitmaps ANDed, lowest PSCI and mitigation levels.

    Fleets have few distinct register sets: each distinct one is met once, so the cost is
    linear in hosts and tiny in practice.
    """
    seen: dict[tuple[object, ...], Snapshot] = {}
    for snap in snaps:
        key = (snap.register_key(), snap.kernel)
        if key not in seen:
            seen[key] = snap
    if not seen:
        raise InvalidInput("baseline needs at least one snapshot")
    items = iter(seen.values())
    result = next(items)
    result = meet(result, result)
    for snap in items:
        result = meet(result, snap)
    return result
