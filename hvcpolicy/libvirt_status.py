"""What ``hvcpolicy status`` needs beyond ``hvcpolicy.libvirt``: every domain, and each running
domain's firmware registers, read with hvcpolicy's one QMP client (:mod:`hvcpolicy.qmp`) over the
domain's own QMP socket (``<hvc:qmp>``, or the ``-qmp`` of its ``<qemu:commandline>``) and held
to the one compliance rule (:func:`hvcpolicy.enforce.inspect`). A running domain without such a
socket has no interface hvcpolicy can read (``no-interface``).

Allowed in a command run by an operator, never in the hook (it would deadlock on the domain
lock). Same conventions as ``hvcpolicy.libvirt``: libvirt's own printing silenced, its errors
mapped to :class:`~hvcpolicy.errors.Unavailable`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hvcpolicy import catalogue as cat
from hvcpolicy import libvirt as lv
from hvcpolicy.domainxml import Applied
from hvcpolicy.errors import HvcError, InterfaceMissing, InvalidInput, Unavailable

# What the Live column says.
MATCH = "match"
DRIFT = "DRIFT"
NOT_RUNNING = "-"
UNMANAGED = "unmanaged"
NO_INTERFACE = "no-interface"
UNREACHABLE = "unreachable"
INVALID = "invalid"
VIA = "hvc:qmp"  # how the registers were read: the domain's own QMP socket


def list_domains(conn: Any) -> list[Any]:
    """Every domain, running first by id (as ``virsh list --all``), then the rest by name."""
    doms = list(lv.call("list domains", conn.listAllDomains, 0))

    def order(dom: Any) -> tuple[int, int, str]:
        # ID() and name() are known locally (no call to libvirtd): -1 for an inactive domain
        ident = int(dom.ID())
        return (0, ident, "") if ident >= 0 else (1, 0, str(dom.name()))

    return sorted(doms, key=order)


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
    via: str | None = None  # VIA once read
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
    sock = domain.qmp_socket
    if not sock:
        row.live = NO_INTERFACE
        row.detail = f"{where} has no QMP socket for hvcpolicy (<hvc:qmp>): nothing reads it"
        return row
    from hvcpolicy.enforce import inspect
    from hvcpolicy.qmp import QMP

    try:
        with QMP(sock, timeout) as qmp:
            result = inspect(
                qmp, subject.policy, applied=row.applied.registers if row.applied else None
            )
    except InterfaceMissing as err:
        row.live, row.detail = NO_INTERFACE, err.message
        return row
    except HvcError as err:
        row.live, row.detail = UNREACHABLE, err.message
        return row
    row.registers, row.via = result.applied_registers(), VIA
    row.differences = result.mismatches
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
