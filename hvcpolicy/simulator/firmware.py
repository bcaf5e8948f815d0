"""The ``kvm-firmware-registers`` vCPU property (SPEC.md section 8) over a :class:`SimVM`."""

from __future__ import annotations

import re

from hvcpolicy.catalogue import is_firmware_reg
from hvcpolicy.firmware import QMP_PROPERTY as PROPERTY
from hvcpolicy.simulator.faults import Faults
from hvcpolicy.simulator.vm import U64_MAX, KernelError, SimVM

__all__ = ["PROPERTY", "CommandError", "FirmwareRegisters"]

PROPERTY_TYPE = "any"

_ID = re.compile(r"^0x[0-9a-f]{16}$")


class CommandError(Exception):
    """A QMP error reply: ``{"error": {"class": klass, "desc": desc}}``."""

    def __init__(self, klass: str, desc: str) -> None:
        super().__init__(desc)
        self.klass = klass
        self.desc = desc


def _generic(desc: str) -> CommandError:
    return CommandError("GenericError", f"{PROPERTY}: {desc}")


class FirmwareRegisters:
    """qom-get / qom-set of the property, per vCPU, with the register-level faults applied."""

    def __init__(self, vm: SimVM, faults: Faults | None = None) -> None:
        self.vm = vm
        self.faults = faults or Faults()
        # vcpu-disagree: what one vCPU still reads after writes (register -> stale value).
        self._stale: dict[int, int] = {}
        value = self.faults.value("vcpu-disagree")
        self._stale_vcpu: int | None = None
        if self.faults.has("vcpu-disagree"):
            index = value if isinstance(value, int) else vm.vcpus - 1
            self._stale_vcpu = min(index, vm.vcpus - 1)

    def get(self, vcpu: int) -> dict[str, int]:
        values = self.vm.get_all(vcpu)
        if vcpu == self._stale_vcpu:
            values.update((rid, v) for rid, v in self._stale.items() if rid in values)
        return {f"0x{rid:016x}": v for rid, v in values.items()}

    @staticmethod
    def parse(value: object) -> list[tuple[int, int]]:
        """Check a whole qom-set value before anything is written (QEMU's input visitor)."""
        if not isinstance(value, dict):
            raise _generic("expected an object mapping register ids to integer values")
        items: list[tuple[int, int]] = []
        for key, v in value.items():
            if not _ID.match(key):
                raise _generic(f"{key[:40]!r} is not a register id (0x + 16 lowercase hex digits)")
            rid = int(key, 16)
            if not is_firmware_reg(rid):
                raise _generic(f"{key} is not a firmware register (coproc 0x14 or 0x16)")
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= U64_MAX:
                raise _generic(f"value of {key} must be an integer in 0..2^64-1")
            items.append((rid, v))
        return items

    def set(self, vcpu: int, value: object) -> None:
        """Write in the given order; stop at the first register the kernel refuses."""
        items = self.parse(value)
        limit: int | None = None
        if self.faults.has("partial-write"):
            n = self.faults.value("partial-write")
            limit = n if isinstance(n, int) else len(items) // 2
        for i, (rid, v) in enumerate(items):
            if limit is not None and i == limit:
                raise _generic(f"KVM_SET_ONE_REG 0x{rid:016x}=0x{v:x} failed: EIO")
            try:
                before = self.vm.get(rid, vcpu)
            except KernelError:
                before = None
            try:
                self.vm.set(rid, v, vcpu)
            except KernelError as err:
                raise _generic(str(err)) from None
            stale = self._stale_vcpu is not None and before is not None
            if stale and rid not in self._stale and self.vm.get(rid, vcpu) != before:
                assert before is not None
                self._stale[rid] = before
