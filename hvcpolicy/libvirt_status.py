"""What ``hvcpolicy status`` needs from libvirt beyond ``hvcpolicy.libvirt``: every domain, and
each running domain's firmware registers read through libvirt's QMP pass-through
(``libvirt_qemu.qemuMonitorCommand``; libvirt marks the domain tainted ``custom-monitor``).

Allowed in a command run by an operator, never in the hook (it would deadlock on the domain
lock). Same conventions as ``hvcpolicy.libvirt``: libvirt's own printing silenced, its errors
mapped to :class:`~hvcpolicy.errors.Unavailable`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hvcpolicy import catalogue as cat
from hvcpolicy import libvirt as lv
from hvcpolicy.domainxml import Applied
from hvcpolicy.errors import HvcError, InterfaceMissing, InvalidInput, QMPError, Unavailable
from hvcpolicy.policy import Policy

PROP = "kvm-firmware-registers"

# What the Live column says.
MATCH = "match"
DRIFT = "DRIFT"
NOT_RUNNING = "-"
UNMANAGED = "unmanaged"
NO_INTERFACE = "no-interface"
UNREACHABLE = "unreachable"
INVALID = "invalid"


def list_domains(conn: Any) -> list[Any]:
    """Every domain, running first by id (as ``virsh list --all``), then the rest by name."""
    doms = list(lv.call("list domains", conn.listAllDomains, 0))

    def order(dom: Any) -> tuple[int, int, str]:
        # ID() and name() are known locally (no call to libvirtd): -1 for an inactive domain
        ident = int(dom.ID())
        return (0, ident, "") if ident >= 0 else (1, 0, str(dom.name()))

    return sorted(doms, key=order)


def monitor(dom: Any, name: str, arguments: Mapping[str, Any] | None = None) -> Any:
    """One QMP command through libvirt's own monitor connection; its ``return``."""
    lib = lv._lib()
    try:
        import libvirt_qemu
    except ImportError:
        raise Unavailable("libvirt-python lacks libvirt_qemu (QMP pass-through)") from None
    msg: dict[str, Any] = {"execute": name}
    if arguments is not None:
        msg["arguments"] = dict(arguments)
    try:
        text = libvirt_qemu.qemuMonitorCommand(dom, json.dumps(msg), 0)
    except lib.libvirtError as err:
        raise Unavailable(f"libvirt qemu-monitor-command {name}: {lv._message(err)}") from None
    try:
        reply = json.loads(text)
    except ValueError:
        raise Unavailable(f"libvirt qemu-monitor-command {name}: not JSON") from None
    if not isinstance(reply, dict):
        raise Unavailable(f"libvirt qemu-monitor-command {name}: not a JSON object")
    if "error" in reply:
        error = reply["error"] if isinstance(reply["error"], dict) else {}
        raise QMPError(
            f"QMP {name}: {error.get('class', '?')}: {error.get('desc', '')}",
            sent=msg,
            received=reply,
            error_class=str(error.get("class", "")),
        )
    return reply.get("return")


def _registers(doc: object, path: str) -> dict[int, int]:
    if not isinstance(doc, dict):
        raise Unavailable(f"QMP qom-get {path} {PROP}: not an object")
    try:
        return {int(k, 0): int(v) for k, v in doc.items()}
    except (TypeError, ValueError):
        raise Unavailable(f"QMP qom-get {path} {PROP}: ids and values malformed") from None


def read_registers(dom: Any) -> dict[int, int]:
    """The VM's firmware registers over libvirt's pass-through, checked equal on every vCPU."""
    cpus = monitor(dom, "query-cpus-fast")
    paths = [str(c["qom-path"]) for c in cpus or [] if isinstance(c, dict) and "qom-path" in c]
    if not paths:
        raise Unavailable("QMP query-cpus-fast: no vCPUs")
    props = monitor(dom, "qom-list", {"path": paths[0]})
    if not any(isinstance(p, dict) and p.get("name") == PROP for p in props or []):
        raise InterfaceMissing(f"QEMU has no {PROP} property on its vCPUs")
    first = _registers(monitor(dom, "qom-get", {"path": paths[0], "property": PROP}), paths[0])
    for path in paths[1:]:
        other = _registers(monitor(dom, "qom-get", {"path": path, "property": PROP}), path)
        if other != first:
            raise Unavailable(f"vCPU {path} reads other firmware registers than {paths[0]}")
    return first


def read_registers_qmp(socket: str, timeout: float) -> dict[int, int]:
    """The same over the domain's own ``<hvc:qmp>`` socket (every wait bounded)."""
    from hvcpolicy.hook.hookqmp import HookQMP  # flow: status reads through qmp.py

    with HookQMP(socket, timeout) as qmp:
        return dict(qmp.read_every_vcpu())


def differences(
    live: Mapping[int, int], applied: Mapping[int, int] | None, policy: Policy | None
) -> list[str]:
    """Why the live registers do not match the record (or, without one, the policy)."""
    from hvcpolicy.planner import plan_start, verify

    if applied is not None:
        out = verify(applied, live)
        for rid in sorted(live.keys() - applied.keys()):
            if cat.is_bitmap(rid) and live[rid] != 0:
                out.append(
                    f"{cat.reg_name(rid)}: reads {cat.fmt_value(live[rid])}, not in "
                    "<hvc:applied> (services the guest was never given)"
                )
        return out
    if policy is None:
        return []
    plan = plan_start(policy, live)
    out = [
        f"{cat.reg_name(rid)}: reads {cat.fmt_value(live.get(rid, 0))}, policy "
        f"{policy.name!r} wants {cat.fmt_value(value)}"
        for rid, value in plan.writes.items()
    ]
    out.extend(f"policy {policy.name!r} refuses: {r}" for r in plan.refusals)
    return out


@dataclass
class Row:
    name: str
    uuid: str
    id: int | None
    state: str
    policy: str | None = None
    policy_source: str = "none"  # domain | default | none
    applied: Applied | None = None
    live: str = NOT_RUNNING
    via: str | None = None  # libvirt | hvc:qmp
    detail: str = ""
    differences: list[str] = field(default_factory=list)
    registers: dict[int, int] | None = None

    @property
    def id_text(self) -> str:
        return "-" if self.id is None else str(self.id)

    @property
    def policy_text(self) -> str:
        if self.policy is None:
            return "-"
        return self.policy + ("*" if self.policy_source == "default" else "")

    def to_json(self) -> dict[str, Any]:
        a = self.applied
        return {
            "name": self.name,
            "uuid": self.uuid,
            "id": self.id,
            "state": self.state,
            "policy": self.policy,
            "policy_source": self.policy_source,
            "applied": None
            if a is None
            else {
                "host": a.host,
                "kernel": a.kernel,
                "at": a.at,
                "backend": a.backend,
                "registers": {
                    cat.fmt_id(r): cat.fmt_value(v) for r, v in sorted(a.registers.items())
                },
            },
            "live": self.live,
            "via": self.via,
            "detail": self.detail,
            "differences": self.differences,
            "registers": None
            if self.registers is None
            else {cat.fmt_id(r): cat.fmt_value(v) for r, v in sorted(self.registers.items())},
        }


def domain_row(dom: Any, policy_dir: str | None, timeout: float) -> Row:
    from hvcpolicy.cli.common import subject_from_domain
    from hvcpolicy.domainxml import parse_domain

    name = str(lv.call("domain name", dom.name))
    active = lv.is_active(dom)
    ident = int(lv.call("domain id", dom.ID))
    row = Row(
        name=name,
        uuid=str(lv.call("domain uuid", dom.UUIDString)),
        id=ident if ident >= 0 else None,
        state=lv.state(dom).replace("shutoff", "shut off"),
    )
    where = f"domain {name}"
    try:
        domain = parse_domain(lv.domain_xml(dom), where)
        row.applied = domain.meta.applied if domain.meta is not None else None
        subject = subject_from_domain(domain, where, policy_dir)
    except InvalidInput as err:
        row.live, row.detail = INVALID, err.message
        return row
    if subject.policy is not None:
        row.policy = subject.policy.name if domain.meta is None else domain.meta.ref
        row.policy_source = "default" if domain.meta is None else "domain"
    if not active:
        return row
    if subject.policy is None and row.applied is None:
        row.live = UNMANAGED
        return row
    try:
        try:
            row.registers, row.via = read_registers(dom), "libvirt"
        except InterfaceMissing as missing:
            sock = domain.meta.qmp_socket if domain.meta is not None else None
            if sock is None:
                raise missing
            row.registers, row.via = read_registers_qmp(sock, timeout), "hvc:qmp"
    except InterfaceMissing as err:
        row.live, row.detail = NO_INTERFACE, err.message
        return row
    except HvcError as err:
        row.live, row.detail = UNREACHABLE, err.message
        return row
    row.differences = differences(
        row.registers, row.applied.registers if row.applied else None, subject.policy
    )
    if row.differences:
        row.live, row.detail = DRIFT, row.differences[0]
    else:
        row.live = MATCH
        row.detail = "as recorded" if row.applied is not None else "as the policy plans"
    return row


def _exists(conn: Any, dom: Any) -> bool:
    """Is the domain still defined? (``dom.UUID()`` is known locally, no call to libvirtd.)"""
    lib = lv._lib()
    try:
        conn.lookupByUUID(dom.UUID())
        return True
    except lib.libvirtError:
        return False


def collect(uri: str | None, policy_dir: str | None, timeout: float) -> list[Row]:
    """A row per domain. A transient domain that goes away while it is listed is left out, as
    ``virsh list`` would have; any other libvirt failure is Unavailable (exit 5)."""
    conn = lv.connect(uri)
    try:
        rows = []
        for dom in list_domains(conn):
            try:
                rows.append(domain_row(dom, policy_dir, timeout))
            except Unavailable:
                if _exists(conn, dom):
                    raise
        return rows
    finally:
        conn.close()
