"""How hvcpolicy reaches one guest's firmware registers: one interface, two backends (SPEC §8).

- ``qmp``: the ``kvm-firmware-registers`` vCPU property of SPEC §8, over :mod:`hvcpolicy.qmp`
  (``hvcpolicy simulate``, and any QEMU that grows the property);
- ``stream``: QEMU's own migration stream, through a libvirt save of the never-run guest, an
  in-place patch of every vCPU's cpreg list (:mod:`hvcpolicy.stream`) and a paused restore
  (:mod:`hvcpolicy.savecycle`): a stock QEMU.

:mod:`hvcpolicy.enforce` runs the one apply/verify sequence over this interface; the planner
never knows which backend ran. Registers are per VM but read per vCPU: ``read`` returns every
vCPU's view, in vCPU order, so the flow can check that they agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

Registers = dict[int, int]

# Backend names, as audit lines, ``--format json`` and the metrics say which one enforced.
QMP_BACKEND = "qmp"
STREAM_BACKEND = "stream"

# The vCPU property of the QMP backend (SPEC §8): what hvcpolicy.qmp asks for and
# ``hvcpolicy simulate`` serves.
QMP_PROPERTY = "kvm-firmware-registers"

# Where a write is allowed: the guest's vCPUs have never run (SPEC §8).
WRITABLE_RUNSTATES = frozenset({"prelaunch", "inmigrate"})


class Firmware(Protocol):
    """One guest's firmware registers, reached one way. Every method raises an
    :class:`~hvcpolicy.errors.HvcError` subclass on failure (``Unavailable`` for I/O), never a
    foreign exception; every wait is bounded."""

    backend: str  # QMP_BACKEND or STREAM_BACKEND
    where: str  # names the guest in messages: "QMP socket /run/x.qmp", "domain web1"

    def runstate(self) -> str:
        """QEMU's runstate now (``prelaunch``, ``inmigrate``, ``paused``, ``running``, ...)."""
        ...

    def read(self) -> list[Registers]:
        """Every vCPU's firmware registers ({id: value}), in vCPU order; at least one."""
        ...

    def write(self, writes: Mapping[int, int]) -> None:
        """Write ``writes`` (in their order) so that every vCPU holds them; only in a writable
        runstate. A partial or refused write raises, and the guest is never resumed after it."""
        ...

    def resume(self) -> None:
        """Let the vCPUs run (QMP ``cont`` / libvirt resume)."""
        ...
