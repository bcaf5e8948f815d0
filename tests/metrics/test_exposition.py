"""The pure exposition (hvcpolicy.metrics): the text format's rules, without a daemon."""

from __future__ import annotations

import re

import pytest

from hvcpolicy.domainxml import Applied, parse_domain, render_policy
from hvcpolicy.errors import InvalidInput
from hvcpolicy.libvirt_status import DRIFT, INVALID, MATCH, NOT_RUNNING, UNREACHABLE, Row
from hvcpolicy.metrics import (
    STATES,
    Family,
    HostFacts,
    PolicyFact,
    escape_label,
    exposition,
    parse_time,
)

NS = "https://hvcpolicy.dev/xmlns/libvirt/1"
HOST = HostFacts(
    host="node-17",
    kernel="6.18.0-1-arm64",
    now=1_800_000_100.0,
    qemu="10.0.2",
    snapshot_path="/var/lib/hvcpolicy/host.json",
    snapshot_state="ok",
    snapshot_kernel="6.18.0-1-arm64",
    snapshot_taken=1_800_000_000.0,
)
SAMPLE = re.compile(r'^([a-z_]+)(\{(?:[a-z_]+="(?:[^"\\\n]|\\[\\"n])*",?)*\})? (\S+)$')


def rows() -> list[Row]:
    applied = Applied("node-17", "6.18.0", "2026-11-24T23:00:00Z", {1: 2}, backend="stream")
    return [
        Row("web1", "u1", 3, "running", "fleet", "domain", applied, MATCH, "libvirt"),
        Row("web2", "u2", 4, "running", "fleet", "domain",
            Applied("h", "k", "", {}), DRIFT, "hvc:qmp"),
        Row("off", "u3", None, "shut off", "default", "default"),
        Row("bad", "u4", None, "shut off", live=INVALID, detail="no such policy"),
        Row("lost", "u5", 5, "running", "fleet", "domain", None, UNREACHABLE),
    ]  # fmt: skip


def text() -> str:
    decisions = {("prepare", "refused"): 3, ("started/prelaunch", "applied"): 7}
    policies = [PolicyFact("fleet", "fleet.yaml", True), PolicyFact("broken", "broken.json", False)]
    return exposition(rows(), HOST, policies, decisions)


def samples(out: str) -> dict[str, str]:
    """series (name{labels}) -> value, every line checked against the format's grammar."""
    found = {}
    for line in out.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) hvcpolicy_[a-z_]+ \S", line), line
            continue
        m = SAMPLE.match(line)
        assert m, line
        found[line.rsplit(" ", 1)[0]] = m.group(3)
    return found


def test_help_and_type_once_per_family_before_its_contiguous_samples() -> None:
    out = text()
    assert out.endswith("\n") and not out.endswith("\n\n")
    seen: list[str] = []
    current = None
    for line in out.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in seen, f"{name}: HELP twice"
            seen.append(name)
            current = name
        elif line.startswith("# TYPE "):
            assert line.split()[2] == current
        else:
            assert re.split(r"[{ ]", line, maxsplit=1)[0] == current, line
    assert "hvcpolicy_decisions_total" in seen and "hvcpolicy_domain_state" in seen
    samples(out)


def test_names_follow_the_conventions() -> None:
    out = text()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", out, re.M))
    for name, kind in types.items():
        assert name.startswith("hvcpolicy_")
        assert (kind == "counter") == name.endswith("_total"), name
        assert kind in ("counter", "gauge")
    assert types["hvcpolicy_host_info"] == "gauge"
    assert 'hvcpolicy_host_info{host="node-17",kernel="6.18.0-1-arm64",' in out
    assert "hvcpolicy_host_snapshot_age_seconds 100.0" in out
    assert "hvcpolicy_host_snapshot_timestamp_seconds 1800000000.0" in out
    assert "hvcpolicy_host_snapshot_current 1" in out
    stale = exposition([], HOST.replace(kernel="6.19.0-1-arm64"), [], {})
    assert "hvcpolicy_host_snapshot_current 0" in stale
    # a counter without its _total, or a gauge with one, is refused at once
    with pytest.raises(ValueError):
        Family("hvcpolicy_refusals", "counter", "x")
    with pytest.raises(ValueError):
        Family("hvcpolicy_things_total", "gauge", "x")
    with pytest.raises(ValueError):
        Family("other_up", "gauge", "x")


def test_one_series_per_domain_with_its_state_policy_record_and_backend() -> None:
    found = samples(text())
    states = {k: v for k, v in found.items() if k.startswith("hvcpolicy_domain_state{")}
    assert len(states) == 5 and set(states.values()) == {"1"}
    assert (
        'hvcpolicy_domain_state{domain="web1",uuid="u1",state="match",policy="fleet",'
        'policy_source="domain",applied="true",backend="stream"}'
    ) in states
    assert 'domain="web2",uuid="u2",state="drift"' in " ".join(states)
    assert 'applied="true",backend="unknown"}' in " ".join(states)  # a record without backend=
    assert (
        'state="not-running",policy="default",policy_source="default",applied="false",'
        'backend="none"' in " ".join(states)
    )
    assert 'domain="bad",uuid="u4",state="invalid"' in " ".join(states)
    assert 'state="unreachable"' in " ".join(states)
    # the per-state counts: every state, zero included (an alert's series always exists)
    for state in STATES:
        assert f'hvcpolicy_domains{{state="{state}"}}' in found
    assert found['hvcpolicy_domains{state="drift"}'] == "1"
    assert found['hvcpolicy_domains{state="no-interface"}'] == "0"
    at = found['hvcpolicy_domain_applied_timestamp_seconds{domain="web1",uuid="u1"}']
    assert float(at) == parse_time("2026-11-24T23:00:00Z")
    assert not any("web2" in k for k in found if "applied_timestamp" in k)  # at="" : none


def test_counters_and_policies() -> None:
    found = samples(text())
    assert found['hvcpolicy_decisions_total{stage="prepare",outcome="refused"}'] == "3"
    assert found['hvcpolicy_decisions_total{stage="started/prelaunch",outcome="applied"}'] == "7"
    assert found["hvcpolicy_policies"] == "2"
    assert found['hvcpolicy_policy_valid{policy="broken",file="broken.json"}'] == "0"
    assert found["hvcpolicy_libvirt_up"] == "1"


def test_label_values_are_escaped() -> None:
    assert escape_label('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    assert escape_label("bad\udcffname") == "bad?name"  # never an undefined escape
    name = 'we"ird\\na\nme'
    out = exposition([Row(name, "u", None, "shut off")], HOST, [], {})
    line = next(x for x in out.splitlines() if x.startswith("hvcpolicy_domain_state{"))
    assert 'domain="we\\"ird\\\\na\\nme"' in line
    assert not any(x.startswith("me") for x in out.splitlines())  # the newline did not split it
    samples(out)


def test_help_text_is_escaped() -> None:
    fam = Family("hvcpolicy_x", "gauge", "back\\slash\nnew line")
    fam.add(1)
    assert fam.lines()[0] == "# HELP hvcpolicy_x back\\\\slash\\nnew line"


def test_a_repeated_label_set_is_written_once() -> None:
    rows = [Row("same", "u", None, "shut off"), Row("same", "u", None, "shut off")]
    out = exposition(rows, HOST, [], {})
    assert len([x for x in out.splitlines() if x.startswith("hvcpolicy_domain_state{")]) == 1


def test_unreachable_libvirt_is_a_metric_not_a_missing_file() -> None:
    out = exposition(None, HostFacts("h", "k", 0.0), [], {})
    found = samples(out)
    assert found["hvcpolicy_libvirt_up"] == "0"
    assert not any(k.startswith(("hvcpolicy_domain", "hvcpolicy_domains")) for k in found)
    assert found['hvcpolicy_host_snapshot_state{state="missing",path=""}'] == "1"
    assert "hvcpolicy_host_snapshot_age_seconds" not in out  # unknown, not 0


def test_not_running_and_unknown_live_values_map_to_states() -> None:
    out = exposition([Row("a", "u", None, "shut off", live=NOT_RUNNING)], HOST, [], {})
    assert 'state="not-running"' in out


# --- <hvc:applied backend> -----------------------------------------------------------------

DOMAIN = f"""<domain><name>g</name><metadata><hvc:policy xmlns:hvc="{NS}" ref="fleet">
<hvc:applied host="h" kernel="k" at="2026-11-24T23:00:00Z"{{attr}}>
<hvc:register id="0x6030000000160002" value="0x1"/></hvc:applied></hvc:policy></metadata>
</domain>"""


@pytest.mark.parametrize("backend", ["qmp", "stream"])
def test_applied_backend_is_parsed_and_rendered(backend: str) -> None:
    dom = parse_domain(DOMAIN.format(attr=f' backend="{backend}"'))
    assert dom.meta is not None and dom.meta.applied is not None
    assert dom.meta.applied.backend == backend
    again = parse_domain(f"<domain><metadata>{render_policy(dom.meta)}</metadata></domain>")
    assert again.meta == dom.meta


def test_applied_without_backend_is_unknown() -> None:
    dom = parse_domain(DOMAIN.format(attr=""))
    assert dom.meta is not None and dom.meta.applied is not None
    assert dom.meta.applied.backend is None
    assert "backend=" not in render_policy(dom.meta)


def test_applied_backend_outside_the_vocabulary_is_invalid() -> None:
    with pytest.raises(InvalidInput, match=r"<hvc:applied backend>: 'kvm' is not qmp or stream"):
        parse_domain(DOMAIN.format(attr=' backend="kvm"'), "domain g")
