"""``hvcpolicy simulate``: a QMP server around a simulated arm64 KVM VM (SPEC.md section 8).

- :mod:`.profiles` -- :func:`profile_for` a kernel release: registers, newest PSCI, mitigation
  levels.
- :mod:`.vm` -- :class:`SimVM`, the kernel's rules for the firmware pseudo-registers.
- :mod:`.firmware` -- the ``kvm-firmware-registers`` vCPU property over a SimVM.
- :mod:`.server` -- the QMP protocol, a simulated QEMU (:class:`SimBackend`) and the layer over a
  real QEMU (:class:`UpstreamBackend`).
- :mod:`.faults` -- ``--fault`` modes.

The simulator never imports the planner, policy or kernel model: its rules come from the
reference, so that it is an independent check of them.
"""

from hvcpolicy.simulator.profiles import PROFILE_NAMES, KernelProfile, profile_for
from hvcpolicy.simulator.vm import KernelError, SimVM

__all__ = ["PROFILE_NAMES", "KernelError", "KernelProfile", "SimVM", "profile_for"]
