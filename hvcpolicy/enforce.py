"""Enforce a policy on one guest: the one apply/verify flow over the Firmware interface.

``apply``, ``start``, the hook's ``started`` and ``reconnect`` stages and its recorder all run
this sequence; the backend (QMP property or migration stream) only moves the bytes, and the
decisions are the planner's (SPEC.md sections 7, 8) and :mod:`hvcpolicy.compliance`'s:

- ``prelaunch`` / ``inmigrate`` (writable): read every vCPU (they must agree), plan
  (``plan_start`` / ``plan_inmigrate``), refuse (:class:`Refused`, exit 3) before any write, write
  (the runstate checked again right before), read back every vCPU and hold each to what was
  written (else exit 5, never resumed), then resume if asked.
- any other runstate (running, paused, ...): never write. Read every vCPU, hold them to
  ``<hvc:applied>`` (when given) or the plan, and follow ``enforcement.already-running``.
- no way to reach the registers (InterfaceMissing from ``read``): ``enforcement.unsupported-qemu``
  (refuse: InterfaceMissing, exit 5; warn: outcome ``unsupported-qemu-warned``).

The outcome names one vocabulary for audit lines, ``--format json`` and the metrics (the
constants below). :func:`inspect` is the read-only check (``reconnect``, ``status``), which never
refuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hvcpolicy import catalogue as cat
from hvcpolicy import compliance
from hvcpolicy.errors import InterfaceMissing, Refused, Unavailable, bounded
from hvcpolicy.firmware import WRITABLE_RUNSTATES, Firmware, Registers
from hvcpolicy.planner import FeatureView, Plan, plan_inmigrate, plan_start
from hvcpolicy.policy import Policy
from hvcpolicy.record import Record

# ``cont`` from these only (from inmigrate QEMU sets autostart: the guest runs once loaded).
RESUMABLE_RUNSTATES = frozenset({"prelaunch", "inmigrate", "paused"})

# Outcomes, as audit lines, --format json and the metrics name them.
APPLIED = "applied"  # wrote, and every vCPU reads back what was written
UNCHANGED = "unchanged"  # writable runstate, nothing to write, every vCPU agrees
VERIFIED = "verified"  # not writable: every vCPU already reads the reference
DIFFERS = "differs"  # inspect only (reconnect, status): the guest differs; never refuses
DIFFERS_WARNED = "differs-warned"  # not writable, values differ, already-running: warn
UNSUPPORTED_WARNED = "unsupported-qemu-warned"  # no way to the registers, unsupported-qemu: warn
DRY_RUN = "dry-run"  # planned only
# What the hook and ``start`` log when the flow raised (the error's one line is the reason).
REFUSED = "refused"
ERROR = "error"

COMPLIANT = frozenset({APPLIED, UNCHANGED, VERIFIED})


class ApplyResult(Record):
    """What one enforcement saw and did. Registers are {id: value}; ``after`` per vCPU."""

    __slots__ = (
        "after",
        "backend",
        "basis",
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
        "where",
        "writes",
        "written",
    )

    def __init__(self, fw: Firmware, policy: str) -> None:
        self.backend = fw.backend  # "qmp" or "stream"
        self.where = fw.where
        self.policy = policy
        self.runstate = ""
        self.vcpus = 0
        self.before: Registers = {}  # the first vCPU, before anything
        self.target: Registers = {}  # every register as it should be left (or read)
        self.basis = ""  # what target is: "policy 'x'", "<hvc:applied>"
        self.writes: Registers = {}  # what the plan writes (ordered)
        self.written: Registers = {}  # what was written (empty: dry run, verify-only)
        self.after: list[Registers] = []  # every vCPU, in vCPU order, after the write (if any)
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

    @property
    def compliant(self) -> bool:
        """Every vCPU reads what it should: what was written, or the reference."""
        return self.outcome in COMPLIANT

    def applied_registers(self) -> Registers:
        """Every firmware register as hvcpolicy left it (for ``<hvc:applied>``): the first
        vCPU's read-back, or what was read before when nothing was read back."""
        return dict(self.after[0]) if self.after else dict(self.before)

    def to_json(self) -> dict[str, Any]:
        def regs(values: Mapping[int, int]) -> dict[str, str]:
            return {cat.fmt_id(r): cat.fmt_value(v) for r, v in values.items()}

        return {
            "backend": self.backend,
            "where": self.where,
            "policy": self.policy,
            "runstate": self.runstate,
            "outcome": self.outcome,
            "vcpus": self.vcpus,
            "before": regs(dict(sorted(self.before.items()))),
            "target": regs(dict(sorted(self.target.items()))),
            "basis": self.basis,
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


def enforce(
    fw: Firmware,
    policy: Policy,
    *,
    applied: Mapping[int, int] | None = None,
    host: Mapping[int, int] | None = None,
    dry_run: bool = False,
    resume: bool = False,
    runstate: str | None = None,
    domain: str | None = None,
) -> ApplyResult:
    """Enforce ``policy`` on the guest behind ``fw`` (see the module docstring).

    ``applied``: the domain's ``<hvc:applied>`` registers (inmigrate clears what it lacks;
    other runstates are held to it). ``host``: this host's fresh registers, when known (the
    kernel's PSCI limit); else the guest's own. ``resume``: resume once the guest complies, or
    the policy says warn (never when running already, never after a failure, never dry).
    ``runstate``: the runstate the caller has just read (saves asking again). ``domain``: the
    libvirt domain's name, for messages (and the fix they name).

    Raises Refused (exit 3) before any write when the policy refuses; Unavailable (exit 5)
    when the firmware cannot be reached, a write fails, the vCPUs disagree or a read-back
    differs from what was written (the guest is then not resumed).
    """
    result = ApplyResult(fw, policy.name)
    if domain is not None:
        result.where = f"domain {domain!r} ({fw.where})"
    result.runstate = runstate if runstate is not None else fw.runstate()
    try:
        vcpus = fw.read()
    except InterfaceMissing as missing:
        _unsupported(result, policy, missing.message)
    else:
        _take_reading(result, vcpus)
        if result.writable:
            _write_path(fw, policy, result, applied, host, dry_run)
        else:
            _verify_path(policy, result, applied, host, domain)  # writes nothing: dry or not
    if resume and not dry_run:
        if result.runstate in RESUMABLE_RUNSTATES:
            fw.resume()
            result.resumed = True
        elif result.runstate != "running":
            result.notes.append(f"not resumed: the runstate is {result.runstate}")
    return result


def inspect(
    fw: Firmware,
    policy: Policy | None,
    *,
    applied: Mapping[int, int] | None = None,
    host: Mapping[int, int] | None = None,
    domain: str | None = None,
) -> ApplyResult:
    """Read every vCPU and hold the guest to ``applied`` or the policy's plan; never write,
    never refuse: outcome ``verified`` or ``differs`` (with ``mismatches``). For ``reconnect``
    and ``status``. InterfaceMissing (and any Unavailable) propagates."""
    result = ApplyResult(fw, policy.name if policy is not None else "-")
    if domain is not None:
        result.where = f"domain {domain!r} ({fw.where})"
    result.runstate = fw.runstate()
    _take_reading(result, fw.read())
    _hold_to_reference(policy, result, applied, host)
    result.outcome = DIFFERS if result.mismatches else VERIFIED
    return result


def unsupported(fw: Firmware, policy: Policy, reason: str) -> ApplyResult:
    """``enforcement.unsupported-qemu`` for a guest whose registers no backend reaches:
    InterfaceMissing (exit 5) when it refuses, else a result with a warning. ``reason`` names
    the guest and what is missing."""
    result = ApplyResult(fw, policy.name)
    _unsupported(result, policy, reason)
    return result


# --- the steps ----------------------------------------------------------------------------------


def _unsupported(result: ApplyResult, policy: Policy, reason: str) -> None:
    message = f"{reason}; policy {policy.name!r} cannot be enforced"
    if policy.unsupported_qemu != "warn":
        raise InterfaceMissing(f"{message} (enforcement.unsupported-qemu: refuse)")
    result.outcome = UNSUPPORTED_WARNED
    result.warnings.append(f"{message} (enforcement.unsupported-qemu: warn)")


def _take_reading(result: ApplyResult, vcpus: list[Registers]) -> None:
    if not vcpus:
        raise Unavailable(f"{result.where}: the guest has no vCPU to read")
    result.vcpus = len(vcpus)
    result.before = dict(vcpus[0])
    result.after = [dict(v) for v in vcpus]


def _plan_for(
    policy: Policy,
    result: ApplyResult,
    applied: Mapping[int, int] | None,
    host: Mapping[int, int] | None,
) -> Plan:
    if result.runstate == "inmigrate":
        return plan_inmigrate(policy, result.before, applied)
    return plan_start(policy, result.before, host)


def _write_path(
    fw: Firmware,
    policy: Policy,
    result: ApplyResult,
    applied: Mapping[int, int] | None,
    host: Mapping[int, int] | None,
    dry_run: bool,
) -> None:
    before_all, result.after = result.after, []
    disagree = compliance.disagreement(before_all)
    if disagree:  # per-VM registers read differently: nothing here is to be trusted
        raise Unavailable(
            f"{result.where}: the vCPUs disagree before any write: {'; '.join(disagree)}; "
            "nothing was written"
        )
    plan = _plan_for(policy, result, applied, host)
    result.target, result.writes = dict(plan.target), dict(plan.writes)
    result.basis = f"policy {policy.name!r}"
    result.features, result.notes, result.refusals = plan.features, plan.notes, plan.refusals
    if plan.refusals:
        raise Refused(
            f"policy {policy.name!r} refuses this guest ({result.runstate}) on "
            f"{result.where}: {'; '.join(plan.refusals)}; nothing was written",
            list(plan.refusals),
        )
    if dry_run:
        result.outcome = DRY_RUN
        return
    if not plan.writes:
        result.after = before_all  # nothing written: the reading is the read-back
        result.outcome = UNCHANGED
        return
    # The runstate again, right before the write: another monitor may have run the guest since
    # it was first read (docs/SECURITY.md T3); a guest that ran is never written.
    now = fw.runstate()
    if now != result.runstate:
        raise Unavailable(
            f"{result.where}: the guest went from {result.runstate} to {bounded(now, 40)} "
            "before the write (another monitor?); nothing was written"
        )
    fw.write(plan.writes)
    result.written = dict(plan.writes)
    result.after = fw.read()
    # Every vCPU must now read what it read before, with the writes. (On inmigrate the carried
    # registers are the migration stream's, so the full target is not expected yet.)
    diffs = compliance.check(compliance.written(result.before, plan.writes), result.after)
    if diffs:
        result.mismatches = diffs
        raise Unavailable(
            f"{result.where}: the write did not hold: {'; '.join(diffs)}; the guest was not resumed"
        )
    result.outcome = APPLIED


def _hold_to_reference(
    policy: Policy | None,
    result: ApplyResult,
    applied: Mapping[int, int] | None,
    host: Mapping[int, int] | None,
) -> None:
    ref = compliance.reference(policy, result.before, applied, host)
    if ref is None:  # neither a record nor a policy: only the vCPUs' agreement is checked
        result.mismatches = compliance.disagreement(result.after)
        return
    result.target, result.basis = dict(ref.target), ref.basis
    result.features, result.notes, result.refusals = ref.features, ref.notes, ref.refusals
    result.mismatches = compliance.check(ref, result.after)


def _verify_path(
    policy: Policy,
    result: ApplyResult,
    applied: Mapping[int, int] | None,
    host: Mapping[int, int] | None,
    domain: str | None,
) -> None:
    """Not writable: hold every vCPU to ``<hvc:applied>`` or the plan; never write."""
    _hold_to_reference(policy, result, applied, host)
    if not result.mismatches:
        result.outcome = VERIFIED
        return
    state = "already running" if result.runstate == "running" else result.runstate
    text = (
        f"the guest is {state} and its firmware registers differ from {result.basis}: "
        f"{'; '.join(result.mismatches)}; hvcpolicy does not write to a guest whose vCPUs may "
        "have run"
    )
    if policy.already_running == "warn":
        result.outcome = DIFFERS_WARNED
        result.warnings.append(f"{result.where}: {text} (enforcement.already-running: warn)")
        return
    name = domain if domain is not None else "DOMAIN"
    raise Refused(
        f"{result.where}: {text} (enforcement.already-running: refuse); start it paused so the "
        f"policy is written before any vCPU runs: `hvcpolicy start {name}` or "
        f'`virsh start --paused {name}` (with <hvc:resume after="apply"/>)',
        list(result.mismatches),
    )


def enforce_at(
    address: str,
    policy: Policy,
    *,
    timeout: float | None = None,
    applied: Mapping[int, int] | None = None,
    host: Mapping[int, int] | None = None,
    dry_run: bool = False,
    resume: bool = False,
) -> ApplyResult:
    """Connect to the QMP socket ``address``, :func:`enforce`, disconnect (every QMP wait
    bounded by ``timeout`` seconds, default :data:`hvcpolicy.qmp.DEFAULT_TIMEOUT`)."""
    from hvcpolicy.qmp import DEFAULT_TIMEOUT, QMP

    with QMP(address, timeout or DEFAULT_TIMEOUT) as qmp:
        return enforce(qmp, policy, applied=applied, host=host, dry_run=dry_run, resume=resume)
