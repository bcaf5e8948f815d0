"""lab/guest/migrate.py's edits of a QEMU migration stream, on synthetic streams (no lab needed).

The streams are built the way QEMU writes them (QEVM header, one ``cpu`` section per vCPU with its
cpreg list between other fields, section footers, QEMU_VM_EOF, the vmdesc), so migrate.py reads
them through hvcpolicy.stream exactly as it reads the lab's real ones."""

from __future__ import annotations

import importlib.util
import json
import struct
from collections.abc import Sequence
from types import ModuleType

import pytest

from hvcpolicy.errors import InvalidInput
from hvcpolicy.stream import parse_stream
from tests.lab.labdata import LAB

PSCI, WA1, STD, BMAP2 = (
    0x6030000000140000,
    0x6030000000140001,
    0x6030000000160000,
    0x6030000000160003,
)
SYS_A, SYS_B, DEMUX = 0x603000000013C000, 0x603000000013C100, 0x6020000000110000


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hvclab_migrate", LAB / "guest" / "migrate.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def stream(lists: Sequence[dict[int, int]], ram: bytes = b"\x01RAM...\x00") -> bytes:
    """A QEMU stream with one cpu section per list (instance ids 0, 1, ...)."""
    out = bytearray(b"QEVM\x00\x00\x00\x03" + ram)
    devices = []
    for sid, regs in enumerate(lists, start=10):
        ids = sorted(regs)
        n = len(ids)
        out += b"\x04" + struct.pack(">I", sid) + b"\x03cpu" + struct.pack(">II", sid - 10, 22)
        out += b"\xaa" * 8  # env.pc
        out += struct.pack(f">i{n}Q{n}Q", n, *ids, *(regs[i] for i in ids))
        out += b"\x01"  # power_state
        out += b"\x7e" + struct.pack(">I", sid)
        fields = [
            {"name": "env.pc", "type": "uint64", "size": 8},
            {"name": "cpreg_vmstate_array_len", "type": "int32 le", "size": 4},
            {"name": "cpreg_vmstate_indexes", "array_len": n, "type": "uint64", "size": 8},
            {"name": "cpreg_vmstate_values", "array_len": n, "type": "uint64", "size": 8},
            {"name": "power_state", "type": "bool", "size": 1},
        ]
        devices.append(
            {"name": "cpu", "instance_id": sid - 10, "vmsd_name": "cpu", "version": 22,
             "fields": fields}
        )  # fmt: skip
    text = json.dumps({"page_size": 4096, "devices": devices}).encode()
    return bytes(out + b"\x00\x06" + struct.pack(">I", len(text)) + text)


REGS = {DEMUX: 7, SYS_A: 1, PSCI: 0x10003, WA1: 2, STD: 1, BMAP2: 0}


def test_firmware_read_and_patched_in_every_vcpu() -> None:
    m = load()
    data = stream([REGS, {**REGS, SYS_A: 9}])
    assert m.stream_firmware(data) == {PSCI: 0x10003, WA1: 2, STD: 1, BMAP2: 0}
    out = m.patched(data, {PSCI: 0x10001, BMAP2: 3})
    assert len(out) == len(data)
    want = {PSCI: 0x10001, WA1: 2, STD: 1, BMAP2: 3}
    assert m.vcpu_firmware(out) == [want, want]  # both lists: the last vCPU loaded wins
    assert out.startswith(b"QEVM") and out[-50:] == data[-50:]
    assert [c.registers[SYS_A] for c in parse_stream(out, "x").vcpus] == [1, 9]


def test_patched_refuses_an_id_a_vcpu_lacks() -> None:
    m = load()
    no_bmap2 = {r: v for r, v in REGS.items() if r != BMAP2}
    with pytest.raises(InvalidInput, match="has no VENDOR_HYP_BMAP_2"):
        m.patched(stream([no_bmap2, no_bmap2]), {BMAP2: 3})


def test_transplant_keeps_destination_state_and_takes_source_firmware() -> None:
    m = load()
    src = stream([{SYS_A: 10, SYS_B: 11, PSCI: 0x10001, STD: 0, BMAP2: 3}] * 2, ram=b"S")
    dst = stream(
        [
            {DEMUX: 5, SYS_A: 20, PSCI: 0x10003, STD: 1},
            {DEMUX: 6, SYS_A: 21, PSCI: 0x10003, STD: 1},
        ],
        ram=b"D",
    )
    out = m.transplant(dst, src)
    assert out.startswith(b"QEVM\x00\x00\x00\x03D")
    lists = [c.registers for c in parse_stream(out, "out").vcpus]
    assert lists == [
        {DEMUX: 5, SYS_A: 20, PSCI: 0x10001, STD: 0, BMAP2: 3},
        {DEMUX: 6, SYS_A: 21, PSCI: 0x10001, STD: 0, BMAP2: 3},
    ]
    assert all(list(regs) == sorted(regs) for regs in lists)


def test_vcpus_that_disagree_are_not_read() -> None:
    m = load()
    with pytest.raises(InvalidInput, match="vCPUs disagree on PSCI_VERSION"):
        m.stream_firmware(stream([REGS, {**REGS, PSCI: 0x10001}]))


def test_variants_only_where_they_differ() -> None:
    m = load()
    assert m.variants({PSCI: 0x10001, STD: 1}) == {}
    assert m.variants({PSCI: 0x10003, BMAP2: 0}) == {
        "psci-1.1": {PSCI: 0x10001},
        "psci-1.1-bmap2-3": {PSCI: 0x10001, BMAP2: 3},
    }


def test_the_lab_saves_two_vcpus() -> None:
    assert load().VCPUS == 2
