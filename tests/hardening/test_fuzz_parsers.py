"""Fuzz every parser the outside world feeds, in-process: policy YAML and JSON, domain XML (the
hook's stdin), host snapshots. Byte-level mutation of the corpus reaches the syntax; tree-level
mutation and generated XML reach the meaning (merge, planner, renderer); hypothesis adds
structured documents. Every input must end in a result or InvalidInput (exit 4) within
``HANG_SECONDS``: 0 tracebacks, 0 hangs.

Seeds are fixed, so CI runs the same inputs every time; ``HVCPOLICY_FUZZ_SCALE=10`` runs ten
times as many (new seeds) for a longer local campaign.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvcpolicy import XMLNS
from hvcpolicy.errors import InvalidInput
from tests.hardening import targets
from tests.hardening.fuzzlib import (
    CORPUS,
    Figures,
    assert_clean,
    mutated,
    run_inputs,
    time_limit,
    tree_inputs,
    xml_inputs,
)

SCALE = int(os.environ.get("HVCPOLICY_FUZZ_SCALE", "1"))

POLICY_KEYS = [
    "apiVersion",
    "kind",
    "metadata",
    "spec",
    "name",
    "description",
    "features",
    "unknown",
    "psci",
    "version",
    "workarounds",
    "enforcement",
    "unsupported-qemu",
    "already-running",
    "trng",
    "ptp",
    "pv-time",
    "discover-impl-cpus",
    "0x6030000000160002:5",
    "0x6030000000160003:63",
    "0x6030000000160009",
    "0x6030000000140000",
    "0x6030000000140009",
    "smccc-arch-workaround-1",
    "smccc-arch-workaround-2",
    "smccc-arch-workaround-3",
]
SNAPSHOT_KEYS = [
    "apiVersion",
    "kind",
    "host",
    "kernel",
    "taken",
    "source",
    "qemu",
    "registers",
    "0x6030000000160002",
    "0x6030000000160003",
    "0x6030000000140000",
    "0x6030000000140002",
    "0x6030000000170000",
    "0x6030000000160009",
    "0x603000000014ffff",
]

# (suite, input generator, target, count). The sum is the per-run figure issue 7 asks for.
CAMPAIGNS = {
    "xml/bytes": (lambda n, s: mutated("xml", targets.XML_TOKENS, n, s), targets.xml_target, 25000),
    "xml/generated": (xml_inputs, targets.xml_target, 20000),
    "snapshot/bytes": (
        lambda n, s: mutated("snapshot", targets.SNAPSHOT_TOKENS, n, s),
        targets.snapshot_target,
        12000,
    ),
    "snapshot/tree": (
        lambda n, s: tree_inputs("snapshot", SNAPSHOT_KEYS, n, s),
        targets.snapshot_target,
        12000,
    ),
    "policy-json/bytes": (
        lambda n, s: mutated("policy", targets.POLICY_TOKENS, n, s),
        targets.policy_json,
        10000,
    ),
    "policy-json/tree": (
        lambda n, s: tree_inputs("policy", POLICY_KEYS, n, s),
        targets.policy_doc_json,
        10000,
    ),
    "policy-yaml/bytes": (
        lambda n, s: mutated("policy", targets.POLICY_TOKENS, n, s),
        targets.policy_yaml,
        7000,
    ),
    "policy-yaml/tree": (
        lambda n, s: tree_inputs("policy", POLICY_KEYS, n, s),
        targets.policy_doc_yaml,
        3000,
    ),
}


def test_campaigns_add_up_to_the_issue_figure() -> None:
    assert sum(c[2] for c in CAMPAIGNS.values()) >= 95_000


@pytest.mark.parametrize("suite", sorted(CAMPAIGNS))
def test_fuzz(suite: str) -> None:
    gen, target, count = CAMPAIGNS[suite]
    total = Figures()
    for i in range(SCALE):
        fig = run_inputs(gen(count, 1000 * i + 7), target, (InvalidInput,), CORPUS / "crashers")
        total.merge(fig)
    assert total.inputs == count * SCALE
    assert_clean(f"parsers/{suite}", total)


def test_corpus_itself() -> None:
    """Every corpus file (crashers found so far included) parses or is invalid input."""
    fig = Figures()
    for kind, target in (
        ("xml", targets.xml_target),
        ("snapshot", targets.snapshot_target),
        ("policy", targets.policy_yaml),
        ("policy", targets.policy_json),
    ):
        fig.merge(
            run_inputs(
                [p.read_bytes() for p in sorted((CORPUS / kind).iterdir()) if p.is_file()],
                target,
                (InvalidInput,),
            )
        )
    assert fig.inputs > 30
    assert_clean("parsers/corpus", fig)


# --- hypothesis: structured documents ---------------------------------------------------------

_HYP = settings(
    max_examples=1500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from(
        ["allow", "deny", "require", "refuse", "warn", "1.1", "0.2", "0x3", "fleet-2026"]
    ),
)
json_docs = st.recursive(
    scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(POLICY_KEYS), st.text(max_size=8)), kids, max_size=5
        ),
    ),
    max_leaves=20,
)

feature_keys = st.one_of(
    st.sampled_from(POLICY_KEYS),
    st.builds(
        lambda r, b: f"0x{r:016x}:{b}",
        st.integers(min_value=0, max_value=(1 << 64) - 1) | st.sampled_from([0x6030000000160002]),
        st.integers(min_value=-5, max_value=99),
    ),
    st.text(max_size=24),
)
policy_docs = st.fixed_dictionaries(
    {
        "apiVersion": st.just("hvcpolicy/v1"),
        "kind": st.just("FirmwarePolicy"),
        "metadata": st.fixed_dictionaries({"name": st.just("fuzz")}),
        "spec": st.fixed_dictionaries(
            {},
            optional={
                "features": st.dictionaries(
                    feature_keys,
                    st.sampled_from(["allow", "deny", "require"]) | scalars,
                    max_size=6,
                ),
                "unknown": st.sampled_from(["deny", "allow", "refuse"]) | scalars,
                "psci": st.fixed_dictionaries(
                    {}, optional={"version": st.text(max_size=8) | scalars}
                ),
                "workarounds": st.dictionaries(
                    st.sampled_from(POLICY_KEYS),
                    st.sampled_from(["any", "available", "not-required"]) | scalars,
                    max_size=3,
                ),
                "enforcement": st.dictionaries(
                    st.sampled_from(["unsupported-qemu", "already-running", "x"]),
                    st.sampled_from(["refuse", "warn"]) | scalars,
                    max_size=3,
                ),
            },
        ),
    }
)


def _run_hypothesis(suite: str, target: object, data: bytes, fig: Figures) -> None:
    fig.merge(run_inputs([data], target, (InvalidInput,)))  # type: ignore[arg-type]
    assert fig.tracebacks == 0 and fig.hangs == 0, fig.examples


HYP_FIGS: dict[str, Figures] = {}


@pytest.fixture
def hyp_fig(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    fig = HYP_FIGS.setdefault(request.node.name, Figures())
    yield fig
    assert_clean(f"hypothesis/{request.node.name.removeprefix('test_')}", fig)


@_HYP
@given(doc=policy_docs | json_docs)
def _policy_docs(doc: object, fig: Figures) -> None:
    data = json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")
    _run_hypothesis("policy", targets.policy_doc_json, data, fig)


def test_policy_documents(hyp_fig: Figures) -> None:
    _policy_docs(fig=hyp_fig)
    assert hyp_fig.inputs >= 1000


xml_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40
) | st.sampled_from(["ptp", "0x6030000000160002:1", "deny", "1.0", "/tmp/s", "0x1", "fleet-2026"])


@_HYP
@given(
    feats=st.lists(st.tuples(xml_text, xml_text), max_size=4),
    extra=st.lists(
        st.tuples(st.sampled_from(["unknown", "psci", "qmp", "resume", "bogus"]), xml_text),
        max_size=3,
    ),
    regs=st.lists(st.tuples(xml_text, xml_text), max_size=4),
    ref=xml_text,
)
def _domain_docs(
    feats: list[tuple[str, str]],
    extra: list[tuple[str, str]],
    regs: list[tuple[str, str]],
    ref: str,
    fig: Figures,
) -> None:
    from xml.sax.saxutils import quoteattr

    attr = {"unknown": "mode", "psci": "version", "qmp": "socket", "resume": "after", "bogus": "x"}
    body = "".join(f"<hvc:feature name={quoteattr(n)} mode={quoteattr(m)}/>" for n, m in feats)
    body += "".join(f"<hvc:{k} {attr[k]}={quoteattr(v)}/>" for k, v in extra)
    if regs:
        body += "<hvc:applied host='h' kernel='k' at='t'>"
        body += "".join(f"<hvc:register id={quoteattr(i)} value={quoteattr(v)}/>" for i, v in regs)
        body += "</hvc:applied>"
    xml = (
        f"<domain><name>d</name><metadata><hvc:policy xmlns:hvc='{XMLNS}' ref={quoteattr(ref)}>"
        f"{body}</hvc:policy></metadata></domain>"
    )
    _run_hypothesis("xml", targets.xml_target, xml.encode("utf-8", "surrogatepass"), fig)


def test_domain_documents(hyp_fig: Figures) -> None:
    _domain_docs(fig=hyp_fig)
    assert hyp_fig.inputs >= 1000


@_HYP
@given(
    regs=st.dictionaries(
        st.one_of(
            st.builds(lambda i: f"0x{i:016x}", st.integers(0x6030000000140000, 0x6030000000160010)),
            st.text(max_size=20),
        ),
        st.one_of(st.builds(lambda v: f"0x{v:x}", st.integers(0, (1 << 68))), scalars),
        max_size=8,
    ),
    qemu=st.none() | st.text(max_size=12) | st.sampled_from(["7.2.0", "11.1", "99999999999.1"]),
    kernel=st.text(min_size=1, max_size=20) | st.sampled_from(["6.1.0-18-arm64", "4.14", "99.99"]),
)
def _snapshot_docs(regs: dict[str, object], qemu: object, kernel: str, fig: Figures) -> None:
    doc = {
        "apiVersion": "hvcpolicy/v1",
        "kind": "HostSnapshot",
        "host": "h",
        "kernel": kernel,
        "source": "kvm",
        "registers": regs,
    }
    if qemu is not None:
        doc["qemu"] = qemu
    data = json.dumps(doc).encode("utf-8", "surrogatepass")
    _run_hypothesis("snapshot", targets.snapshot_target, data, fig)


def test_snapshot_documents(hyp_fig: Figures) -> None:
    _snapshot_docs(fig=hyp_fig)
    assert hyp_fig.inputs >= 1000


def test_time_limit_catches_a_hang() -> None:
    """The hang detector itself: an input that spins is counted, not waited for."""
    import time

    def spin(_: bytes) -> None:
        with time_limit(0.2):
            while True:
                time.sleep(0.01)

    fig = run_inputs([b"x"], spin, (InvalidInput,))
    assert fig.hangs == 1 and fig.inputs == 1
