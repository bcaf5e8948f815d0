"""hvcpolicy in Prometheus: the text exposition format (version 0.0.4) of a host's facts.

Pure: ``status``'s rows, the host's facts, the policies and the decision counters in, the text
out. No I/O (``hvcpolicy.exporter`` gathers the facts and writes the node_exporter textfile).

Conventions (https://prometheus.io/docs/practices/naming/): every name starts ``hvcpolicy_``,
counters end ``_total``, constant metadata is an ``_info`` gauge of value 1, times are
``_seconds`` (Unix time for ``_timestamp_seconds``). Each family's HELP and TYPE come once, before
its samples, and its samples are contiguous; label values are escaped as the format requires
(``\\``, ``"``, newline) and a label set appears at most once per family (node_exporter refuses a
file that repeats one). No sample carries a timestamp: the textfile collector refuses those.
"""

from __future__ import annotations

import math

from hvcpolicy.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from hvcpolicy.libvirt_status import Row

PREFIX = "hvcpolicy_"
# The compliance of a domain (label ``state``), from status's Live column.
STATES = (
    "match",
    "drift",
    "no-interface",
    "unreachable",
    "unmanaged",
    "invalid",
    "not-running",
)
_STATE_OF_LIVE = {
    "match": "match",
    "DRIFT": "drift",
    "no-interface": "no-interface",
    "unreachable": "unreachable",
    "unmanaged": "unmanaged",
    "invalid": "invalid",
    "-": "not-running",
}


def escape_label(value: str) -> str:
    """A label value as the format writes it between double quotes. Text that is not valid
    UTF-8 (a surrogate escape from a hostile name) becomes "?": a parser must never meet an
    escape the format does not define."""
    text = value.encode("utf-8", "replace").decode("utf-8", "replace")
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text: backslash and newline escaped (quotes are literal there)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class Family:
    """One metric family: its HELP, TYPE and samples, in the order added."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        if not name.startswith(PREFIX):
            raise ValueError(f"metric {name!r} lacks the {PREFIX} prefix")
        if kind not in ("counter", "gauge"):
            raise ValueError(f"metric {name!r}: type {kind!r}")
        if (kind == "counter") != name.endswith("_total"):
            raise ValueError(f"metric {name!r}: only counters, and every counter, end in _total")
        self.name = name
        self.kind = kind
        self.help = help_text
        self.samples: list[tuple[tuple[tuple[str, str], ...], float]] = []
        self._seen: set[tuple[tuple[str, str], ...]] = set()

    def add(self, value: float, **labels: str) -> None:
        key = tuple(labels.items())
        if key in self._seen:  # a repeated label set would make node_exporter drop the file
            return
        self._seen.add(key)
        self.samples.append((key, value))

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for labels, value in self.samples:
            text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels)
            series = f"{self.name}{{{text}}}" if text else self.name
            out.append(f"{series} {format_value(value)}")
        return out


def render(families: Iterable[Family]) -> str:
    """The exposition: every family that has samples, HELP and TYPE once each, a newline after
    the last line."""
    lines: list[str] = []
    names: set[str] = set()
    for family in families:
        if family.name in names:
            raise ValueError(f"metric family {family.name!r} twice")
        names.add(family.name)
        if family.samples:
            lines.extend(family.lines())
    return "\n".join(lines) + "\n"


# --- what hvcpolicy exports --------------------------------------------------------------------


class HostFacts(Record):
    """What the exporter found on this host (None: not known)."""

    __slots__ = (
        "host",
        "kernel",
        "now",
        "qemu",
        "snapshot_kernel",
        "snapshot_path",
        "snapshot_state",
        "snapshot_taken",
    )

    def __init__(
        self,
        host: str,
        kernel: str,
        now: float,
        qemu: str | None = None,
        snapshot_path: str = "",
        snapshot_state: str = "missing",  # ok | missing | invalid
        snapshot_kernel: str | None = None,
        snapshot_taken: float | None = None,  # Unix time; None when the snapshot has no "taken"
    ) -> None:
        self.host = host
        self.kernel = kernel
        self.now = now
        self.qemu = qemu
        self.snapshot_path = snapshot_path
        self.snapshot_state = snapshot_state
        self.snapshot_kernel = snapshot_kernel
        self.snapshot_taken = snapshot_taken


class PolicyFact(Record):
    """One file of the policy directory: does it load (schema and meaning)?"""

    __slots__ = ("file", "name", "valid")

    def __init__(self, name: str, file: str, valid: bool) -> None:
        self.name = name
        self.file = file
        self.valid = valid


def parse_time(text: str | None) -> float | None:
    """``2026-11-24T23:00:00Z`` (what hvcpolicy writes) as Unix time; None for anything else."""
    import calendar
    import time

    if not text:
        return None
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def state_of(row: Row) -> str:
    return _STATE_OF_LIVE.get(row.live, "invalid")


def families(
    rows: Sequence[Row] | None,
    host: HostFacts,
    policies: Sequence[PolicyFact],
    decisions: Mapping[tuple[str, str], int],
) -> list[Family]:
    """Every family hvcpolicy exports. ``rows`` None: libvirt could not be reached."""
    up = Family("hvcpolicy_libvirt_up", "gauge", "Whether libvirt answered (1) or not (0).")
    up.add(0 if rows is None else 1)

    state = Family(
        "hvcpolicy_domain_state",
        "gauge",
        "One series per libvirt domain, value 1: its compliance in label state (match, drift, "
        "no-interface, unreachable, unmanaged, invalid, not-running), its policy, whether it "
        "carries <hvc:applied>, and which backend enforced it (qmp, stream, unknown; none "
        "without a record).",
    )
    applied_at = Family(
        "hvcpolicy_domain_applied_timestamp_seconds",
        "gauge",
        "When hvcpolicy last enforced the domain's policy (its <hvc:applied at>), Unix time.",
    )
    count = Family(
        "hvcpolicy_domains",
        "gauge",
        "Libvirt domains on this host by compliance state.",
    )
    by_state = dict.fromkeys(STATES, 0)
    for row in rows or ():
        st = state_of(row)
        by_state[st] += 1
        a = row.applied
        backend = "none" if a is None else (a.backend or "unknown")
        state.add(
            1,
            domain=row.name,
            uuid=row.uuid,
            state=st,
            policy=row.policy or "",
            policy_source=row.policy_source,
            applied="true" if a is not None else "false",
            backend=backend,
        )
        at = parse_time(a.at) if a is not None else None
        if at is not None:
            applied_at.add(at, domain=row.name, uuid=row.uuid)
    if rows is not None:  # unknown, not zero, when libvirt did not answer
        for st, n in by_state.items():
            count.add(n, state=st)

    info = Family(
        "hvcpolicy_host_info",
        "gauge",
        "This host: its name, running kernel, the kernel its snapshot was taken on, and the "
        "installed QEMU; value 1.",
    )
    info.add(
        1,
        host=host.host,
        kernel=host.kernel,
        snapshot_kernel=host.snapshot_kernel or "",
        qemu=host.qemu or "",
    )
    snap_ok = Family(
        "hvcpolicy_host_snapshot_state",
        "gauge",
        "The host snapshot the hook checks against: 1 for its state (ok, missing, invalid).",
    )
    for st in ("ok", "missing", "invalid"):
        snap_ok.add(1 if host.snapshot_state == st else 0, state=st, path=host.snapshot_path)
    snap_time = Family(
        "hvcpolicy_host_snapshot_timestamp_seconds",
        "gauge",
        "When the host snapshot was taken, Unix time.",
    )
    snap_age = Family(
        "hvcpolicy_host_snapshot_age_seconds",
        "gauge",
        "How old the host snapshot was when this file was written, in seconds.",
    )
    if host.snapshot_taken is not None:
        snap_time.add(host.snapshot_taken)
        snap_age.add(max(0.0, host.now - host.snapshot_taken))
    current = Family(
        "hvcpolicy_host_snapshot_current",
        "gauge",
        "1 when the host snapshot was taken on the running kernel; 0 when on another kernel "
        "(stale: run `hvcpolicy host probe`).",
    )
    if host.snapshot_state == "ok" and host.snapshot_kernel is not None:
        current.add(1 if host.snapshot_kernel == host.kernel else 0)

    npol = Family("hvcpolicy_policies", "gauge", "Policy files in the policy directory.")
    npol.add(len(policies))
    valid = Family(
        "hvcpolicy_policy_valid",
        "gauge",
        "Whether each policy file validates (schema and meaning): 1, or 0.",
    )
    for p in policies:
        valid.add(1 if p.valid else 0, policy=p.name, file=p.file)

    total = Family(
        "hvcpolicy_decisions_total",
        "counter",
        "Decisions of the libvirt hook and hvcpolicy start (one per audit line), by stage and "
        "outcome; outcome refused counts refused starts, migrations and restores.",
    )
    for (stage, outcome), n in sorted(decisions.items()):
        total.add(n, stage=stage, outcome=outcome)
    return [
        up, state, count, applied_at, info, snap_ok, snap_time, snap_age, current, npol, valid,
        total,
    ]  # fmt: skip


def exposition(
    rows: Sequence[Row] | None,
    host: HostFacts,
    policies: Sequence[PolicyFact],
    decisions: Mapping[tuple[str, str], int],
) -> str:
    """The text node_exporter's textfile collector (or a scrape) reads."""
    return render(families(rows, host, policies, decisions))
