"""What changed between two snapshots of a host, and what that means for each policy. Pure.

The host side lists every register added or gone, every bit offered or withdrawn, the PSCI
default and each mitigation level moving up or down, and a QEMU upgrade. The policy side reuses
the planner, never a second model of it:

- ``refused``: ``plan_start`` refuses the policy on the new host but not on the old one;
- ``sees``: what a guest started on the new host sees that one started on the old host did not
  (``FeatureView.visible`` per bit, and the planned PSCI, mitigation and unknown-register
  values), and what it no longer sees;
- ``migration``: ``check_migration`` from each side's planned target to the other host, in both
  directions, counted only where the policy starts on the source and a migration between two
  old-kernel hosts was accepted (it is what "no longer" means).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hvcpolicy import catalogue as cat
from hvcpolicy.catalogue import Kind
from hvcpolicy.planner import Plan, Verdict, check_migration, host_level_rank, plan_start
from hvcpolicy.policy import LEVEL_NAMES, Policy
from hvcpolicy.snapshot import Snapshot


@dataclass(frozen=True)
class RegisterChange:
    """One register that differs between the two snapshots."""

    register: int
    change: str  # added | removed | bits | psci | mitigation | value
    old: int | None
    new: int | None
    summary: str
    offered: tuple[str, ...] = ()  # bitmaps: bits the new host offers and the old did not
    withdrawn: tuple[str, ...] = ()  # bitmaps: bits the old host offered and the new does not
    direction: str = ""  # psci / mitigation: up | down

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "register": cat.fmt_id(self.register),
            "name": cat.REGISTERS[self.register].name if self.register in cat.REGISTERS else None,
            "change": self.change,
            "old": None if self.old is None else cat.fmt_value(self.old),
            "new": None if self.new is None else cat.fmt_value(self.new),
            "summary": self.summary,
        }
        if self.change in ("bits", "added", "removed") and cat.is_bitmap(self.register):
            doc["offered"] = list(self.offered)
            doc["withdrawn"] = list(self.withdrawn)
        if self.direction:
            doc["direction"] = self.direction
        return doc


@dataclass
class HostDiff:
    old: Snapshot
    new: Snapshot
    registers: list[RegisterChange] = field(default_factory=list)
    qemu: tuple[str | None, str | None] | None = None  # (old, new) when they differ

    @property
    def changed(self) -> bool:
        return bool(self.registers) or self.qemu is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "old": _side(self.old),
            "new": _side(self.new),
            "changed": self.changed,
            "registers": [c.to_json() for c in self.registers],
            "qemu": None if self.qemu is None else {"old": self.qemu[0], "new": self.qemu[1]},
        }


def _side(snap: Snapshot) -> dict[str, Any]:
    return {"host": snap.host, "kernel": snap.kernel, "qemu": snap.qemu, "source": snap.source}


def _level_text(rid: int, level: int) -> str:
    return f"{level} ({LEVEL_NAMES[host_level_rank(rid, level)]})"


def _describe(rid: int, old: int | None, new: int | None) -> RegisterChange | None:
    name = cat.reg_name(rid)
    kind = cat.kind_of(rid)
    bitmap = kind is Kind.BITMAP or kind is Kind.UNKNOWN_BITMAP
    if old is None and new is not None:
        offered = tuple(cat.bit_key(rid, b) for b in cat.bits(new)) if bitmap else ()
        what = (
            f"offers {', '.join(offered)}"
            if offered
            else ("no bits offered" if bitmap else f"reads {cat.fmt_value(new)}")
        )
        return RegisterChange(
            rid, "added", None, new, f"new register {name} = {cat.fmt_value(new)}: {what}", offered
        )
    if new is None and old is not None:
        withdrawn = tuple(cat.bit_key(rid, b) for b in cat.bits(old)) if bitmap else ()
        return RegisterChange(
            rid,
            "removed",
            old,
            None,
            f"register {name} is gone (was {cat.fmt_value(old)})",
            (),
            withdrawn,
        )
    assert old is not None and new is not None
    if old == new:
        return None
    if bitmap:
        offered = tuple(cat.bit_key(rid, b) for b in cat.bits(new & ~old))
        withdrawn = tuple(cat.bit_key(rid, b) for b in cat.bits(old & ~new))
        parts = []
        if offered:
            parts.append(f"now offers {', '.join(offered)}")
        if withdrawn:
            parts.append(f"no longer offers {', '.join(withdrawn)}")
        return RegisterChange(
            rid,
            "bits",
            old,
            new,
            f"{name} {cat.fmt_value(old)} -> {cat.fmt_value(new)}: {'; '.join(parts)}",
            offered,
            withdrawn,
        )
    if kind is Kind.PSCI:
        direction = "up" if new > old else "down"
        return RegisterChange(
            rid,
            "psci",
            old,
            new,
            f"PSCI default {cat.psci_text(old)} -> {cat.psci_text(new)} ({direction})",
            direction=direction,
        )
    if kind is Kind.WORKAROUND or kind is Kind.WORKAROUND2:
        old_rank, new_rank = host_level_rank(rid, old), host_level_rank(rid, new)
        direction = "up" if (new_rank, new) > (old_rank, old) else "down"
        key = cat.REGISTERS[rid].policy_key
        return RegisterChange(
            rid,
            "mitigation",
            old,
            new,
            f"{key} level {_level_text(rid, old)} -> {_level_text(rid, new)} ({direction})",
            direction=direction,
        )
    return RegisterChange(
        rid, "value", old, new, f"{name} {cat.fmt_value(old)} -> {cat.fmt_value(new)}"
    )


def diff_hosts(old: Snapshot, new: Snapshot) -> HostDiff:
    result = HostDiff(old, new)
    for rid in sorted(old.registers.keys() | new.registers.keys()):
        change = _describe(rid, old.registers.get(rid), new.registers.get(rid))
        if change is not None:
            result.registers.append(change)
    if old.qemu != new.qemu:
        result.qemu = (old.qemu, new.qemu)
    return result


# --- what it means for a policy -------------------------------------------------------------


@dataclass
class Migration:
    direction: str  # old-to-new | new-to-old
    verdict: Verdict | None  # None: the policy cannot start on the source, so no guest is there
    counted: bool  # a refusal here is a change (an old-to-old migration was accepted)

    @property
    def refused(self) -> bool:
        return self.verdict is not None and not self.verdict.ok

    def to_json(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "assessed": self.verdict is not None,
            "ok": None if self.verdict is None else self.verdict.ok,
            "reasons": [] if self.verdict is None else self.verdict.reasons,
            "notes": [] if self.verdict is None else self.verdict.notes,
        }


@dataclass
class PolicyImpact:
    policy: str
    old_plan: Plan
    new_plan: Plan
    sees: list[str] = field(default_factory=list)  # new to a guest on the new host
    loses: list[str] = field(default_factory=list)  # gone for a guest on the new host
    notes: list[str] = field(default_factory=list)
    migrations: list[Migration] = field(default_factory=list)

    @property
    def now_refused(self) -> bool:
        return self.old_plan.ok and not self.new_plan.ok

    @property
    def now_starts(self) -> bool:
        return not self.old_plan.ok and self.new_plan.ok

    @property
    def migration_refused(self) -> list[Migration]:
        return [m for m in self.migrations if m.counted and m.refused]

    @property
    def affected(self) -> bool:
        return (
            self.now_refused or bool(self.sees) or bool(self.loses) or bool(self.migration_refused)
        )

    @property
    def outcomes(self) -> list[str]:
        out = []
        if self.now_refused:
            out.append("refused")
        if self.sees:
            out.append("sees-new")
        if self.loses:
            out.append("loses")
        out.extend(f"migration-{m.direction}-refused" for m in self.migration_refused)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "affected": self.affected,
            "outcomes": self.outcomes,
            "start": {
                "old": {"ok": self.old_plan.ok, "reasons": self.old_plan.refusals},
                "new": {"ok": self.new_plan.ok, "reasons": self.new_plan.refusals},
            },
            "sees": self.sees,
            "loses": self.loses,
            "migrations": [m.to_json() for m in self.migrations],
            "notes": self.notes,
        }


def _visibility(plan: Plan) -> dict[tuple[int, int], bool | None]:
    """Every bit a plan says something about: True/False when a register gates it, None when
    the host has no register for it (whatever the kernel implements shows)."""
    seen: dict[tuple[int, int], bool | None] = {
        (v.register, v.bit): v.visible for v in plan.features
    }
    for rid, value in plan.target.items():
        if cat.is_bitmap(rid):
            for bit in cat.bits(value):
                seen[(rid, bit)] = True
    return seen


def _value_text(rid: int, value: int) -> str:
    kind = cat.kind_of(rid)
    if kind is Kind.PSCI:
        return f"PSCI {cat.psci_text(value)}"
    if kind is Kind.WORKAROUND or kind is Kind.WORKAROUND2:
        return f"{cat.REGISTERS[rid].policy_key} level {_level_text(rid, value)}"
    return f"{cat.reg_name(rid)} = {cat.fmt_value(value)}"


def _compare_views(impact: PolicyImpact) -> None:
    old_plan, new_plan = impact.old_plan, impact.new_plan
    old_vis, new_vis = _visibility(old_plan), _visibility(new_plan)
    offered_new = {(v.register, v.bit) for v in new_plan.features if v.offered}
    for key in sorted(old_vis.keys() | new_vis.keys()):
        rid, bit = key
        name = cat.bit_key(rid, bit)
        before, after = old_vis.get(key, False), new_vis.get(key, False)
        if before == after:
            continue
        if after is True:
            was = (
                "the old kernel had no register for it, so whether it was offered is unknown"
                if before is None
                else "hidden on the old kernel"
            )
            impact.sees.append(f"{name} ({cat.reg_name(rid)} bit {bit}): visible ({was})")
        elif before is True:
            why = (
                "the new kernel has no register for it: whatever it implements shows"
                if after is None
                else "hidden on the new kernel"
            )
            impact.loses.append(f"{name} ({cat.reg_name(rid)} bit {bit}): {why}")
        elif before is None:
            if key not in offered_new:
                continue  # the new kernel lists the register but does not offer the bit
            impact.notes.append(
                f"{name}: now hidden by {cat.reg_name(rid)} (the old kernel had no register for it)"
            )
        else:
            impact.notes.append(
                f"{name}: no longer controllable, the new kernel lacks {cat.reg_name(rid)}"
            )
    # Values the guest reads that no bitmap carries: PSCI, mitigation levels, unknown registers.
    for rid in sorted(old_plan.target.keys() | new_plan.target.keys()):
        if cat.is_bitmap(rid):
            continue
        before_v, after_v = old_plan.target.get(rid), new_plan.target.get(rid)
        if before_v == after_v:
            continue
        if after_v is None:
            assert before_v is not None
            impact.loses.append(f"{_value_text(rid, before_v)}: the new kernel lacks the register")
        elif before_v is None:
            impact.sees.append(f"{_value_text(rid, after_v)} (the old kernel lacks the register)")
        else:
            text = f"{_value_text(rid, after_v)} (was {_value_text(rid, before_v)})"
            change = _describe(rid, before_v, after_v)
            # a lower PSCI version or mitigation level is something lost, not something new
            down = change is not None and change.direction == "down"
            (impact.loses if down else impact.sees).append(text)


def assess(policy: Policy, old: Snapshot, new: Snapshot) -> PolicyImpact:
    """What moving from host ``old`` to host ``new`` means for guests under ``policy``."""
    impact = PolicyImpact(
        policy.name, plan_start(policy, old.registers), plan_start(policy, new.registers)
    )
    if impact.old_plan.ok and impact.new_plan.ok:
        _compare_views(impact)
    elif not impact.old_plan.ok and not impact.new_plan.ok:
        impact.notes.append("refused on the old host and on the new one: no guest runs there")
    elif impact.now_starts:
        impact.notes.append("refused on the old host, starts on the new one")
    before = check_migration(policy, old, source=old) if impact.old_plan.ok else None
    counted = before is not None and before.ok
    for direction, src, src_plan, dest in (
        ("old-to-new", old, impact.old_plan, new),
        ("new-to-old", new, impact.new_plan, old),
    ):
        verdict = check_migration(policy, dest, source=src) if src_plan.ok else None
        impact.migrations.append(Migration(direction, verdict, counted))
    return impact


@dataclass
class Diff:
    host: HostDiff
    policies: list[PolicyImpact]

    @property
    def affected(self) -> list[str]:
        return [p.policy for p in self.policies if p.affected]

    def to_json(self) -> dict[str, Any]:
        doc = self.host.to_json()
        doc["policies"] = [p.to_json() for p in self.policies]
        doc["affected"] = self.affected
        return doc


def diff(old: Snapshot, new: Snapshot, policies: list[Policy]) -> Diff:
    return Diff(diff_hosts(old, new), [assess(p, old, new) for p in policies])


# --- text -----------------------------------------------------------------------------------


def _label(snap: Snapshot) -> str:
    qemu = f", QEMU {snap.qemu}" if snap.qemu else ""
    return f"{snap.host} (kernel {snap.kernel}{qemu})"


_DIRECTION_TEXT = {
    "old-to-new": "from the old kernel to the new",
    "new-to-old": "from the new kernel to the old",
}
_MARK = {"added": "+", "removed": "-"}


def text_lines(result: Diff, policies_from: str) -> list[str]:
    host = result.host
    lines = [f"old: {_label(host.old)}", f"new: {_label(host.new)}", ""]
    if not host.changed:
        lines.append("host: no firmware register changed")
    else:
        lines.append("host:")
        for change in host.registers:
            lines.append(f"  {_MARK.get(change.change, '~')} {change.summary}")
        if host.qemu is not None:
            lines.append(
                f"  ~ QEMU {host.qemu[0] or 'unknown'} -> {host.qemu[1] or 'unknown'} "
                "(decides whether a missing VENDOR_HYP_BMAP_2 is tolerated on migration)"
            )
    lines.append("")
    if not result.policies:
        lines.append(f"policies: none found ({policies_from})")
    else:
        lines.append(f"policies ({policies_from}):")
    for impact in result.policies:
        lines.append(f"  {impact.policy}: {'AFFECTED' if impact.affected else 'unaffected'}")
        if impact.now_refused:
            lines.append("    a start would now be REFUSED:")
            lines.extend(f"      - {r}" for r in impact.new_plan.refusals)
        lines.extend(f"    sees: {s}" for s in impact.sees)
        lines.extend(f"    loses: {s}" for s in impact.loses)
        for m in impact.migration_refused:
            assert m.verdict is not None
            lines.append(f"    migration {_DIRECTION_TEXT[m.direction]} REFUSED:")
            lines.extend(f"      - {r}" for r in m.verdict.reasons)
        lines.extend(f"    note: {n}" for n in impact.notes)
    lines.append("")
    affected = result.affected
    if affected:
        lines.append(
            f"verdict: {len(affected)} of {len(result.policies)} policies affected: "
            + ", ".join(affected)
        )
    elif host.changed:
        lines.append("verdict: the host changed, no policy is affected")
    else:
        lines.append("verdict: nothing changed")
    return lines
