"""Synthetic saved guests built from real ones: a real QEMU stream with firmware registers put
into every vCPU's cpreg list (TCG lists have none), and libvirt save headers around a stream.

The builders rewrite the cpu sections and the vmdesc consistently (counts, ``array_len``, the
vmdesc length), so the result is what QEMU on KVM would have written for these lists."""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

from hvcpolicy.snapshot import load_snapshot
from hvcpolicy.stream import parse_stream, replace_lists
from tests.conftest import EXAMPLES

KERNEL_618 = load_snapshot(str(EXAMPLES / "hosts" / "neoverse-n1_linux-6.18.json")).registers
KERNEL_61 = load_snapshot(str(EXAMPLES / "hosts" / "neoverse-n1_linux-6.1.json")).registers
PSCI, WA1, WA2, WA3 = (0x6030000000140000 + i for i in range(4))
STD, STD_HYP, VENDOR, VENDOR2 = (0x6030000000160000 + i for i in range(4))
TPIDR_EL0 = 0x603000000013DE82  # a per-vCPU TCG register: shows which vCPU got which value


def with_firmware(data: bytes, firmware: Mapping[int, int] | Sequence[Mapping[int, int]]) -> bytes:
    """The stream with these firmware registers added to every vCPU's list (one mapping for all,
    or one per vCPU)."""
    stream = parse_stream(data, "seed")
    per = [firmware] * len(stream.vcpus) if isinstance(firmware, Mapping) else firmware
    return replace_lists(
        data, [{**c.registers, **fw} for c, fw in zip(stream.vcpus, per, strict=True)]
    )


def save_header(
    stream: bytes,
    xml: str = "<domain type='kvm'><name>web1</name></domain>",
    *,
    magic: bytes = b"LibvirtQemudSave",
    version: int = 2,
    was_running: int = 0,
    fmt: int = 0,
    pad: int = 65536,
    order: str = "<",
) -> bytes:
    """A libvirt save image (virQEMUSaveHeader, XML, NUL, padding) around ``stream``."""
    data = xml.encode() + b"\0"
    data += b"\0" * max(0, pad - len(data))
    head = magic + struct.pack(f"{order}5I", version, len(data), was_running, fmt, 0)
    head += b"\0" * (92 - len(head))
    return head + data + stream
