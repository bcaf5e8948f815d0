"""Enforce a policy on one QEMU over QMP (``hvcpolicy apply``; usable by the hook and ``start``).

The decisions are the planner's; this module only sequences the I/O (SPEC.md sections 7, 8):

- ``prelaunch``: plan from the guest's live registers (``plan_start``), write the differences
  through the first vCPU, read back through every vCPU, verify, and optionally resume.
- ``inmigrate``: write what ``plan_inmigrate`` says (clear what the guest never carried, or AND
  the live bitmaps with the policy), read back through every vCPU, optionally resume.
- any other runstate (running, paused, ...): never write. Read every vCPU, compare with
  ``<hvc:applied>`` (when given) or the plan, and follow ``enforcement.already-running``.
- a QEMU without the interface: ``enforcement.unsupported-qemu`` (refuse: InterfaceMissing,
  exit 5; warn: a result with outcome ``unsupported-qemu-warned`` and a warning).

A failed or partial write, or a read-back that differs, fails the operation (QMPError, exit 5)
and the guest is not resumed. A plan the policy refuses raises Refused (exit 3) before any write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from hvcpolicy import catalogue as cat
from hvcpolicy.errors import InterfaceMissing, QMPError, Refused, bounded
from hvcpolicy.planner import FeatureView, Plan, plan_inmigrate, plan_start, verify
from hvcpolicy.policy import Policy
from hvcpolicy.qmp import DEFAULT_TIMEOUT, PROPERTY, QMP, VCPU, WRITABLE_RUNSTATES, Registers
from hvcpolicy.record import Record

# ``cont`` from these only (from inmigrate QEMU sets autostart: the guest runs once loaded).
RESUMABLE_RUNSTATES = frozenset({"prelaunch", "inmigrate", "paused"})

# Outcomes, as the audit log and --format json name them.
APPLIED = "applied"  # wrote, and every vCPU reads the target
UNCHANGED = "unchanged"  # writable runstate, nothing differed, every vCPU reads the target
VERIFIED = "verified"  # not writable: every vCPU already reads the target
DIFFERS_WARNED = "differs-warned"  # not writable, values differ, already-running: warn
UNSUPPORTED_WARNED = "unsupported-qemu-warned"  # no interface, unsupported-qemu: warn
DRY_RUN = "dry-run"  # planned only


class ApplyResult(Record):
    """What one enforcement saw and did. Registers are {id: value}; ``after`` per vCPU."""

    __slots__ = (
        "address",
        "after",
        "before",
        "features",
        "mismatches",
        "notes",
        "outcome",
        "policy",
        "refusals",
        "resumed",
        "runstate",
        "target",
        "vcpus",
        "warnings",
        "writes",
        "written",
    )

    def __init__(self, address: str, policy: str) -> None:
        self.address = address
        self.policy = policy
        self.runstate = ""
        self.vcpus: list[VCPU] = []
        self.before: Registers = {}  # read through the first vCPU, before anything
        self.target: Registers = {}  # every register as it should be left
        self.writes: Registers = {}  # what the plan writes (ordered)
        self.written: Registers = {}  # what was written (empty: dry run, verify-only)
        self.after: list[Registers] = []  # read back through every vCPU, in vCPU order
        self.features: list[FeatureView] = []
        self.refusals: list[str] = []
        self.mismatches: list[str] = []
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.outcome = ""
        self.resumed = False

    @property
    def writable(self) -> bool:
        return self.runstate in WRITABLE_RUNSTATES

    def applied_registers(self) -> Registers:
        """Every firmware register as hvcpolicy left it (for ``<hvc:applied>``): the first
        vCPU's read-back, or what was read before when nothing was read back."""
        return dict(self.after[0]) if self.after else dict(self.before)

    def to_json(self) -> dict[str, Any]:
        def regs(values: Mapping[int, int]) -> dict[str, str]:
            return {cat.fmt_id(r): cat.fmt_value(v) for r, v in values.items()}

        return {
            "qmp": self.address,
            "policy": self.policy,
            "runstate": self.runstate,
            "outcome": self.outcome,
            "vcpus": len(self.vcpus),
            "before": regs(dict(sorted(self.before.items()))),
            "target": regs(dict(sorted(self.target.items()))),
            "writes": regs(self.writes),
            "written": regs(self.written),
            "after": [regs(dict(sorted(a.items()))) for a in self.after],
            "features": [f.to_json() for f in self.features],
            "refusals": self.refusals,
            "mismatches": self.mismatches,
            "notes": self.notes,
            "warnings": self.warnings,
            "resumed": self.resumed,
        }


def _where(qmp: QMP) -> str:
    return f"QMP socket {qmp.address}"


async def _start(qmp: QMP) -> tuple[str, list[VCPU]]:
    """The runstate and the vCPUs, both requests in flight at once."""
    results = await asyncio.gather(qmp.runstate(), qmp.vcpus(), return_exceptions=True)
    for res in results:
        if isinstance(res, BaseException):
            raise res
    state, vcpus = results
    assert isinstance(state, str) and isinstance(vcpus, list)
    return state, vcpus


async def _interface_and_registers(qmp: QMP, first: VCPU) -> tuple[bool, Registers | None]:
    """``qom-list`` and ``qom-get`` on the first vCPU together; registers None when missing."""
    has, regs = await asyncio.gather(
        qmp.has_interface(first), qmp.read_registers(first), return_exceptions=True
    )
    if isinstance(has, BaseException):
        raise has
    assert isinstance(has, bool)
    if not has:
        return False, None
    if isinstance(regs, BaseException):
        raise regs
    assert isinstance(regs, dict)
    return True, regs


def _readback(qmp: QMP, vcpus: list[VCPU], after: list[Registers], expected: Registers) -> None:
    """Every vCPU must read ``expected`` (mitigation registers excepted: reads are the host's)."""
    for vcpu, live in zip(vcpus, after, strict=True):
        diffs = verify(expected, live)
        if diffs:
            raise QMPError(
                f"{_where(qmp)}: after the write, vCPU {vcpu.index} ({vcpu.qom_path}) reads "
                f"other values than written: {'; '.join(diffs)}",
                sent={
                    "execute": "qom-get",
                    "arguments": {"path": vcpu.qom_path, "property": PROPERTY},
                },
                received={cat.fmt_id(r): v for r, v in live.items()},
            )


async def enforce_async(
    qmp: QMP,
    policy: Policy,
    *,
    applied: Mapping[int, int] | None = None,
    host: Mapping[int, int] | None = None,
    dry_run: bool = False,
    resume: bool = False,
) -> ApplyResult:
    """Enforce ``policy`` on the connected QEMU ``qmp`` (see the module docstring).

    ``applied``: the domain's ``<hvc:applied>`` registers (inmigrate clears what it lacks;
    paused/running verify against it). ``host``: this host's fresh registers, when known (the
    kernel's PSCI limit); else the guest's own. ``resume``: ``cont`` once the guest complies, or
    the policy says warn (never when running already, never after a failure, never dry).
    """
    result = ApplyResult(qmp.address, policy.name)
    result.runstate, result.vcpus = await _start(qmp)
    first = result.vcpus[0]
    has, before = await _interface_and_registers(qmp, first)
    if not has or before is None:
        message = (
            f"{_where(qmp)}: this QEMU lacks the firmware-register interface (vCPU "
            f"{first.qom_path} has no {PROPERTY!r} property); policy {policy.name!r} "
            "cannot be enforced"
        )
        if policy.unsupported_qemu != "warn":
            raise InterfaceMissing(f"{message} (enforcement.unsupported-qemu: refuse)")
        result.outcome = UNSUPPORTED_WARNED
        result.warnings.append(f"{message} (enforcement.unsupported-qemu: warn)")
    else:
        result.before = before
        if result.writable:
            await _write_path(qmp, policy, result, applied, host, dry_run)
        else:
            await _verify_path(qmp, policy, result, applied, host)  # writes nothing: dry or not
    if resume and not dry_run:
        if result.runstate in RESUMABLE_RUNSTATES:
            await qmp.resume()
            result.resumed = True
        elif result.runstate != "running":
            result.notes.append(f"not resumed: QEMU's runstate is {result.runstate}")
    return result


def _plan_for(
    policy: Policy,
    result: ApplyResult,
    applied: Mapping[int, int] | None,
    host: Mapping[int, int] | None,
) -> Plan:
    if result.runstate == "inmigrate":
        return plan_inmigrate(policy, result.before, applied)
    return plan_start(policy, result.before, host)


async def _write_path(
    qmp: QMP,
    policy: Policy,
    result: ApplyResult,
    applied: Mapping[int, int] | None,
    host: Mapping[int, int] | None,
    dry_run: bool,
) -> None:
    plan = _plan_for(policy, result, applied, host)
    result.target, result.writes = dict(plan.target), dict(plan.writes)
    result.features, result.notes, result.refusals = plan.features, plan.notes, plan.refusals
    if plan.refusals:
        raise Refused(
            f"policy {policy.name!r} refuses this guest ({result.runstate}) on "
            f"{_where(qmp)}: {'; '.join(plan.refusals)}; nothing was written",
            list(plan.refusals),
        )
    if dry_run:
        result.outcome = DRY_RUN
        return
    if plan.writes:
        # The runstate again, right before the write: another monitor may have run the guest
        # since it was first read (docs/SECURITY.md T3); a guest that ran is never written.
        now = await qmp.runstate()
        if now != result.runstate:
            raise QMPError(
                f"{_where(qmp)}: the guest went from {result.runstate} to {bounded(now)} "
                "before the write (another monitor?); nothing was written"
            )
    # Registers are per VM: write through the first vCPU, read back through every vCPU.
    await qmp.write_registers(result.vcpus[0], plan.writes)
    result.written = dict(plan.writes)
    result.after = await qmp.read_registers_all(result.vcpus)
    # What every vCPU must now read: the live values with the writes applied. (On inmigrate the
    # carried registers are the migration stream's, so the full target is not expected yet.)
    expected = dict(result.before)
    expected.update(plan.writes)
    _readback(qmp, result.vcpus, result.after, expected)
    result.outcome = APPLIED if plan.writes else UNCHANGED


async def _verify_path(
    qmp: QMP,
    policy: Policy,
    result: ApplyResult,
    applied: Mapping[int, int] | None,
    host: Mapping[int, int] | None,
) -> None:
    """Not writable: compare every vCPU with ``<hvc:applied>`` or the plan; never write."""
    if len(result.vcpus) > 1:
        result.after = [result.before, *await qmp.read_registers_all(result.vcpus[1:])]
    else:
        result.after = [result.before]
    plan = plan_start(policy, result.before, host)
    result.features, result.notes = plan.features, plan.notes
    if applied is not None:
        result.target = {rid: v for rid, v in applied.items() if rid in result.before}
        basis = "its <hvc:applied> record"
    else:
        result.target = dict(plan.target)
        result.refusals = list(plan.refusals)
        basis = f"policy {policy.name!r}"
    mismatches = list(result.refusals)
    for vcpu, live in zip(result.vcpus, result.after, strict=True):
        prefix = f"vCPU {vcpu.index}: " if len(result.vcpus) > 1 else ""
        mismatches.extend(prefix + d for d in verify(result.target, live))
    result.mismatches = mismatches
    if not mismatches:
        result.outcome = VERIFIED
        return
    text = (
        f"the guest is {result.runstate} (its vCPUs may have run), so hvcpolicy does not write; "
        f"its firmware registers differ from {basis}: {'; '.join(mismatches)}"
    )
    if policy.already_running == "warn":
        result.outcome = DIFFERS_WARNED
        result.warnings.append(f"{_where(qmp)}: {text} (enforcement.already-running: warn)")
        return
    raise Refused(
        f"{_where(qmp)}: {text} (enforcement.already-running: refuse); start the guest paused "
        "(`hvcpolicy start DOMAIN` or `virsh start --paused`) so the policy is written before "
        "any vCPU runs",
        mismatches,
    )


def _quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's exception handler: stray background-task failures are logged at debug
    level (visible with -v logging), never printed as tracebacks."""
    import logging

    logging.getLogger("hvcpolicy.qmp").debug("background: %s", context.get("message"))


async def _enforce_at(
    address: str,
    policy: Policy,
    timeout: float,
    applied: Mapping[int, int] | None,
    host: Mapping[int, int] | None,
    dry_run: bool,
    resume: bool,
) -> ApplyResult:
    # qemu.qmp's background tasks may end with an exception nobody awaits (a server that
    # garbles or hangs up): the failure is already reported as one line, never as a traceback.
    asyncio.get_running_loop().set_exception_handler(_quiet)
    async with QMP(address, timeout) as qmp:
        return await enforce_async(
            qmp, policy, applied=applied, host=host, dry_run=dry_run, resume=resume
        )


def enforce(
    address: str,
    policy: Policy,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    applied: Mapping[int, int] | None = None,
    host: Mapping[int, int] | None = None,
    dry_run: bool = False,
    resume: bool = False,
) -> ApplyResult:
    """Connect to the QMP socket ``address``, enforce, disconnect (blocking wrapper of
    :func:`enforce_async`; every QMP wait bounded by ``timeout`` seconds)."""
    return asyncio.run(_enforce_at(address, policy, timeout, applied, host, dry_run, resume))
