"""Migration and restore onto a stock QEMU (SPEC §7): nothing can be written on arrival, so a
register only the destination has keeps its kernel's reset value, and a bitmap that would so
expose a service the guest never had makes the ``migrate``/``restore`` stage refuse (pure:
``planner.check_migration(..., writable_on_arrival=False)``)."""

from __future__ import annotations

from hvcpolicy import catalogue as cat
from hvcpolicy.planner import check_migration
from hvcpolicy.snapshot import Snapshot
from tests.core.test_planner import applied, host


def _with(dest: Snapshot, **regs: int) -> Snapshot:
    registers = dict(dest.registers)
    for name, value in regs.items():
        registers[getattr(cat, name)] = value
    return Snapshot(dest.host, dest.kernel, "kvm", registers, qemu=dest.qemu)


def test_a_new_bitmap_that_resets_to_0_exposes_nothing() -> None:
    dest = host("neoverse-n1_linux-6.18")
    assert dest.registers[cat.VENDOR_HYP_BMAP_2] == 0
    carried = applied("web1-applied-6.1.xml")  # a 6.1 guest: no VENDOR_HYP_BMAP_2
    qmp = check_migration(None, dest, carried)
    stock = check_migration(None, dest, carried, writable_on_arrival=False)
    assert qmp.ok and stock.ok
    assert qmp.clears == [cat.VENDOR_HYP_BMAP_2] and stock.clears == []
    assert any("hvcpolicy clears it" in n for n in qmp.notes)
    assert not any("hvcpolicy clears it" in n for n in stock.notes)  # no promise it cannot keep
    assert any("resets to 0" in n for n in stock.notes)


def test_a_new_bitmap_with_a_nonzero_reset_value_refuses_only_a_stock_arrival() -> None:
    dest = _with(host("neoverse-n1_linux-6.18"), VENDOR_HYP_BMAP_2=0x1)
    carried = applied("web1-applied-6.1.xml")
    assert check_migration(None, dest, carried).ok  # the QMP interface clears it on arrival
    stock = check_migration(None, dest, carried, writable_on_arrival=False)
    assert not stock.ok
    (reason,) = stock.reasons
    assert "VENDOR_HYP_BMAP_2" in reason and "0x1" in reason
    assert "(discover-impl-ver)" in reason  # names the service (bit 0)
    assert "cannot clear it on arrival" in reason


def test_registers_the_guest_carries_are_the_streams_either_way() -> None:
    dest = host("neoverse-n1_linux-6.18")
    carried = dict(dest.registers)  # a guest that has every register the destination has
    stock = check_migration(None, dest, carried, writable_on_arrival=False)
    assert stock.ok and stock.clears == []
