"""Does a guest comply? The one rule, pure: what its firmware registers should read, and how
what they read differs.

What a live guest should read comes from its ``<hvc:applied>`` record when it has one (what
hvcpolicy left it with), else from the policy's plan for it. Used by every check hvcpolicy makes
of a guest that may already have run: the hook's ``started`` (paused, running) and ``reconnect``
stages, ``hvcpolicy apply`` outside a writable runstate, ``status`` and ``start``; and, with the
written values as the reference, by the read-back after every write (:func:`readback`).

The rule, against a record:
- every recorded register reads its recorded value (mitigation registers excepted: their reads are
  the host's level, whatever was written); a recorded register the guest does not list differs,
  unless it is a bitmap recorded as 0 (nothing was offered; QEMU accepts its absence);
- a bitmap the guest lists and the record lacks must read 0: services the guest was never given
  (the ``inmigrate`` write clears them); any other unrecorded register keeps its value.

Against the policy: the plan's refusals, and every register of the plan's target (built from the
guest's own values, the host's for the kernel's PSCI limit) that reads otherwise.

With several vCPUs, each is held to the rule, and they must agree: registers are per VM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hvcpolicy import catalogue as cat
from hvcpolicy.catalogue import Kind
from hvcpolicy.firmware import Registers
from hvcpolicy.planner import FeatureView, plan_start
from hvcpolicy.policy import Policy
from hvcpolicy.record import Record

APPLIED_BASIS = "<hvc:applied>"


class Reference(Record):
    """What a guest's registers should read, and why: ``basis`` names it in messages."""

    __slots__ = ("basis", "features", "notes", "recorded", "refusals", "target")

    def __init__(self, basis: str, target: Mapping[int, int], recorded: bool) -> None:
        self.basis = basis  # "<hvc:applied>", "policy 'x'", "the write"
        self.target: Registers = dict(target)
        self.recorded = recorded  # a record: unrecorded bitmaps must read 0
        self.refusals: list[str] = []  # the policy refuses this guest outright
        self.features: list[FeatureView] = []
        self.notes: list[str] = []


def reference(
    policy: Policy | None,
    live: Mapping[int, int],
    applied: Mapping[int, int] | None = None,
    host: Mapping[int, int] | None = None,
) -> Reference | None:
    """What the guest reading ``live`` should read: its record ``applied`` when there is one,
    else ``policy``'s plan for it (``host``: this host's fresh values, for the kernel's PSCI
    limit; else the guest's own). None: neither, hvcpolicy has no opinion."""
    plan = plan_start(policy, live, host) if policy is not None else None
    if applied is not None:
        ref = Reference(APPLIED_BASIS, applied, recorded=True)
    elif plan is not None and policy is not None:
        ref = Reference(f"policy {policy.name!r}", plan.target, recorded=False)
        ref.refusals = list(plan.refusals)
    else:
        return None
    if plan is not None:
        ref.features, ref.notes = plan.features, plan.notes
    return ref


def written(before: Mapping[int, int], writes: Mapping[int, int]) -> Reference:
    """What every vCPU must read right after ``writes``: what it read before, with them."""
    target = dict(before)
    target.update(writes)
    return Reference("the write", target, recorded=False)


def differences(ref: Reference, live: Mapping[int, int]) -> list[str]:
    """How one vCPU's ``live`` registers differ from ``ref`` (empty: it complies)."""
    out = [f"policy refuses: {r}" for r in ref.refusals]
    for rid in sorted(ref.target):
        want = ref.target[rid]
        kind = cat.kind_of(rid)
        if kind is Kind.WORKAROUND or kind is Kind.WORKAROUND2:
            continue  # read-only in effect: reads are the host's level, writes only check
        if rid not in live:
            if ref.recorded and cat.is_bitmap(rid) and want == 0:
                continue
            out.append(f"{cat.reg_name(rid)}: not listed, {ref.basis} says {cat.fmt_value(want)}")
        elif live[rid] != want:
            out.append(
                f"{cat.reg_name(rid)}: reads {cat.fmt_value(live[rid])}, {ref.basis} says "
                f"{cat.fmt_value(want)}"
            )
    if ref.recorded:
        for rid in sorted(live.keys() - ref.target.keys()):
            if cat.is_bitmap(rid) and live[rid] != 0:
                out.append(
                    f"{cat.reg_name(rid)}: reads {cat.fmt_value(live[rid])}, not in "
                    f"{ref.basis} (services the guest was never given)"
                )
    return out


def disagreement(vcpus: Sequence[Mapping[int, int]]) -> list[str]:
    """How the vCPUs' views differ from the first vCPU's (registers are per VM)."""
    out: list[str] = []
    first = vcpus[0] if vcpus else {}
    for index, other in enumerate(vcpus[1:], 1):
        for rid in sorted(first.keys() | other.keys()):
            a, b = first.get(rid), other.get(rid)
            if a != b:
                out.append(
                    f"vCPU {index}: {cat.reg_name(rid)} reads "
                    f"{cat.fmt_value(b) if b is not None else 'nothing'}, vCPU 0 "
                    f"{cat.fmt_value(a) if a is not None else 'nothing'}"
                )
    return out


def check(ref: Reference, vcpus: Sequence[Mapping[int, int]]) -> list[str]:
    """Every way the guest, read through every vCPU (in vCPU order), fails ``ref``: how the
    vCPUs disagree, then how the first differs from ``ref`` (a vCPU that agrees with the first
    differs as it does; one that does not is named in the disagreement)."""
    return disagreement(vcpus) + differences(ref, vcpus[0] if vcpus else {})
