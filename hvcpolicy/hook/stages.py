"""The stages (SPEC.md section 7), each a short call into the core.

``prepare`` refuses a policy this host's snapshot cannot satisfy; ``started`` runs the one
apply/verify flow (:func:`hvcpolicy.enforce.enforce`: prelaunch and inmigrate write and read back
every vCPU; paused, running and the rest are held to ``<hvc:applied>`` or the plan, then
``enforcement.already-running``), and after a prelaunch apply a detached child records
``<hvc:applied>`` and, with ``<hvc:resume after="apply"/>``, resumes; ``migrate``/``restore``
refuse a host that cannot take the guest, printing nothing on stdout; ``reconnect`` holds the
guest to the one compliance rule (:func:`hvcpolicy.enforce.inspect`), logs, and never fails.
Everything else exits 0 at once.
"""

from __future__ import annotations

from hvcpolicy.errors import HvcError, Refused, Unavailable
from hvcpolicy.hook.context import regs

TYPE_CHECKING = False  # typing costs more than the interpreter's start-up: checker-only names
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from hvcpolicy.enforce import ApplyResult
    from hvcpolicy.hook.context import Hook
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
    """Enforce through the one flow (hvcpolicy.enforce) over the one QMP client: prelaunch and
    inmigrate write and read back every vCPU; any other runstate is held to ``<hvc:applied>``
    or the plan. Then, for prelaunch, a detached recorder records (and resumes). A stock QEMU
    (no property) goes to :mod:`hvcpolicy.hook.stock`."""
    policy = hook.policy()
    if policy is None:
        return 0
    from hvcpolicy.enforce import UNSUPPORTED_WARNED, enforce
    from hvcpolicy.qmp import QMP

    with QMP(_qmp_socket(hook), hook.conf.qmp_timeout) as qmp:
        state = qmp.runstate()
        hook.audit["stage"] = f"started/{state}"
        stock = not qmp.has_interface()  # a stock QEMU: its QMP still tells the runstate
        if not stock:
            result = enforce(
                qmp,
                policy,
                runstate=state,
                applied=_applied(hook),
                host=_host_registers(hook),
                domain=hook.domain.name,
            )
    # the connection is closed here, before any fork: QEMU serves one QMP client at a time
    if stock:
        from hvcpolicy.hook.stock import started_stock

        return started_stock(hook, policy, state)
    if result.outcome == UNSUPPORTED_WARNED:
        hook.log(result.outcome, warning=True, reason=result.warnings[0])
        return 0
    _log_result(hook, result)
    if state == "prelaunch":
        return _apply_prelaunch(hook, result.before, result.applied_registers())
    return 0


def stage_reconnect(hook: Hook) -> int:
    """libvirtd restarted: hold the guest to the one compliance rule and log; never fail
    (failing here would kill a running guest), never write."""
    try:
        policy = hook.policy()
        if policy is None:
            return 0
        from hvcpolicy.enforce import inspect
        from hvcpolicy.qmp import QMP

        with QMP(_qmp_socket(hook), hook.conf.qmp_timeout) as qmp:
            result = inspect(
                qmp,
                policy,
                applied=_applied(hook),
                host=_host_registers(hook),
                domain=hook.domain.name,
            )
        _log_result(hook, result)
    except Exception as err:  # never fail: log it
        hook.log("error", warning=True, reason=f"{type(err).__name__}: {err}")
    return 0


def _log_result(hook: Hook, result: ApplyResult) -> None:
    """One audit line: the flow's outcome, the registers before and as left, what differs."""
    fields = {"before": regs(result.before), "after": regs(result.applied_registers())}
    if result.mismatches:
        fields["reason"] = "; ".join(result.mismatches)
    hook.log(result.outcome, warning=bool(result.warnings or result.mismatches), **fields)


def _qmp_socket(hook: Hook) -> str:
    sock = hook.domain.qmp_socket
    if not sock:
        raise Unavailable(
            f"domain {hook.domain.name!r} has no QMP socket for hvcpolicy: add "
            "<hvc:qmp socket=...> or run `hvcpolicy attach`"
        )
    return sock


def _applied(hook: Hook) -> dict[int, int] | None:
    """The domain's ``<hvc:applied>`` registers, if it carries a record."""
    meta = hook.domain.meta
    return meta.applied.registers if meta is not None and meta.applied is not None else None


def _host_registers(hook: Hook) -> Mapping[int, int] | None:
    """This host's fresh values (the kernel's PSCI limit), else None (the guest's own)."""
    try:
        return hook.snapshot().registers
    except HvcError:
        return None


def _apply_prelaunch(hook: Hook, before: Mapping[int, int], after: Mapping[int, int]) -> int:
    """Applied and read back on every vCPU: a detached recorder records ``<hvc:applied>`` and,
    when asked, resumes (``hvcpolicy start`` does both itself: this stage steps aside then)."""
    meta = hook.domain.meta
    if meta is not None:
        from hvcpolicy.hook.recorder import hook_element, spawn_recorder

        spawn_recorder(hook, hook_element(hook, after), meta.resume_after_apply)
    return 0


STAGES: dict[str, Callable[[Hook], int]] = {
    "prepare": stage_prepare,
    "started": stage_started,
    "migrate": stage_move,
    "restore": stage_move,
    "reconnect": stage_reconnect,
}
