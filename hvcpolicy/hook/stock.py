"""The hook's ``started`` stage on a stock QEMU: its vCPUs lack the ``kvm-firmware-registers``
property, so the hook can neither read nor write the registers (SPEC §7, §8). What it knows is
the runstate (QEMU's own QMP) and what a fresh guest holds on this host (the host snapshot).

- a guest that cannot be saved (VFIO, virtiofs, vhost-user, MTE): ``enforcement.unsupported-qemu``.
- ``prelaunch`` with ``<hvc:resume after="apply"/>``: a detached child runs the stream backend's
  cycle (save, patch every vCPU, paused restore, read-back, resume) once libvirt's start job has
  ended, under the domain's start lock, exactly as ``hvcpolicy start`` does after its paused
  start (:func:`hvcpolicy.start.enforce_paused`); the restore's own hook calls step aside.
- ``prelaunch`` without it: the guest stays paused; when this host's defaults differ from the
  plan, the audit line (a warning) says how to enforce.
- ``running`` (a plain start: too late for any write): when this host's defaults differ from the
  plan, ``enforcement.already-running``.
- ``inmigrate`` and anything else: nothing can be written on arrival (the ``migrate`` stage has
  refused what the destination would expose); logged.
"""

from __future__ import annotations

from hvcpolicy.enforce import PREDICTED
from hvcpolicy.errors import HvcError, Refused
from hvcpolicy.hook.context import regs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from hvcpolicy.hook.context import Hook
    from hvcpolicy.policy import Policy

# audit outcomes of this stage (beside the flow's)
DEFERRED = "stream-deferred"  # the detached child enforces through the stream backend
PAUSED_UNENFORCED = "paused-unenforced"  # stays paused: nothing enforced it yet


def started_stock(hook: Hook, policy: Policy, state: str) -> int:
    from hvcpolicy.domainxml import unsaveable
    from hvcpolicy.planner import plan_start

    why = unsaveable(hook.xml.decode("utf-8", "replace"))
    if why is not None:  # the stream backend cannot reach it either
        from hvcpolicy.errors import InterfaceMissing

        message = (
            f"hvcpolicy: domain {hook.domain.name!r}: its QEMU has no firmware-register "
            f"interface and the guest cannot be saved for the stream backend: {why}; policy "
            f"{policy.name!r} cannot be enforced"
        )
        if policy.unsupported_qemu != "warn":
            raise InterfaceMissing(f"{message} (enforcement.unsupported-qemu: refuse)")
        hook.log("unsupported-qemu-warned", warning=True, reason=message)
        return 0

    snap = hook.snapshot()
    plan = plan_start(policy, snap.registers)
    name = hook.domain.name
    differ = "; ".join(
        f"0x{rid:016x} 0x{snap.registers.get(rid, 0):x} -> 0x{value:x}"
        for rid, value in plan.writes.items()
    )
    meta = hook.domain.meta
    if state == "prelaunch":
        if meta is not None and meta.resume_after_apply:
            from hvcpolicy.hook.recorder import detached

            detached(lambda: _enforce_in_child(hook, policy))
            hook.log(DEFERRED, reason="stock QEMU: a detached child enforces through the stream")
            return 0
        if plan.writes:
            hook.log(
                PAUSED_UNENFORCED,
                warning=True,
                reason=f"domain {name!r} stays paused: its QEMU has no firmware-register "
                f"interface and this host's defaults differ from policy {policy.name!r} ({differ})"
                f"; to enforce: `virsh destroy {name}` then `hvcpolicy start {name}`, or add "
                '<hvc:resume after="apply"/> (`hvcpolicy attach --resume-after-apply`)',
            )
            return 0
        hook.log(PREDICTED, after=regs(plan.target), reason="stock QEMU, paused: defaults comply")
        return 0
    if state == "running" and plan.writes:
        text = (
            f"domain {name!r} is already running on a QEMU without a firmware-register interface"
            f", and this host's defaults differ from policy {policy.name!r} ({differ}): it is "
            f"too late to write them; start it with `hvcpolicy start {name}` or `virsh start "
            f'--paused {name}` (with <hvc:resume after="apply"/>)'
        )
        if policy.already_running == "warn":
            hook.log("differs-warned", warning=True, reason=text)
            return 0
        raise Refused(f"hvcpolicy: {text}", [text])
    hook.log(PREDICTED, after=regs(plan.target), reason=f"stock QEMU, {state}: nothing to write")
    return 0


def _enforce_in_child(hook: Hook, policy: Policy) -> int:
    """The detached child: the stream cycle on the guest libvirt started paused."""
    from hvcpolicy.policystore import enable_site

    enable_site()  # libvirt-python is a site package; the hook runs under -S
    from hvcpolicy import libvirt
    from hvcpolicy.hook.recorder import libvirt_uri
    from hvcpolicy.savecycle import default_dir, image_dir
    from hvcpolicy.start import enforce_paused
    from hvcpolicy.startlock import StartLock

    hook.audit["stage"] = "started/stream"
    conf = hook.conf
    try:
        lock = StartLock.acquire(conf.run_dir, hook.argv[0])
        try:
            conn = libvirt.connect(libvirt_uri())
            try:
                uuid = hook.domain.uuid
                dom = (
                    libvirt.lookup_uuid(conn, uuid) if uuid else libvirt.lookup(conn, hook.argv[0])
                )
                done = enforce_paused(
                    conn,
                    dom,
                    policy,
                    hook.snapshot(),
                    timeout=conf.qmp_timeout,
                    save_dir=image_dir(conf.save_dir or default_dir()),
                    lock=lock,
                )
            finally:
                conn.close()
        finally:
            if lock is not None:
                lock.release()
    except HvcError as err:
        hook.log(
            "refused" if isinstance(err, Refused) else "error", warning=True, reason=err.message
        )
        return 1
    result = done.result
    hook.log(
        done.outcome,
        before=regs(result.before),
        after=regs(result.applied_registers()),
        backend=done.backend,
    )
    return 0
