"""Properties over generated hosts and policies (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hvcpolicy import catalogue as cat
from hvcpolicy.domainxml import DomainPolicy
from hvcpolicy.errors import InvalidInput
from hvcpolicy.kernel import Host
from hvcpolicy.merge import merge
from hvcpolicy.planner import plan_start
from hvcpolicy.policy import Mode, Policy, Unknown
from hvcpolicy.snapshot import Snapshot, baseline, meet

UNKNOWN_BMAP = 0x6030000000160004
UNKNOWN_FW = 0x6030000000140004
PSCI = [0x10000, 0x10001, 0x10003]


@st.composite
def hosts(draw: st.DrawFn) -> dict[int, int]:
    regs: dict[int, int] = {cat.PSCI_VERSION: draw(st.sampled_from(PSCI))}
    if draw(st.booleans()):
        regs[cat.SMCCC_ARCH_WORKAROUND_1] = draw(st.integers(0, 2))
        regs[cat.SMCCC_ARCH_WORKAROUND_2] = draw(st.sampled_from([0, 1, 2, 3]))
        regs[cat.SMCCC_ARCH_WORKAROUND_3] = draw(st.integers(0, 2))
    for reg in cat.REGISTERS.values():
        if reg.kind is cat.Kind.BITMAP and reg.mask is not None and draw(st.booleans()):
            regs[reg.id] = draw(st.integers(0, reg.mask))
    if draw(st.booleans()):
        regs[UNKNOWN_BMAP] = draw(st.integers(0, 0xFF))
    if draw(st.booleans()):
        regs[UNKNOWN_FW] = draw(st.integers(0, 5))
    return regs


FEATURE_KEYS = [(f.register, f.bit) for f in cat.FEATURES.values()] + [
    (cat.VENDOR_HYP_BMAP, 2),
    (UNKNOWN_BMAP, 3),
    (UNKNOWN_BMAP, None),
]


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    keys = draw(st.lists(st.sampled_from(FEATURE_KEYS), unique=True))
    features = {k: draw(st.sampled_from(list(Mode))) for k in keys}
    return Policy(
        name="gen",
        features=features,
        unknown=draw(st.sampled_from(list(Unknown))),
        psci=draw(st.one_of(st.none(), st.sampled_from([0x2, *PSCI, 0x10002]))),
        workarounds={
            rid: draw(st.integers(0, 2))
            for rid in draw(
                st.lists(st.sampled_from(list(cat.WORKAROUND_KEYS.values())), unique=True)
            )
        },
    )


@settings(max_examples=400, deadline=None)
@given(hosts(), policies())
def test_target_never_sets_a_bit_the_host_lacks(regs: dict[int, int], policy: Policy) -> None:
    plan = plan_start(policy, regs)
    for rid, value in plan.target.items():
        if cat.is_bitmap(rid):
            assert value & ~regs[rid] == 0
    assert set(plan.target) == set(regs)


@settings(max_examples=400, deadline=None)
@given(hosts(), policies())
def test_planner_never_proposes_a_write_the_kernel_rejects(
    regs: dict[int, int], policy: Policy
) -> None:
    plan = plan_start(policy, regs)
    model = Host(regs)
    if plan.ok:
        for rid, value in plan.writes.items():
            assert model.check_set(rid, value, current=regs[rid]) is None
    # Even a refused plan lists no write the model rejects without also refusing.
    for rid, value in plan.writes.items():
        if model.check_set(rid, value, current=regs[rid]) is not None:
            assert not plan.ok


@settings(max_examples=400, deadline=None)
@given(hosts(), policies(), st.data())
def test_merge_never_widens(regs: dict[int, int], operator: Policy, data: st.DataObject) -> None:
    keys = data.draw(st.lists(st.sampled_from(FEATURE_KEYS), unique=True))
    dom = DomainPolicy(
        ref="gen",
        features={k: data.draw(st.sampled_from(list(Mode))) for k in keys},
        unknown=data.draw(st.one_of(st.none(), st.sampled_from(list(Unknown)))),
        psci=data.draw(st.one_of(st.none(), st.sampled_from(PSCI))),
    )
    try:
        merged = merge(operator, dom, "dom")
    except InvalidInput:
        return
    before = plan_start(operator, regs)
    after = plan_start(merged, regs)
    for rid, value in after.target.items():
        if cat.is_bitmap(rid):
            assert value & ~before.target[rid] == 0, "merged policy exposes more"
    if not before.ok:
        assert not after.ok
    assert operator.psci is None or merged.psci == operator.psci


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    return Snapshot(
        host=draw(st.sampled_from(["a", "b", "c"])),
        kernel=draw(st.sampled_from(["4.14.1", "5.10.2", "6.1.3", "6.18.4", "7.3.0"])),
        source="kvm",
        registers=draw(hosts()),
        qemu=draw(st.one_of(st.none(), st.sampled_from(["7.2.0", "10.0.2", "11.1.0"]))),
    )


def same(a: Snapshot, b: Snapshot) -> bool:
    return (a.registers, a.kernel, a.qemu) == (b.registers, b.kernel, b.qemu)


@settings(max_examples=300, deadline=None)
@given(snapshots(), snapshots(), snapshots())
def test_baseline_is_a_meet(a: Snapshot, b: Snapshot, c: Snapshot) -> None:
    assert same(meet(a, b), meet(b, a))
    assert same(meet(meet(a, b), c), meet(a, meet(b, c)))
    ab = meet(a, b)
    assert same(meet(ab, ab), ab)
    assert same(baseline([a, b, c]), baseline([c, a, b]))
    assert same(baseline([a, a]), baseline([a]))
    # Least common: never a register or a bit some host lacks.
    low = baseline([a, b, c])
    for rid, value in low.registers.items():
        for s in (a, b, c):
            assert rid in s.registers
            if cat.is_bitmap(rid):
                assert value & ~s.registers[rid] == 0
            else:
                assert value <= s.registers[rid]
