"""lab/guest/migrate.py's edits of a QEMU migration stream, on synthetic streams (no lab needed)."""

from __future__ import annotations

import importlib.util
import struct
from types import ModuleType

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


def stream(
    regs: dict[int, int], head: bytes = b"\x00cpu\x16", tail: bytes = b"\x7e\x00\x01"
) -> bytes:
    ids = sorted(regs)
    n = len(ids)
    return head + struct.pack(f">i{n}Q{n}Q", n, *ids, *(regs[i] for i in ids)) + tail


def test_firmware_read_and_patched() -> None:
    m = load()
    data = stream({DEMUX: 7, SYS_A: 1, PSCI: 0x10003, WA1: 2, STD: 1, BMAP2: 0})
    assert m.stream_firmware(data) == {PSCI: 0x10003, WA1: 2, STD: 1, BMAP2: 0}
    out = m.patched(data, {PSCI: 0x10001, BMAP2: 3})
    assert len(out) == len(data)
    assert m.stream_firmware(out) == {PSCI: 0x10001, WA1: 2, STD: 1, BMAP2: 3}
    assert out.startswith(b"\x00cpu\x16") and out.endswith(b"\x7e\x00\x01")


def test_transplant_keeps_destination_state_and_takes_source_firmware() -> None:
    m = load()
    src = stream({SYS_A: 10, SYS_B: 11, PSCI: 0x10001, STD: 0, BMAP2: 3}, head=b"S", tail=b"s")
    dst = stream({DEMUX: 5, SYS_A: 20, PSCI: 0x10003, STD: 1}, head=b"D", tail=b"d")
    out = m.transplant(dst, src)
    assert out.startswith(b"D") and out.endswith(b"d")
    start, n = m.cpreg_arrays(out)
    ids = struct.unpack_from(f">{n}Q", out, start)
    values = dict(zip(ids, struct.unpack_from(f">{n}Q", out, start + 8 * n), strict=True))
    assert values == {DEMUX: 5, SYS_A: 20, PSCI: 0x10001, STD: 0, BMAP2: 3}
    assert list(ids) == sorted(ids)


def test_variants_only_where_they_differ() -> None:
    m = load()
    assert m.variants({PSCI: 0x10001, STD: 1}) == {}
    assert m.variants({PSCI: 0x10003, BMAP2: 0}) == {
        "psci-1.1": {PSCI: 0x10001},
        "psci-1.1-bmap2-3": {PSCI: 0x10001, BMAP2: 3},
    }
