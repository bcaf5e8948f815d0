"""The metrics as documented: README's step 7 and docs/OPERATING.md name only metrics hvcpolicy
exports, the alert rules parse, and --format prometheus is in the completion and the man page."""

from __future__ import annotations

import re

import yaml

from hvcpolicy.domainxml import Applied
from hvcpolicy.libvirt_status import Row
from hvcpolicy.metrics import HostFacts, PolicyFact, families
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
OPERATING = (REPO / "docs" / "OPERATING.md").read_text()


def _step7() -> str:
    start = README.index("### 7. Monitor: hvcpolicy in Prometheus")
    return README[start : README.index("\n## ", start)]


def _exported() -> set[str]:
    host = HostFacts("h", "k", 10.0, "7.2.0", "/x", "ok", "k", 1.0)
    row = Row("d", "u", 1, "running", "p", "domain", Applied("h", "k", "2026-01-01T00:00:00Z", {}))
    fams = families([row], host, [PolicyFact("p", "p.yaml", True)], {("prepare", "refused"): 1})
    assert all(f.samples for f in fams)  # every family shows with every fact known
    return {f.name for f in fams}


def test_the_readme_names_only_exported_metrics_and_all_of_them() -> None:
    section = _step7()
    named = set(re.findall(r"\b(hvcpolicy_[a-z_]+)", section))
    named = {n for n in named if not n.endswith("_")}  # "..._age_seconds" style shorthand
    exported = _exported()
    assert named - exported == set()
    assert exported - named <= {"hvcpolicy_host_snapshot_age_seconds"}  # written "..._age_seconds"
    assert "curl -s localhost:9100/metrics | grep hvcpolicy" in section


def test_the_alert_rules_parse_and_alert_on_drift_for_10_minutes_and_on_refusals() -> None:
    block = re.search(r"```yaml\n(groups:.*?)```", _step7(), re.S)
    assert block
    rules = {r["alert"]: r for r in yaml.safe_load(block.group(1))["groups"][0]["rules"]}
    drift = rules["HvcpolicyGuestDrift"]
    assert drift["expr"] == 'hvcpolicy_domain_state{state="drift"} == 1'
    assert drift["for"] == "10m"
    assert (
        'hvcpolicy_decisions_total{outcome="refused"}' in rules["HvcpolicyRefusalsRising"]["expr"]
    )
    exported = _exported()
    for rule in rules.values():
        for name in re.findall(r"\b(hvcpolicy_[a-z_]+)", rule["expr"]):
            assert name in exported, name


def test_prometheus_format_is_in_completion_and_man_page() -> None:
    bash = (REPO / "packaging" / "completion" / "hvcpolicy.bash").read_text()
    assert "_shtab_hvcpolicy_status___format_choices=(text json prometheus)" in bash
    assert "_shtab_hvcpolicy_diff___format_choices=(text json)" in bash  # status only
    zsh = (REPO / "packaging" / "completion" / "_hvcpolicy").read_text()
    assert "prometheus" in zsh
    man = (REPO / "packaging" / "man" / "hvcpolicy.1").read_text()
    status = man[man.index("hvcpolicy status") :]
    assert "prometheus" in status and "\\-\\-output" in status


def test_operating_documents_the_timer_and_both_layouts() -> None:
    assert "hvcpolicy-metrics.timer" in OPERATING
    assert "/var/lib/prometheus/node-exporter/" in OPERATING
    assert "/var/lib/node_exporter/textfile_collector/" in OPERATING
    service = (REPO / "packaging" / "hvcpolicy-metrics.service").read_text()
    assert (
        "--format prometheus --output /var/lib/prometheus/node-exporter/hvcpolicy.prom" in service
    )
