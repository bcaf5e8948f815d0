"""The planner: what every firmware register should be, and whether to refuse. Pure, no I/O.

- ``plan_start``: a policy against a host's (or a prelaunch guest's) registers -> target values,
  the writes that get there, what the guest will see, and every refusal (SPEC.md section 3).
- ``plan_inmigrate``: what to write on a migration destination before the stream loads (section 7).
- ``check_migration``: would a destination take this guest (section 4 ``<hvc:applied>``, section 5
  QEMU's tolerance), predicting the kernel's and QEMU's verdict on every carried value.
- ``verify``: a target against what the vCPUs read back.
"""

from __future__ import annotations

from hvcpolicy import catalogue as cat
from hvcpolicy.catalogue import Kind
from hvcpolicy.kernel import Errno, Host, bitmap_mask, psci_accepted, wa2_class
from hvcpolicy.policy import LEVEL_NAMES, Mode, Policy, Unknown
from hvcpolicy.record import Record
from hvcpolicy.snapshot import Snapshot, qemu_version

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

# QEMU accepts a missing VENDOR_HYP_BMAP_2 on the destination when the source value is 0 (11.1+).
QEMU_TOLERATES_MISSING_BMAP2 = (11, 1, 0)


class FeatureView(Record):
    """One bit as the guest will see it."""

    __slots__ = ("bit", "mode", "name", "offered", "register", "visible")

    def __init__(
        self,
        name: str,  # feature name, or REGID:BIT
        register: int,
        bit: int,
        mode: str,  # allow | deny | require | unnamed (unknown: X)
        offered: bool | None,  # None: the host lacks the whole register
        visible: bool | None,  # None: no register gates it, whatever the kernel implements shows
    ) -> None:
        self.name = name
        self.register = register
        self.bit = bit
        self.mode = mode
        self.offered = offered
        self.visible = visible

    def to_json(self) -> dict[str, Any]:
        return {
            "feature": self.name,
            "register": cat.fmt_id(self.register),
            "bit": self.bit,
            "mode": self.mode,
            "host": "missing-register"
            if self.offered is None
            else ("offers" if self.offered else "lacks"),
            "guest_sees": "uncontrolled" if self.visible is None else self.visible,
        }


class Plan(Record):
    """Every register's target, the ordered writes that reach it, and every refusal."""

    __slots__ = ("features", "notes", "policy", "refusals", "target", "writes")

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.target: dict[int, int] = {}
        self.writes: dict[int, int] = {}
        self.refusals: list[str] = []
        self.features: list[FeatureView] = []
        self.notes: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.refusals

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "ok": self.ok,
            "refusals": self.refusals,
            "target": {cat.fmt_id(r): cat.fmt_value(v) for r, v in sorted(self.target.items())},
            "writes": {cat.fmt_id(r): cat.fmt_value(v) for r, v in self.writes.items()},
            "features": [f.to_json() for f in self.features],
            "notes": self.notes,
        }


def _allowed(policy: Policy, rid: int, bit: int) -> tuple[bool, str]:
    """Does the policy let the guest see this bit (when the host offers it), and by which mode."""
    mode = policy.mode_of(rid, bit)
    if mode is not None:
        return mode is not Mode.DENY, mode.value
    return policy.unknown is Unknown.ALLOW, f"unnamed (unknown: {policy.unknown.value})"


def host_level_rank(rid: int, level: int) -> int:
    """A host's mitigation level as a rank of LEVELS (WA2 by the class the kernel sees)."""
    if cat.kind_of(rid) is Kind.WORKAROUND2:
        return 2 if wa2_class(level) else 0
    return min(level, 2)


def _bitmap_target(
    policy: Policy, rid: int, value: int, refusals: list[str], views: list[FeatureView]
) -> int:
    target = 0
    for bit in cat.bits(value):
        allowed, how = _allowed(policy, rid, bit)
        name = cat.bit_key(rid, bit)
        if policy.mode_of(rid, bit) is None and policy.unknown is Unknown.REFUSE:
            refusals.append(
                f"host offers {name} ({cat.reg_name(rid)} bit {bit}), which policy "
                f"{policy.name!r} does not name (unknown: refuse)"
            )
        if allowed:
            target |= 1 << bit
        if (rid, bit) not in _CATALOGUE_BITS:
            views.append(FeatureView(name, rid, bit, how, True, allowed))
    return target


_CATALOGUE_BITS = {(f.register, f.bit) for f in cat.FEATURES.values()}


def plan_start(
    policy: Policy, registers: Mapping[int, int], host: Mapping[int, int] | None = None
) -> Plan:
    """Plan a start: ``registers`` are the guest's live values (or a host's fresh ones);
    ``host`` the host's fresh values when known (for the kernel's PSCI limit)."""
    model = Host(dict(host if host is not None else registers))
    plan = Plan(policy=policy.name)
    refusals, views = plan.refusals, plan.features

    for rid in sorted(registers):
        value = registers[rid]
        kind = cat.kind_of(rid)
        if kind is Kind.BITMAP or kind is Kind.UNKNOWN_BITMAP:
            if (
                kind is Kind.UNKNOWN_BITMAP
                and policy.unknown is Unknown.REFUSE
                and not policy.names_register(rid)
            ):
                refusals.append(
                    f"host has register {cat.fmt_id(rid)}, which policy {policy.name!r} "
                    "does not name (unknown: refuse)"
                )
            plan.target[rid] = _bitmap_target(policy, rid, value, refusals, views)
        elif kind is Kind.PSCI and policy.psci is not None:
            accepted = psci_accepted(policy.psci, model.psci_newest)
            # A pin the kernel rejects is refused here, not planned as a write that would fail.
            plan.target[rid] = policy.psci if accepted else value
            if not accepted:
                refusals.append(
                    f"psci.version {cat.psci_text(policy.psci)}: the host kernel implements PSCI "
                    f"up to {cat.psci_text(model.psci_newest)} and would reject it"
                )
        else:
            plan.target[rid] = value
            if (
                kind is Kind.UNKNOWN_FW
                and policy.unknown is Unknown.REFUSE
                and not policy.names_register(rid)
            ):
                refusals.append(
                    f"host has register {cat.fmt_id(rid)}, which policy {policy.name!r} "
                    "does not name (unknown: refuse)"
                )

    missing_denied: set[int] = set()
    for feature in cat.FEATURES.values():
        rid, bit = feature.register, feature.bit
        allowed, how = _allowed(policy, rid, bit)
        if rid not in registers:
            views.append(FeatureView(feature.name, rid, bit, how, None, None))
            if not allowed:
                missing_denied.add(rid)
            continue
        offered = bool(registers[rid] >> bit & 1)
        views.append(FeatureView(feature.name, rid, bit, how, offered, offered and allowed))
    for rid in sorted(missing_denied):
        plan.notes.append(
            f"the host lacks {cat.reg_name(rid)}: whatever of its services this kernel "
            "implements stays visible, because no register can hide it"
        )
    for (rid, named_bit), mode in policy.features.items():
        if (
            named_bit is not None
            and (rid, named_bit) not in _CATALOGUE_BITS
            and rid not in registers
        ):
            views.append(
                FeatureView(cat.bit_key(rid, named_bit), rid, named_bit, mode.value, None, None)
            )
    views.sort(key=lambda v: (v.register, v.bit))

    for (rid, req_bit), mode in policy.features.items():
        if mode is not Mode.REQUIRE:
            continue
        what = cat.fmt_id(rid) if req_bit is None else cat.bit_key(rid, req_bit)
        if rid not in registers:
            refusals.append(f"requires {what}, but the host lacks register {cat.reg_name(rid)}")
        elif req_bit is not None and not registers[rid] >> req_bit & 1:
            refusals.append(
                f"requires {what} ({cat.reg_name(rid)} bit {req_bit}), "
                "but the host does not offer it"
            )

    for rid, rank in sorted(policy.workarounds.items()):
        reg = cat.REGISTERS[rid]
        if rank == 0:
            continue
        if rid not in registers:
            refusals.append(
                f"workarounds.{reg.policy_key}: needs {LEVEL_NAMES[rank]}, but the host lacks "
                f"register {cat.reg_name(rid)}"
            )
        elif host_level_rank(rid, registers[rid]) < rank:
            refusals.append(
                f"workarounds.{reg.policy_key}: needs {LEVEL_NAMES[rank]}, but the host reports "
                f"level {registers[rid]}"
            )

    # Bitmaps first: KVM refuses a changed bitmap once a vCPU ran (EBUSY) but has no such check
    # for PSCI_VERSION, so a write that races a resume by another monitor stops at its first
    # register instead of changing the PSCI version of a guest that already runs.
    for rid in sorted(plan.target, key=lambda r: (not cat.is_bitmap(r), r)):
        if plan.target[rid] != registers.get(rid):
            plan.writes[rid] = plan.target[rid]
    _check_writes(model, plan, registers)
    return plan


def _check_writes(model: Host, plan: Plan, current: Mapping[int, int]) -> None:
    """Never propose a write the kernel would refuse: such a plan is refused instead."""
    for rid, value in plan.writes.items():
        errno = model.check_set(rid, value, current=current.get(rid))
        if errno is not None:
            plan.refusals.append(
                f"{cat.reg_name(rid)} = {cat.fmt_value(value)} would be rejected by the host "
                f"kernel ({errno.value})"
            )


def allowed_mask(policy: Policy, rid: int) -> int:
    return sum(1 << b for b in range(64) if _allowed(policy, rid, b)[0])


def plan_inmigrate(
    policy: Policy, live: Mapping[int, int], applied: Mapping[int, int] | None
) -> Plan:
    """Writes on a migration destination before the stream loads (SPEC.md section 7).

    With ``<hvc:applied>``: clear every bitmap this host has and the guest never carried, so no
    new service appears mid-life; carried registers are the stream's. Without it: each bitmap's
    live value AND the policy's allowed bits, never setting a bit.
    """
    plan = Plan(policy=policy.name)
    for rid in sorted(live):
        value = live[rid]
        if not cat.is_bitmap(rid):
            plan.target[rid] = applied.get(rid, value) if applied is not None else value
            continue
        if applied is not None:
            if rid in applied:
                plan.target[rid] = applied[rid]
                continue
            plan.target[rid] = 0
            plan.notes.append(f"{cat.reg_name(rid)}: not carried by the guest, cleared")
        else:
            plan.target[rid] = value & allowed_mask(policy, rid)
        if plan.target[rid] != value:
            plan.writes[rid] = plan.target[rid]
    if applied is not None:
        for rid in sorted(applied.keys() - live.keys()):
            plan.notes.append(f"{cat.reg_name(rid)}: carried by the guest, absent on this host")
    _check_writes(Host(dict(live)), plan, live)
    return plan


def verify(target: Mapping[int, int], live: Mapping[int, int]) -> list[str]:
    """Every register whose read-back differs from the target."""
    out = []
    for rid in sorted(target):
        kind = cat.kind_of(rid)
        if kind is Kind.WORKAROUND or kind is Kind.WORKAROUND2:
            continue  # read-only in effect: reads are the host's level, writes only check
        if rid not in live:
            out.append(f"{cat.reg_name(rid)}: expected {cat.fmt_value(target[rid])}, not listed")
        elif live[rid] != target[rid]:
            out.append(
                f"{cat.reg_name(rid)}: expected {cat.fmt_value(target[rid])}, "
                f"reads {cat.fmt_value(live[rid])}"
            )
    return out


# --- migration -------------------------------------------------------------------------------


class Verdict(Record):
    __slots__ = ("basis", "clears", "destination", "notes", "reasons")

    def __init__(self, destination: str, basis: str = "policy") -> None:
        self.destination = destination
        self.reasons: list[str] = []
        self.clears: list[int] = []  # bitmaps new on the destination, cleared on arrival
        self.notes: list[str] = []
        # "applied" (recorded values), "source" (planned on --from), or "policy"
        self.basis = basis

    @property
    def ok(self) -> bool:
        return not self.reasons

    def to_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "ok": self.ok,
            "basis": self.basis,
            "reasons": self.reasons,
            "clears": [cat.fmt_id(r) for r in self.clears],
            "notes": self.notes,
        }


def rejection_detail(dest: Host, rid: int, value: int, errno: Errno) -> str:
    kind = cat.kind_of(rid)
    have = dest.registers.get(rid, 0)
    if kind is Kind.BITMAP or kind is Kind.UNKNOWN_BITMAP:
        extra = value & ~bitmap_mask(rid, have)
        names = ", ".join(cat.bit_key(rid, b) for b in cat.bits(extra))
        return f"bits {names} are not supported there ({errno.value})"
    if kind is Kind.PSCI:
        return (
            f"PSCI {cat.psci_text(value)} is newer than the {cat.psci_text(dest.psci_newest)} "
            f"that kernel implements ({errno.value})"
        )
    if kind is Kind.WORKAROUND or kind is Kind.WORKAROUND2:
        return f"the destination's mitigation level is {have} ({errno.value})"
    return f"the destination reads {cat.fmt_value(have)} and no other value is known to pass"


def predict_load(applied: Mapping[int, int], dest: Snapshot) -> Verdict:
    """The destination kernel's and QEMU's verdict on loading these register values."""
    verdict = Verdict(destination=dest.host, basis="applied")
    model = Host(dest.registers)
    qemu = qemu_version(dest.qemu)
    for rid in sorted(applied):
        value = applied[rid]
        if rid not in dest.registers:
            if rid == cat.VENDOR_HYP_BMAP_2 and value == 0:
                if qemu is not None and qemu >= QEMU_TOLERATES_MISSING_BMAP2:
                    verdict.notes.append(
                        f"{cat.reg_name(rid)} is missing on the destination; its QEMU "
                        f"{dest.qemu} accepts that because the guest's value is 0"
                    )
                    continue
                verdict.reasons.append(
                    f"{cat.reg_name(rid)} is missing on the destination and its QEMU "
                    f"({dest.qemu or 'version unknown'}) fails the load; QEMU tolerates that "
                    "only from 11.1, and only for a value of 0"
                )
                continue
            verdict.reasons.append(
                f"{cat.reg_name(rid)} = {cat.fmt_value(value)}: the destination kernel lacks "
                "this register, so QEMU fails the load"
            )
            continue
        errno = model.check_set(rid, value)
        if errno is not None:
            verdict.reasons.append(
                f"{cat.reg_name(rid)} = {cat.fmt_value(value)}: the destination kernel would "
                f"reject it: {rejection_detail(model, rid, value, errno)}"
            )
    for rid in sorted(dest.registers.keys() - applied.keys()):
        if cat.is_bitmap(rid):
            verdict.clears.append(rid)
            verdict.notes.append(
                f"{cat.reg_name(rid)} is new on the destination: hvcpolicy clears it "
                "so the guest sees no new service"
            )
        else:
            verdict.notes.append(
                f"{cat.reg_name(rid)} is new on the destination and keeps its value "
                f"{cat.fmt_value(dest.registers[rid])}"
            )
    return verdict


def unwritable_arrival(verdict: Verdict, dest: Snapshot) -> None:
    """A stock QEMU offers no write on arrival (SPEC §7, §8): a register the destination has
    and the guest's stream lacks keeps the destination's reset value. For a bitmap that value
    must be 0 (no service may appear mid-life), else the arrival is refused; ``verdict`` (from
    :func:`predict_load`) gets the reasons, and its notes stop promising a clear."""
    for rid in verdict.clears:
        reset = dest.registers[rid]
        promise = f"{cat.reg_name(rid)} is new on the destination: hvcpolicy clears it"
        verdict.notes = [n for n in verdict.notes if not n.startswith(promise)]
        if reset:
            names = ", ".join(cat.bit_key(rid, b) for b in cat.bits(reset))
            verdict.reasons.append(
                f"{cat.reg_name(rid)} is new on the destination, whose kernel resets it to "
                f"{cat.fmt_value(reset)} ({names}); the guest's stream does not carry it and a "
                "QEMU without the firmware-register interface cannot clear it on arrival, so "
                "the guest would see services it never had"
            )
        else:
            verdict.notes.append(
                f"{cat.reg_name(rid)} is new on the destination and resets to 0: the guest "
                "sees no new service"
            )
    verdict.clears = []


def check_migration(
    policy: Policy | None,
    dest: Snapshot,
    applied: Mapping[int, int] | None = None,
    source: Snapshot | None = None,
    writable_on_arrival: bool = True,
) -> Verdict:
    """Would ``dest`` take the guest? From recorded values when there are some, else from the
    policy's plan on ``source``, and always (without a record) from the policy on ``dest``.
    ``writable_on_arrival``: the destination's QEMU offers the QMP interface (SPEC §8), so
    registers new there are cleared on arrival; else (a stock QEMU) they must reset to 0."""
    if applied is not None:
        verdict = predict_load(applied, dest)
        if not writable_on_arrival:
            unwritable_arrival(verdict, dest)
        return verdict
    if source is not None:
        if policy is None:
            verdict = predict_load(source.registers, dest)
        else:
            plan = plan_start(policy, source.registers)
            verdict = predict_load(plan.target, dest)
            verdict.reasons[:0] = [f"on the source {source.host}: {r}" for r in plan.refusals]
        verdict.basis = "source"
    else:
        verdict = Verdict(destination=dest.host, basis="policy")
    if policy is not None:
        dest_plan = plan_start(policy, dest.registers)
        verdict.reasons.extend(dest_plan.refusals)
    return verdict
