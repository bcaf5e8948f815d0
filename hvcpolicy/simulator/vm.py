"""A simulated arm64 KVM VM: the firmware pseudo-registers and the kernel's rules for them.

Independent of :mod:`hvcpolicy.kernel` (see :mod:`hvcpolicy.simulator.profiles`). The rules, from
``reference/kvm-arm64-firmware-registers.md``:

- An id the kernel does not list: ENOENT (GET and SET).
- Bitmaps (coproc 0x16), in order: a bit outside the supported mask is EINVAL (even after the VM
  ran); after the VM ran, a value that differs from the current one is EBUSY (the same value is
  fine); otherwise stored. Any subset of the mask is accepted.
- PSCI_VERSION: a vCPU with the PSCI 0.2 feature accepts 0.2 .. the newest version the kernel
  implements; one without accepts only 0.1 (and reads 0.1). No "already ran" check. A protected
  (pKVM) VM refuses versions below 1.1 ("newest kernels" in the reference: ``protected=True``).
- SMCCC_ARCH_WORKAROUND_1/3: accepted iff no bit outside 0xf and value <= the host's level.
- SMCCC_ARCH_WORKAROUND_2: bits outside 0x1f EINVAL; the ENABLED bit (0x10) only with level 2;
  levels 0/1 are class NOT_AVAIL (0), 2/3 class NOT_REQUIRED (3); accepted iff host level >= class;
  levels 4..15 EINVAL.
- Workaround writes only check compatibility: the value read back is always the host's level.
- Bitmaps and the PSCI version are per VM.
"""

from __future__ import annotations

from hvcpolicy.catalogue import (
    PSCI_VERSION,
    SMCCC_ARCH_WORKAROUND_1,
    SMCCC_ARCH_WORKAROUND_2,
    SMCCC_ARCH_WORKAROUND_3,
)
from hvcpolicy.simulator.profiles import BITMAPS, PSCI_0_1, PSCI_1_1, KernelProfile

U64_MAX = (1 << 64) - 1

_LEVEL_MASK = 0xF
_WA2_ENABLED = 0x10
_WA2_AVAIL = 2
_WA2_NOT_REQUIRED = 3
_WA2_NOT_AVAIL = 0


class KernelError(Exception):
    """A KVM_GET/SET_ONE_REG the kernel refuses. ``errno`` is the name, e.g. ``"EINVAL"``."""

    def __init__(self, errno: str, rid: int, value: int | None = None) -> None:
        op = "KVM_GET_ONE_REG" if value is None else "KVM_SET_ONE_REG"
        what = f"0x{rid:016x}" if value is None else f"0x{rid:016x}=0x{value:x}"
        super().__init__(f"{op} {what} failed: {errno}")
        self.errno = errno
        self.rid = rid
        self.value = value


class SimVM:
    """One VM on a simulated kernel.

    ``vcpus`` vCPUs, all initialised with (``psci_0_2=True``) or without the PSCI 0.2 feature.
    Registers are per VM, so :meth:`get` and :meth:`set` take the vCPU only to check it exists.
    """

    def __init__(
        self,
        profile: KernelProfile,
        vcpus: int = 1,
        psci_0_2: bool = True,
        protected: bool = False,
    ) -> None:
        if vcpus < 1:
            raise ValueError("a VM needs at least one vCPU")
        self.profile = profile
        self.vcpus = vcpus
        self.psci_0_2 = psci_0_2
        self.protected = protected
        self._values = profile.fresh_values(psci_0_2)
        self._has_run = False

    @property
    def has_run(self) -> bool:
        """True after the first KVM_RUN of any vCPU."""
        return self._has_run

    def run(self) -> None:
        """A vCPU entered the guest (KVM_RUN): from now on bitmaps are frozen."""
        self._has_run = True

    def reg_list(self) -> list[int]:
        """KVM_GET_REG_LIST, firmware registers only."""
        return list(self.profile.registers)

    def _check_vcpu(self, vcpu: int) -> None:
        if not 0 <= vcpu < self.vcpus:
            raise ValueError(f"no vCPU {vcpu} (the VM has {self.vcpus})")

    def get(self, rid: int, vcpu: int = 0) -> int:
        self._check_vcpu(vcpu)
        if rid not in self._values:
            raise KernelError("ENOENT", rid)
        if rid in self.profile.wa_levels:
            return self.profile.wa_levels[rid]
        return self._values[rid]

    def get_all(self, vcpu: int = 0) -> dict[int, int]:
        return {rid: self.get(rid, vcpu) for rid in self.profile.registers}

    def set(self, rid: int, value: int, vcpu: int = 0) -> None:
        self._check_vcpu(vcpu)
        if not 0 <= value <= U64_MAX:
            raise ValueError(f"value {value} is not a u64")
        if rid not in self._values:
            raise KernelError("ENOENT", rid, value)
        if rid in BITMAPS:
            self._set_bitmap(rid, value)
        elif rid == PSCI_VERSION:
            self._set_psci(value)
        elif rid in (SMCCC_ARCH_WORKAROUND_1, SMCCC_ARCH_WORKAROUND_3):
            self._check_wa(rid, value)
        elif rid == SMCCC_ARCH_WORKAROUND_2:
            self._check_wa2(value)
        else:  # pragma: no cover - every listed register has a rule above
            raise KernelError("ENOENT", rid, value)

    def _set_bitmap(self, rid: int, value: int) -> None:
        mask = BITMAPS[rid][1]
        if value & ~mask:
            raise KernelError("EINVAL", rid, value)
        if self._has_run and value != self._values[rid]:
            raise KernelError("EBUSY", rid, value)
        self._values[rid] = value

    def _set_psci(self, value: int) -> None:
        accepted = self.profile.psci_accepted if self.psci_0_2 else (PSCI_0_1,)
        if value not in accepted or (self.protected and value < PSCI_1_1):
            raise KernelError("EINVAL", PSCI_VERSION, value)
        self._values[PSCI_VERSION] = value

    def _check_wa(self, rid: int, value: int) -> None:
        if value & ~_LEVEL_MASK or value > self.profile.wa_levels[rid]:
            raise KernelError("EINVAL", rid, value)

    def _check_wa2(self, value: int) -> None:
        rid = SMCCC_ARCH_WORKAROUND_2
        if value & ~(_LEVEL_MASK | _WA2_ENABLED):
            raise KernelError("EINVAL", rid, value)
        level = value & _LEVEL_MASK
        if value & _WA2_ENABLED and level != _WA2_AVAIL:
            raise KernelError("EINVAL", rid, value)
        if level in (0, 1):
            klass = _WA2_NOT_AVAIL
        elif level in (_WA2_AVAIL, _WA2_NOT_REQUIRED):
            klass = _WA2_NOT_REQUIRED
        else:
            raise KernelError("EINVAL", rid, value)
        if self.profile.wa_levels[rid] < klass:
            raise KernelError("EINVAL", rid, value)
