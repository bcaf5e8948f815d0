"""The stages (SPEC.md section 7), each a short call into the core.

``prepare`` refuses a policy this host's snapshot cannot satisfy; ``started`` acts on the
runstate (prelaunch: apply, then a detached child records ``<hvc:applied>`` and, with
``<hvc:resume after="apply"/>``, resumes; inmigrate: clear what the guest never carried; paused:
verify; running: verify, then ``enforcement.already-running``); ``migrate``/``restore`` refuse a
host that cannot take the guest, printing nothing on stdout; ``reconnect`` verifies and logs and
never fails. Everything else exits 0 at once.
"""

from __future__ import annotations

from hvcpolicy.errors import HvcError, InterfaceMissing, Refused, Unavailable, bounded
from hvcpolicy.hook.context import regs

TYPE_CHECKING = False  # typing costs more than the interpreter's start-up: checker-only names
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from hvcpolicy.hook.context import Hook
    from hvcpolicy.hook.hookqmp import HookQMP
    from hvcpolicy.policy import Policy
    from hvcpolicy.snapshot import Snapshot


def stage_prepare(hook: Hook) -> int:
    policy = hook.policy()
    if policy is None:
        return 0
    target = check_host(policy, hook.snapshot(), f"domain {hook.domain.name!r}")
    hook.log("allowed", after=regs(target))
    return 0


def check_host(policy: Policy, snap: Snapshot, who: str) -> dict[int, int]:
    """The prepare check, before QEMU exists: can this host run the policy? -> what a guest
    started here is left with. Shared by the hook's prepare stage and ``hvcpolicy start``."""
    from hvcpolicy.planner import plan_start

    plan = plan_start(policy, snap.registers)
    if not plan.ok:
        raise Refused(
            f"{who} cannot start on this host ({snap.host}, kernel {snap.kernel}) under policy "
            f"{policy.name!r}: " + "; ".join(plan.refusals),
            plan.refusals,
        )
    return plan.target


def stage_move(hook: Hook) -> int:
    """``migrate`` / ``restore``: would this host take the guest? Before QEMU exists."""
    policy = hook.policy()
    if policy is None:
        return 0
    from hvcpolicy.planner import check_migration

    snap = hook.snapshot()
    meta = hook.domain.meta
    applied = meta.applied.registers if meta is not None and meta.applied is not None else None
    # an explicit <hvc:qmp> names where the QMP interface is served (a QEMU that has it, or
    # hvcpolicy simulate): registers new here are cleared on arrival. Else a stock QEMU: they
    # keep this kernel's reset values, which must expose nothing new (SPEC section 7)
    writable = meta is not None and meta.qmp_socket is not None
    verdict = check_migration(policy, snap, applied=applied, writable_on_arrival=writable)
    what = "an incoming migration" if hook.stage == "migrate" else "a restore"
    if not verdict.ok:
        raise Refused(
            f"hvcpolicy: this host ({snap.host}, kernel {snap.kernel}) refuses {what} of domain "
            f"{hook.domain.name!r} under policy {policy.name!r}: " + "; ".join(verdict.reasons),
            verdict.reasons,
        )
    hook.log("allowed", before=regs(applied), reason=f"basis={verdict.basis}")
    return 0


def stage_started(hook: Hook) -> int:
    policy = hook.policy()
    if policy is None:
        return 0
    from hvcpolicy.hook.hookqmp import HookQMP

    try:
        qmp = HookQMP(_qmp_socket(hook), hook.conf.qmp_timeout)
    except Unavailable as err:
        return _unsupported(hook, policy, err)
    with qmp:
        try:
            qmp.vcpus()
        except InterfaceMissing:  # a stock QEMU: its QMP still tells the runstate
            state = qmp.runstate()
            hook.audit["stage"] = f"started/{state}"
            qmp.close()  # before any fork
            from hvcpolicy.hook.stock import started_stock

            return started_stock(hook, policy, state)
        except Unavailable as err:
            return _unsupported(hook, policy, err)
        state = qmp.runstate()
        hook.audit["stage"] = f"started/{state}"
        if state == "prelaunch":
            return _apply_prelaunch(hook, policy, qmp)
        if state == "inmigrate":
            return _apply_inmigrate(hook, policy, qmp)
        return _verify(hook, policy, qmp, state)


def stage_reconnect(hook: Hook) -> int:
    """libvirtd restarted: verify and log; failing here would kill a running guest."""
    try:
        policy = hook.policy()
        if policy is None:
            return 0
        from hvcpolicy.hook.hookqmp import HookQMP

        with HookQMP(_qmp_socket(hook), hook.conf.qmp_timeout) as qmp:
            live = qmp.read_all()
        target = _expected(hook, policy, live)
        from hvcpolicy.planner import verify

        diffs = verify(target, live)
        if diffs:
            hook.log("differs", warning=True, before=regs(live), reason="; ".join(diffs))
        else:
            hook.log("verified", after=regs(live))
    except Exception as err:  # never fail: log it
        hook.log("error", warning=True, reason=f"{type(err).__name__}: {err}")
    return 0


def _unsupported(hook: Hook, policy: Policy, err: Unavailable) -> int:
    from hvcpolicy.errors import InterfaceMissing

    if isinstance(err, InterfaceMissing) and policy.unsupported_qemu == "warn":
        hook.log("unsupported-qemu-warned", warning=True, reason=err.message)
        return 0
    raise err


def _qmp_socket(hook: Hook) -> str:
    sock = hook.domain.qmp_socket
    if not sock:
        raise Unavailable(
            f"domain {hook.domain.name!r} has no QMP socket for hvcpolicy: add "
            "<hvc:qmp socket=...> or run `hvcpolicy attach`"
        )
    return sock


def _expected(hook: Hook, policy: Policy, live: Mapping[int, int]) -> dict[int, int]:
    """What the guest's registers should read: ``<hvc:applied>`` when recorded, else the plan."""
    meta = hook.domain.meta
    if meta is not None and meta.applied is not None:
        return {rid: v for rid, v in meta.applied.registers.items() if rid in live}
    from hvcpolicy.planner import plan_start

    return plan_start(policy, live, _host_registers(hook, live)).target


def _host_registers(hook: Hook, live: Mapping[int, int] | None) -> Mapping[int, int] | None:
    """This host's fresh values (the kernel's PSCI limit), else what the guest reads."""
    try:
        return hook.snapshot().registers
    except HvcError:
        return live


def apply_prelaunch(
    policy: Policy, qmp: HookQMP, host: Mapping[int, int] | None, who: str
) -> tuple[dict[int, int], dict[int, int]]:
    """Plan, write through the first vCPU, read back every vCPU and verify; -> (before, after).
    Shared by the hook's prelaunch stage and ``hvcpolicy start``."""
    from hvcpolicy.planner import plan_start, verify

    before = qmp.read_all()
    plan = plan_start(policy, before, host if host is not None else before)
    if not plan.ok:
        raise Refused(
            f"hvcpolicy: {who} refused under policy {policy.name!r}: " + "; ".join(plan.refusals),
            plan.refusals,
        )
    if plan.writes:
        # Again right before the write: another monitor may have run the guest since, and KVM
        # would still take a PSCI_VERSION write then (it has no "already ran" check for it).
        state = qmp.runstate()
        if state != "prelaunch":
            raise Unavailable(
                f"hvcpolicy: {who}: the guest went from prelaunch to {bounded(state, 40)} before "
                "the write (another monitor?); nothing was written"
            )
        qmp.write(plan.writes)
    after = qmp.read_every_vcpu()
    diffs = verify(plan.target, after)
    if diffs:
        raise Refused(f"hvcpolicy: {who}: the write did not hold: {'; '.join(diffs)}", diffs)
    return before, after


def _apply_prelaunch(hook: Hook, policy: Policy, qmp: HookQMP) -> int:
    host = _host_registers(hook, None)
    before, after = apply_prelaunch(policy, qmp, host, f"domain {hook.domain.name!r}")
    hook.log("applied", before=regs(before), after=regs(after))
    meta = hook.domain.meta
    if meta is not None:
        qmp.close()  # before any fork: QEMU serves one QMP client at a time
        from hvcpolicy.hook.recorder import hook_element, spawn_recorder

        spawn_recorder(hook, hook_element(hook, after), meta.resume_after_apply)
    return 0


def _apply_inmigrate(hook: Hook, policy: Policy, qmp: HookQMP) -> int:
    from hvcpolicy.planner import plan_inmigrate

    meta = hook.domain.meta
    applied = meta.applied.registers if meta is not None and meta.applied is not None else None
    before = qmp.read_all()
    plan = plan_inmigrate(policy, before, applied)
    if not plan.ok:
        raise Refused(
            f"hvcpolicy: incoming domain {hook.domain.name!r}: " + "; ".join(plan.refusals),
            plan.refusals,
        )
    if plan.writes:
        qmp.write(plan.writes)
    hook.log(
        "cleared" if plan.writes else "nothing-to-clear",
        before=regs(before),
        after=regs(plan.writes),
    )
    return 0


def _verify(hook: Hook, policy: Policy, qmp: HookQMP, state: str) -> int:
    from hvcpolicy.planner import verify

    live = qmp.read_every_vcpu()
    target = _expected(hook, policy, live)
    diffs = verify(target, live)
    if not diffs:
        hook.log("verified", after=regs(live))
        return 0
    if state == "running" and policy.already_running == "warn":
        hook.log("differs-warned", warning=True, before=regs(live), reason="; ".join(diffs))
        return 0
    if state == "running":
        raise Refused(
            f"hvcpolicy: domain {hook.domain.name!r} is already running and its firmware registers "
            f"differ from policy {policy.name!r} ({'; '.join(diffs)}); it is too late to write "
            f"them: start it with `hvcpolicy start {hook.domain.name}` or "
            f'`virsh start --paused {hook.domain.name}` (with <hvc:resume after="apply"/>)',
            diffs,
        )
    raise Refused(
        f"hvcpolicy: domain {hook.domain.name!r} ({state}) does not match "
        + (
            "its <hvc:applied> record"
            if hook.domain.meta and hook.domain.meta.applied
            else f"policy {policy.name!r}"
        )
        + f": {'; '.join(diffs)}",
        diffs,
    )


STAGES: dict[str, Callable[[Hook], int]] = {
    "prepare": stage_prepare,
    "started": stage_started,
    "migrate": stage_move,
    "restore": stage_move,
    "reconnect": stage_reconnect,
}
