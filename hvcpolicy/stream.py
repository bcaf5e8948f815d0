"""QEMU's migration stream: every vCPU's cpreg list, found from the stream's own description.

Pure: bytes in, records out. The stream ends with ``QEMU_VM_EOF`` and a JSON description of every
non-iterative device section (the "vmdesc": ``0x06``, be32 length, JSON). Those sections sit just
before ``QEMU_VM_EOF``, so their sizes, summed, say where they begin; from there every section
header (type, id, name, instance id, version) and footer is checked against the vmdesc, and each
``cpu`` section's cpreg arrays are read at the offsets its field sizes give. Only the stream's tail
is read, so a sparse (mapped-ram) image is never read whole. Whatever cannot be accounted for is
refused with :class:`~hvcpolicy.errors.InvalidInput`, never guessed at.

Each vCPU's ``cpu`` section holds ``cpreg_vmstate_array_len`` (be32 N), N be64 KVM register ids
(sorted) and N be64 values. Every vCPU carries its own copy of the per-VM firmware registers and
QEMU loads the vCPUs one after another, so the last one decides what KVM keeps: an edit is made to
every vCPU's list (:meth:`Stream.edits`).
"""

from __future__ import annotations

import itertools
import json
import struct

from hvcpolicy import catalogue as cat
from hvcpolicy.errors import InvalidInput
from hvcpolicy.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from typing import Any, Protocol

    class Buffer(Protocol):
        """What the parsers read: ``bytes``, or a file view that reads slices on demand."""

        def __len__(self) -> int: ...

        def __getitem__(self, index: slice, /) -> bytes: ...


MAGIC = b"QEVM"
VERSION = 3
EOF = 0x00
SECTION_FULL = 0x04
SUBSECTION = 0x05
VMDESCRIPTION = 0x06
FOOTER = 0x7E

CPU_SECTION = "cpu"
_COUNT_FIELD = "cpreg_vmstate_array_len"
_IDS_FIELD = "cpreg_vmstate_indexes"
_VALUES_FIELD = "cpreg_vmstate_values"

# Bounds: a vmdesc of a large guest is some hundred KiB; device sections some MiB.
MAX_VMDESC = 64 << 20
MAX_CPREGS = 1 << 16
_FIRST_TAIL = 256 << 10
_U64 = (1 << 64) - 1


class Edit(Record):
    """One 8-byte big-endian value to overwrite in place: ``offset`` is absolute in the buffer."""

    __slots__ = ("new", "offset", "old", "register", "vcpu")

    def __init__(self, vcpu: int, register: int, offset: int, old: int, new: int) -> None:
        self.vcpu = vcpu  # the vCPU's instance id
        self.register = register
        self.offset = offset
        self.old = old
        self.new = new


class VCpu(Record):
    """One vCPU's cpreg list as the stream carries it."""

    __slots__ = ("ids_offset", "instance_id", "registers", "values_offset")

    def __init__(
        self, instance_id: int, ids_offset: int, values_offset: int, registers: dict[int, int]
    ) -> None:
        self.instance_id = instance_id
        self.ids_offset = ids_offset  # absolute offset of the first be64 id
        self.values_offset = values_offset  # absolute offset of the first be64 value
        self.registers = registers  # the whole list, {id: value}, in the stream's (sorted) order

    @property
    def firmware(self) -> dict[int, int]:
        """The firmware registers (coproc 0x14 and 0x16) of this vCPU's list."""
        return {r: v for r, v in self.registers.items() if cat.is_firmware_reg(r)}

    def value_offset(self, rid: int) -> int:
        """Absolute offset of ``rid``'s be64 value (KeyError when the list lacks it)."""
        if rid not in self.registers:
            raise KeyError(rid)
        return self.values_offset + 8 * list(self.registers).index(rid)


class Stream(Record):
    """A QEMU migration stream's vCPUs. ``start``/``end``: where the stream is in the buffer."""

    __slots__ = ("end", "start", "vcpus", "vmdesc_offset", "where")

    def __init__(
        self, where: str, start: int, end: int, vcpus: tuple[VCpu, ...], vmdesc_offset: int
    ) -> None:
        self.where = where
        self.start = start
        self.end = end
        self.vcpus = vcpus  # in stream order (the order QEMU loads them)
        self.vmdesc_offset = vmdesc_offset  # the 0x06 byte that begins the vmdesc

    def firmware(self) -> dict[int, int]:
        """The firmware registers every vCPU agrees on (the parser refused any disagreement)."""
        return self.vcpus[0].firmware

    def edits(self, changes: Mapping[int, int], *, any_register: bool = False) -> list[Edit]:
        """The in-place edits that give every vCPU these values: only values that change, in
        stream order. Refuses an id some vCPU's list lacks, a value that is not a u64, and
        (unless ``any_register``) an id that is not a firmware register."""
        for rid, value in changes.items():
            if not any_register and not cat.is_firmware_reg(rid):
                raise InvalidInput(
                    f"{cat.fmt_id(rid)} is not a firmware register; only those are written",
                    self.where,
                )
            if not 0 <= value <= _U64:
                raise InvalidInput(f"{cat.reg_name(rid)} = {value} is not a u64", self.where)
        out: list[Edit] = []
        for cpu in self.vcpus:
            index = {rid: i for i, rid in enumerate(cpu.registers)}
            for rid in sorted(changes):
                if rid not in index:
                    raise InvalidInput(
                        f"vCPU {cpu.instance_id}'s cpreg list has no {cat.reg_name(rid)}",
                        self.where,
                    )
                old, new = cpu.registers[rid], changes[rid]
                if old != new:
                    offset = cpu.values_offset + 8 * index[rid]
                    out.append(Edit(cpu.instance_id, rid, offset, old, new))
        return out


def apply(data: bytes, edits: Iterable[Edit]) -> bytes:
    """``data`` with the edits made (same length); each edit's old value must be there."""
    out = bytearray(data)
    for e in edits:
        (old,) = struct.unpack_from(">Q", out, e.offset)
        if old != e.old:
            raise InvalidInput(
                f"vCPU {e.vcpu} {cat.reg_name(e.register)} is {cat.fmt_value(old)} at offset "
                f"{e.offset}, not {cat.fmt_value(e.old)}: the stream changed"
            )
        struct.pack_into(">Q", out, e.offset, e.new)
    return bytes(out)


def replace_lists(data: bytes, lists: Sequence[Mapping[int, int]], where: str = "stream") -> bytes:
    """The bare stream ``data`` with vCPU i's whole cpreg list replaced by ``lists[i]`` (sorted
    on the way), its count and the vmdesc's ``array_len`` rewritten to match: lists may grow or
    shrink. For building streams (the lab's transplants, tests); enforcement edits in place."""
    stream = parse_stream(data, where)
    if len(lists) != len(stream.vcpus):
        raise InvalidInput(f"{len(lists)} lists for {len(stream.vcpus)} vCPUs", where)
    doc = json.loads(data[stream.vmdesc_offset + 5 :])
    out = bytearray()
    done = 0
    for cpu, regs in zip(stream.vcpus, lists, strict=True):
        out += data[done : cpu.ids_offset - 4]
        ids = sorted(regs)
        out += struct.pack(f">i{len(ids)}Q{len(ids)}Q", len(ids), *ids, *(regs[i] for i in ids))
        done = cpu.values_offset + 8 * len(cpu.registers)
    sizes = iter(len(regs) for regs in lists)
    for dev in doc["devices"]:
        if dev["name"] == CPU_SECTION:
            n = next(sizes)
            for field in dev["fields"]:
                if field["name"] in (_IDS_FIELD, _VALUES_FIELD):
                    field["array_len"] = n
    text = json.dumps(doc).encode()
    out += data[done : stream.vmdesc_offset]
    out += bytes([VMDESCRIPTION]) + struct.pack(">I", len(text)) + text
    return bytes(out)


# --- parsing --------------------------------------------------------------------------------


class _Bad(Exception):
    """Internal: what is wrong, turned into InvalidInput naming the file."""


def _read(buf: Buffer, at: int, n: int, end: int) -> bytes:
    if at < 0 or n < 0 or at + n > end:
        raise _Bad("truncated: a section runs past the end of the stream")
    data = buf[at : at + n]
    if len(data) != n:
        raise _Bad("truncated: the file is shorter than it said")
    return data


def _find_vmdesc(buf: Buffer, start: int, end: int) -> tuple[int, bytes]:
    """(offset of the 0x06 byte, the JSON) of the vmdesc that ends the stream."""
    size = _FIRST_TAIL
    limit = min(end - start, MAX_VMDESC + 5)
    while True:
        lo = max(end - size, end - limit)
        tail = _read(buf, lo, end - lo, end)
        # The JSON is the last thing in the stream and holds no control bytes, so the vmdesc
        # begins at the '{' preceded by 0x06 and a be32 length that reaches exactly the end.
        pos = len(tail)
        while True:
            pos = tail.rfind(b"{", 0, pos)
            if pos < 5:
                break
            if tail[pos - 5] == VMDESCRIPTION:
                (length,) = struct.unpack_from(">I", tail, pos - 4)
                if pos + length == len(tail):
                    return lo + pos - 5, tail[pos:]
        if lo <= end - limit:
            raise _Bad(
                "no vmdesc (0x06, length, JSON) at the end of the stream: truncated, or saved "
                "without a description (suppress-vmdesc)"
            )
        size *= 4


def _int(obj: dict[str, Any], key: str, what: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if type(value) is not int or value < 0:
        raise _Bad(f"vmdesc: {what} has no valid {key!r}")
    return value


def _fields(desc: dict[str, Any], what: str) -> list[tuple[str, int, int]]:
    """[(name, element size, element count)] of a vmdesc object's fields."""
    fields = desc.get("fields", [])
    if not isinstance(fields, list):
        raise _Bad(f"vmdesc: {what} has no field list")
    out = []
    for f in fields:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise _Bad(f"vmdesc: {what} has a field without a name")
        name = f["name"]
        out.append((name, _int(f, "size", f"{what}.{name}"), _int(f, "array_len", name, 1)))
    return out


def _body_size(desc: dict[str, Any], what: str, depth: int = 0) -> int:
    """Bytes of a section's (or subsection's) body: its fields, then its subsections, each with
    its own header (0x05, name length, name, be32 version)."""
    if depth > 32:
        raise _Bad(f"vmdesc: {what}: subsections nested too deep")
    total = sum(size * count for _, size, count in _fields(desc, what))
    subs = desc.get("subsections", [])
    if not isinstance(subs, list):
        raise _Bad(f"vmdesc: {what} has a bad subsection list")
    for sub in subs:
        if not isinstance(sub, dict) or not isinstance(sub.get("vmsd_name"), str):
            raise _Bad(f"vmdesc: {what} has a subsection without a name")
        name = sub["vmsd_name"]
        if not (0 < len(name) < 256 and name.isascii()):
            raise _Bad(f"vmdesc: {what} has a subsection with a bad name")
        total += 6 + len(name) + _body_size(sub, f"{what}/{name}", depth + 1)
    return total


class _Device(Record):
    __slots__ = ("body", "desc", "instance_id", "name", "version")

    def __init__(
        self, name: str, instance_id: int, version: int | None, body: int, desc: dict[str, Any]
    ) -> None:
        self.name = name
        self.instance_id = instance_id
        self.version = version
        self.body = body
        self.desc = desc

    @property
    def header(self) -> int:
        return 14 + len(self.name)  # 0x04, be32 id, len, name, be32 instance, version


def _devices(doc: object) -> list[_Device]:
    if not isinstance(doc, dict) or not isinstance(doc.get("devices"), list):
        raise _Bad("vmdesc: no device list")
    out = []
    for i, dev in enumerate(doc["devices"]):
        if not isinstance(dev, dict) or not isinstance(dev.get("name"), str):
            raise _Bad(f"vmdesc: device {i} has no name")
        name = dev["name"]
        if not (0 < len(name) < 256 and name.isascii()):
            raise _Bad(f"vmdesc: device {i} has a bad name")
        what = f"{name}[{dev.get('instance_id')}]"
        version = _int(dev, "version", what) if "version" in dev else None
        body = _body_size(dev, what)
        out.append(_Device(name, _int(dev, "instance_id", what), version, body, dev))
    return out


def _cpu(buf: Buffer, dev: _Device, body_at: int, end: int) -> VCpu:
    """The cpreg list of one ``cpu`` section whose body begins at ``body_at``."""
    what = f"vCPU {dev.instance_id}"
    names = [name for name, _, _ in _fields(dev.desc, what)]
    try:
        k = names.index(_COUNT_FIELD)
    except ValueError:
        raise _Bad(f"{what}: its cpu section has no cpreg list (unknown layout)") from None
    fields = _fields(dev.desc, what)
    if names[k + 1 : k + 3] != [_IDS_FIELD, _VALUES_FIELD]:
        raise _Bad(f"{what}: cpreg fields not in the known order (unknown layout)")
    (_, csize, ccount), (_, isize, n), (_, vsize, vn) = fields[k : k + 3]
    if (csize, ccount, isize, vsize) != (4, 1, 8, 8) or n != vn:
        raise _Bad(f"{what}: cpreg fields of unexpected sizes (unknown layout)")
    at = body_at + sum(size * count for _, size, count in fields[:k])
    (count,) = struct.unpack(">i", _read(buf, at, 4, end))
    if count != n:
        raise _Bad(f"{what}: the stream says {count} cpregs, its vmdesc {n}")
    if not 0 < n <= MAX_CPREGS:
        raise _Bad(f"{what}: {n} cpregs")
    arrays = _read(buf, at + 4, 16 * n, end)
    ids = struct.unpack_from(f">{n}Q", arrays, 0)
    values = struct.unpack_from(f">{n}Q", arrays, 8 * n)
    for a, b in itertools.pairwise(ids):
        if a >= b:
            raise _Bad(f"{what}: cpreg ids not sorted ({cat.fmt_id(a)} before {cat.fmt_id(b)})")
    return VCpu(dev.instance_id, at + 4, at + 4 + 8 * n, dict(zip(ids, values, strict=True)))


def _walk(buf: Buffer, devs: list[_Device], at: int, end: int, footers: bool) -> list[VCpu]:
    """Check every section header (and footer) from ``at``; the vCPUs' cpreg lists."""
    vcpus: list[VCpu] = []
    seen: set[int] = set()
    for dev in devs:
        head = _read(buf, at, dev.header, end)
        name = dev.name.encode()
        if head[0] != SECTION_FULL or head[5] != len(name) or head[6 : 6 + len(name)] != name:
            raise _Bad(f"no section header of {dev.name!r} where its vmdesc puts it")
        (section_id,) = struct.unpack_from(">I", head, 1)
        instance, version = struct.unpack_from(">II", head, 6 + len(name))
        if instance != dev.instance_id:
            raise _Bad(
                f"section {dev.name!r} is instance {instance}, its vmdesc says {dev.instance_id}"
            )
        if dev.version is not None and version != dev.version:
            raise _Bad(f"section {dev.name!r} is version {version}, its vmdesc says {dev.version}")
        if section_id in seen:
            raise _Bad(f"section id {section_id} ({dev.name!r}) used twice")
        seen.add(section_id)
        body_at = at + dev.header
        if dev.name == CPU_SECTION:
            vcpus.append(_cpu(buf, dev, body_at, end))
        at = body_at + dev.body
        if footers:
            foot = _read(buf, at, 5, end)
            if foot[0] != FOOTER or struct.unpack_from(">I", foot, 1)[0] != section_id:
                raise _Bad(f"section {dev.name!r} does not end where its vmdesc says")
            at += 5
    return vcpus


def _agree(vcpus: list[VCpu]) -> None:
    first = vcpus[0]
    fw = first.firmware
    for cpu in vcpus[1:]:
        other = cpu.firmware
        for rid in sorted(fw.keys() | other.keys()):
            a, b = fw.get(rid), other.get(rid)
            if a != b:
                show = [("absent" if x is None else cat.fmt_value(x)) for x in (a, b)]
                raise _Bad(
                    f"vCPUs disagree on {cat.reg_name(rid)}: vCPU {first.instance_id} "
                    f"{show[0]}, vCPU {cpu.instance_id} {show[1]}"
                )


def parse_stream(buf: Buffer, where: str, start: int = 0, end: int | None = None) -> Stream:
    """The vCPUs of the QEMU migration stream at ``buf[start:end]`` (``end``: the buffer's end).

    Reads the stream's first 8 bytes and its tail only. Offsets in the result are absolute in
    ``buf``. Raises InvalidInput (``where: what is wrong``) for anything it cannot account for.
    """
    try:
        return _parse(buf, where, start, len(buf) if end is None else end)
    except _Bad as err:
        raise InvalidInput(str(err), where) from None


def _parse(buf: Buffer, where: str, start: int, end: int) -> Stream:
    if not 0 <= start <= end <= len(buf):
        raise _Bad("truncated: no stream after the header")
    head = buf[start : start + 8]
    if len(head) < 8 or head[:4] != MAGIC:
        raise _Bad("not a QEMU migration stream (no QEVM magic)")
    (version,) = struct.unpack_from(">I", head, 4)
    if version != VERSION:
        raise _Bad(f"QEMU migration stream version {version}, not {VERSION}")
    desc_at, text = _find_vmdesc(buf, start + 8, end)
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise _Bad("the vmdesc at the end of the stream is not JSON") from None
    devs = _devices(doc)
    eof_at = desc_at - 1
    if _read(buf, eof_at, 1, end)[0] != EOF:
        raise _Bad("no QEMU_VM_EOF before the vmdesc")
    errors = []
    for footers in (True, False):
        length = sum(d.header + d.body + (5 if footers else 0) for d in devs)
        at = eof_at - length
        if at < start + 8:
            errors.append("the vmdesc describes more than the stream holds")
            continue
        try:
            vcpus = _walk(buf, devs, at, eof_at, footers)
        except _Bad as err:
            errors.append(str(err))
            continue
        break
    else:
        raise _Bad(errors[0])
    if not vcpus:
        raise _Bad("no cpu section: not a guest's stream, or an unknown layout")
    ids = [c.instance_id for c in vcpus]
    if len(set(ids)) != len(ids):
        raise _Bad(f"two cpu sections with one instance id ({sorted(ids)})")
    _agree(vcpus)
    return Stream(where, start, end, tuple(vcpus), desc_at)
