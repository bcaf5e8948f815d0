"""The libvirt domain XML: hvcpolicy's ``<hvc:policy>`` metadata and the hook's QMP socket.

Parsed with expat directly, streaming, because the hook reads this from libvirt on every stage
and it may be hostile: DTDs and entity declarations are refused outright (no expansion, no
external fetch), depth and sizes are bounded, and an hvcpolicy element we do not understand is an
error rather than something silently skipped.
"""

from __future__ import annotations

from xml.parsers import expat

from hvcpolicy import XMLNS
from hvcpolicy import catalogue as cat
from hvcpolicy.errors import InvalidInput, bounded
from hvcpolicy.lean import match_qmp_unix
from hvcpolicy.policy import Mode, Unknown, is_policy_name, key_text, parse_feature
from hvcpolicy.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from xml.etree.ElementTree import Element

    from hvcpolicy.policy import FeatureKey
    from hvcpolicy.snapshot import Snapshot

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
_OUR_NS_PREFIX = "https://hvcpolicy.dev/"
MAX_XML = 8 << 20
MAX_DEPTH = 64
MAX_ATTR = 4096


# <hvc:applied backend=...>: which enforcement backend wrote the registers (SPEC section 8)
APPLIED_BACKENDS = ("qmp", "stream")


class Applied(Record):
    """``<hvc:applied>``: every firmware register of the guest as hvcpolicy left it, and which
    backend enforced it (None: a record written before the attribute existed)."""

    __slots__ = ("at", "backend", "host", "kernel", "registers")

    def __init__(
        self,
        host: str,
        kernel: str,
        at: str,
        registers: dict[int, int],
        backend: str | None = None,
    ) -> None:
        self.host = host
        self.kernel = kernel
        self.at = at
        self.registers = registers
        self.backend = backend


class DomainPolicy(Record):
    """``<hvc:policy>``: which operator policy, how the domain narrows it, and runtime hints."""

    __slots__ = (
        "applied",
        "features",
        "psci",
        "qmp_socket",
        "ref",
        "resume_after_apply",
        "unknown",
    )

    def __init__(
        self,
        ref: str,
        features: dict[FeatureKey, Mode] | None = None,
        unknown: Unknown | None = None,
        psci: int | None = None,
        qmp_socket: str | None = None,
        resume_after_apply: bool = False,
        applied: Applied | None = None,
    ) -> None:
        self.ref = ref
        self.features: dict[FeatureKey, Mode] = features if features is not None else {}
        self.unknown = unknown
        self.psci = psci
        self.qmp_socket = qmp_socket
        self.resume_after_apply = resume_after_apply
        self.applied = applied


class Domain(Record):
    __slots__ = ("commandline_qmp", "meta", "name", "uuid")

    def __init__(
        self,
        name: str,
        uuid: str,
        meta: DomainPolicy | None,
        commandline_qmp: str | None = None,  # a unix QMP socket from <qemu:commandline>
    ) -> None:
        self.name = name
        self.uuid = uuid
        self.meta = meta
        self.commandline_qmp = commandline_qmp

    @property
    def qmp_socket(self) -> str | None:
        if self.meta is not None and self.meta.qmp_socket:
            return self.meta.qmp_socket
        return self.commandline_qmp


def qmp_from_args(args: list[str]) -> str | None:
    """The first unix QMP socket in a QEMU argv (``-qmp unix:P,...`` or a chardev + ``-mon``)."""
    chardevs: dict[str, str] = {}
    monitors: list[str] = []
    for i, arg in enumerate(args[:-1]):
        value = args[i + 1]
        if arg in ("-qmp", "--qmp"):
            path = match_qmp_unix(value)  # ^unix:([^,]+)
            if path:
                return path
        elif arg == "-chardev" and value.startswith("socket,"):
            opts = dict(o.split("=", 1) for o in value.split(",")[1:] if "=" in o)
            if "id" in opts and "path" in opts:
                chardevs[opts["id"]] = opts["path"]
        elif arg == "-mon":
            opts = dict(o.split("=", 1) for o in value.split(",") if "=" in o)
            if opts.get("mode") == "control" and "chardev" in opts:
                monitors.append(opts["chardev"])
    for mon in monitors:
        if mon in chardevs:
            return chardevs[mon]
    return None


class _Handler:
    def __init__(self, where: str) -> None:
        self.where = where
        self.stack: list[str] = []
        self.domain_depth: int | None = None
        self.name = ""
        self.uuid = ""
        self.text: list[str] | None = None
        self.policy_attrs: dict[str, str] | None = None
        self.policies = 0
        self.children: list[tuple[str, dict[str, str]]] = []
        self.applied_registers: list[dict[str, str]] = []
        self.in_applied = False
        self.qemu_args: list[str] = []

    def fail(self, message: str) -> None:
        raise InvalidInput(message, self.where)

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        depth = len(self.stack)
        if depth >= MAX_DEPTH:
            self.fail(f"XML nested deeper than {MAX_DEPTH} elements")
        for key, value in attrs.items():
            if len(value) > MAX_ATTR:
                self.fail(f"attribute {bounded(key, 40)} longer than {MAX_ATTR} characters")
        ns, _, local = tag.rpartition(" ")
        self.stack.append(tag)
        if self.domain_depth is None:
            if local == "domain" and not ns and depth <= 1:
                self.domain_depth = depth
            return
        rel = depth - self.domain_depth
        if rel == 1 and local in ("name", "uuid") and not ns:
            self.text = []
            return
        if ns == XMLNS:
            self._hvc(rel, local, attrs)
        elif ns.startswith(_OUR_NS_PREFIX):
            self.fail(f"unsupported hvcpolicy namespace {bounded(ns, 80)!r} (expected {XMLNS})")
        elif ns == QEMU_NS and local == "arg" and rel == 2:
            parent = self.stack[-2]
            if parent == f"{QEMU_NS} commandline":
                self.qemu_args.append(attrs.get("value", ""))

    def _hvc(self, rel: int, local: str, attrs: dict[str, str]) -> None:
        parent = self.stack[-2].rpartition(" ")[2] if len(self.stack) >= 2 else ""
        if local == "policy":
            if rel != 2 or parent != "metadata":
                self.fail("<hvc:policy> must be a child of the domain's <metadata>")
            self.policies += 1
            if self.policies > 1:
                self.fail("more than one <hvc:policy> element")
            self.policy_attrs = dict(attrs)
            return
        if self.policy_attrs is None or (
            self.stack[-2] != f"{XMLNS} policy" and not self.in_applied
        ):
            self.fail(f"<hvc:{bounded(local, 40)}> outside <hvc:policy>")
        if self.in_applied:
            if local != "register" or rel != 4:
                self.fail(f"<hvc:{bounded(local, 40)}> is not allowed inside <hvc:applied>")
            self.applied_registers.append(dict(attrs))
            return
        if local not in ("feature", "unknown", "psci", "qmp", "resume", "applied"):
            self.fail(f"unknown element <hvc:{bounded(local, 40)}> in <hvc:policy>")
        if local == "applied":
            if any(c[0] == "applied" for c in self.children):
                self.fail("more than one <hvc:applied> element")
            self.in_applied = True
        self.children.append((local, dict(attrs)))

    def end(self, tag: str) -> None:
        self.stack.pop()
        depth = len(self.stack)
        if (
            self.domain_depth is not None
            and depth == self.domain_depth + 1
            and self.text is not None
        ):
            local = tag.rpartition(" ")[2]
            value = "".join(self.text).strip()
            if local == "name":
                self.name = value
            else:
                self.uuid = value
            self.text = None
        if tag == f"{XMLNS} applied":
            self.in_applied = False

    def chars(self, data: str) -> None:
        if self.text is not None:
            self.text.append(data)


def _refuse_dtd(*_: object) -> None:
    raise InvalidInput("DTDs and entity declarations are not allowed")


def parse_domain(xml: str | bytes, where: str = "domain XML") -> Domain:
    """Parse a domain XML (a ``<domain>``, or one wrapped as libvirt's status XML)."""
    if len(xml) > MAX_XML:
        raise InvalidInput(f"domain XML larger than {MAX_XML} bytes", where)
    h = _Handler(where)
    p = expat.ParserCreate(namespace_separator=" ")
    p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    p.StartDoctypeDeclHandler = _refuse_dtd
    p.EntityDeclHandler = _refuse_dtd
    p.UnparsedEntityDeclHandler = _refuse_dtd
    p.ExternalEntityRefHandler = _refuse_dtd  # type: ignore[assignment]
    p.StartElementHandler = h.start
    p.EndElementHandler = h.end
    p.CharacterDataHandler = h.chars
    p.buffer_text = True
    try:
        p.Parse(xml, True)
    except InvalidInput as err:
        if err.where is None:
            raise InvalidInput(err.message, where) from None
        raise
    except expat.ExpatError as err:
        raise InvalidInput(
            f"not well-formed XML: {expat.errors.messages[err.code]} (line {err.lineno})", where
        ) from None
    except RecursionError:
        raise InvalidInput("XML nested too deeply", where) from None
    except LookupError as err:  # expat on bytes: <?xml encoding="x-unknown"?>
        raise InvalidInput(f"unsupported XML encoding: {bounded(str(err), 80)}", where) from None
    if h.domain_depth is None:
        raise InvalidInput("no <domain> element", where)
    meta = None if h.policy_attrs is None else _build_policy(h, where)
    return Domain(
        name=h.name,
        uuid=h.uuid,
        meta=meta,
        commandline_qmp=qmp_from_args(h.qemu_args),
    )


def _attr(attrs: dict[str, str], name: str, element: str, where: str) -> str:
    value = attrs.get(name)
    if value is None:
        raise InvalidInput(f"<hvc:{element}> needs the attribute {name!r}", where)
    return value


def _build_policy(h: _Handler, where: str) -> DomainPolicy:
    assert h.policy_attrs is not None
    for key in h.policy_attrs:
        if key != "ref":
            raise InvalidInput(f"<hvc:policy> has an unknown attribute {bounded(key, 40)!r}", where)
    ref = _attr(h.policy_attrs, "ref", "policy", where)
    if not is_policy_name(ref):
        raise InvalidInput(f"<hvc:policy ref>: {bounded(ref, 80)!r} is not a policy name", where)
    features: dict[FeatureKey, Mode] = {}
    unknown = None
    psci = None
    qmp = None
    resume = False
    applied = None
    seen: set[str] = set()
    for local, attrs in h.children:
        if local in ("unknown", "psci", "qmp", "resume") and local in seen:
            raise InvalidInput(f"more than one <hvc:{local}> element", where)
        seen.add(local)
        if local == "feature":
            name = _attr(attrs, "name", local, where)
            mode = _attr(attrs, "mode", local, where)
            field_ = f"<hvc:feature name={bounded(name, 60)!r}>"
            if mode not in ("allow", "deny", "require"):
                raise InvalidInput(f"{field_}: mode must be allow, deny or require", where)
            problems: list[str] = []
            parsed = parse_feature(name, mode, problems)
            if parsed is None:
                raise InvalidInput(f"{field_}: {problems[0].split(': ', 1)[1]}", where)
            if parsed[0] in features:
                raise InvalidInput(f"{field_}: named twice", where)
            features[parsed[0]] = parsed[1]
        elif local == "unknown":
            mode = _attr(attrs, "mode", local, where)
            try:
                unknown = Unknown(mode)
            except ValueError:
                raise InvalidInput(
                    f"<hvc:unknown mode>: {bounded(mode, 40)!r} is not deny, allow or refuse", where
                ) from None
        elif local == "psci":
            version = _attr(attrs, "version", local, where)
            psci = cat.psci_parse(version)
            if psci is None or psci not in (cat.PSCI_0_1, *cat.PSCI_VERSIONS_0_2_AND_LATER):
                raise InvalidInput(
                    f"<hvc:psci version>: {bounded(version, 40)!r} is not a PSCI version KVM "
                    "implements",
                    where,
                )
        elif local == "qmp":
            qmp = _attr(attrs, "socket", local, where)
            if not qmp.startswith("/") or "\0" in qmp or len(qmp) > 107:
                raise InvalidInput(
                    "<hvc:qmp socket>: must be an absolute path of at most 107 bytes", where
                )
        elif local == "resume":
            after = _attr(attrs, "after", local, where)
            if after != "apply":
                raise InvalidInput('<hvc:resume after>: only "apply" is defined', where)
            resume = True
        elif local == "applied":
            applied = _build_applied(attrs, h.applied_registers, where)
    return DomainPolicy(
        ref=ref,
        features=features,
        unknown=unknown,
        psci=psci,
        qmp_socket=qmp,
        resume_after_apply=resume,
        applied=applied,
    )


def _build_applied(attrs: dict[str, str], regs: list[dict[str, str]], where: str) -> Applied:
    pairs = [
        (_attr(r, "id", "register", where), _attr(r, "value", "register", where)) for r in regs
    ]
    registers = cat.parse_register_map(
        pairs, where, "<hvc:register id>", lambda rid: f"<hvc:register id={rid!r}>"
    )
    backend = attrs.get("backend")
    if backend is not None and backend not in APPLIED_BACKENDS:
        raise InvalidInput(
            f"<hvc:applied backend>: {bounded(backend, 40)!r} is not "
            + " or ".join(APPLIED_BACKENDS),
            where,
        )
    return Applied(
        host=attrs.get("host", ""),
        kernel=attrs.get("kernel", ""),
        at=attrs.get("at", ""),
        registers=registers,
        backend=backend,
    )


def quoteattr(value: str) -> str:
    """An XML attribute value, quoted (saxutils' own would import urllib on the hook's path)."""
    escaped = (
        value.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("\n", "&#10;")
        .replace("\r", "&#13;")
        .replace("\t", "&#9;")
    )
    return f'"{escaped}"'


def render_policy(meta: DomainPolicy) -> str:
    """The ``<hvc:policy>`` element for ``setMetadata`` (which replaces it whole)."""
    out = [f'<hvc:policy xmlns:hvc="{XMLNS}" ref={quoteattr(meta.ref)}>']
    for key, mode in meta.features.items():
        out.append(f"  <hvc:feature name={quoteattr(key_text(key))} mode={quoteattr(mode.value)}/>")
    if meta.unknown is not None:
        out.append(f"  <hvc:unknown mode={quoteattr(meta.unknown.value)}/>")
    if meta.psci is not None:
        out.append(f"  <hvc:psci version={quoteattr(cat.psci_text(meta.psci))}/>")
    if meta.qmp_socket is not None:
        out.append(f"  <hvc:qmp socket={quoteattr(meta.qmp_socket)}/>")
    if meta.resume_after_apply:
        out.append('  <hvc:resume after="apply"/>')
    if meta.applied is not None:
        a = meta.applied
        backend = "" if a.backend is None else f" backend={quoteattr(a.backend)}"
        out.append(
            f"  <hvc:applied host={quoteattr(a.host)} kernel={quoteattr(a.kernel)} "
            f"at={quoteattr(a.at)}{backend}>"
        )
        for rid, value in sorted(a.registers.items()):
            out.append(f'    <hvc:register id="{cat.fmt_id(rid)}" value="{cat.fmt_value(value)}"/>')
        out.append("  </hvc:applied>")
    out.append("</hvc:policy>")
    return "\n".join(out)


def with_applied(meta: DomainPolicy, applied: Applied) -> DomainPolicy:
    return meta.replace(applied=applied)


def applied_element(
    meta: DomainPolicy,
    registers: Mapping[int, int],
    snap: Snapshot | None,
    backend: str | None = None,
) -> str:
    """The domain's ``<hvc:policy>`` with ``<hvc:applied>``: what this host (its snapshot's
    name and kernel, else uname's) left in the guest, when, and through which backend. For the
    hook's recorder, ``hvcpolicy start`` and the stream backend's restore alike."""
    import os
    import time

    u = os.uname()
    applied = Applied(
        host=snap.host if snap is not None else u.nodename,
        kernel=snap.kernel if snap is not None else u.release,
        at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        registers=dict(registers),
        backend=backend,
    )
    return render_policy(with_applied(meta, applied))


def _tree(xml: str) -> Element:
    """A libvirt-written domain XML as an ElementTree root, its namespace prefixes kept (libvirt
    reads ``<qemu:commandline>`` and metadata by URI, but a reader of the result should find the
    prefixes it wrote)."""
    import io
    import xml.etree.ElementTree as ET

    for _event, (prefix, uri) in ET.iterparse(io.StringIO(xml), events=("start-ns",)):
        if prefix and not prefix.startswith("ns"):  # ns<digits> is ElementTree's own
            ET.register_namespace(prefix, uri)
    ET.register_namespace("hvc", XMLNS)
    return ET.fromstring(xml)


def set_policy_element(xml: str, element: str) -> str:
    """The domain XML with ``element`` as its only ``<hvc:policy>`` in ``<metadata>``."""
    import xml.etree.ElementTree as ET

    root = _tree(xml)
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.Element("metadata")
        # libvirt orders it itself on define; after <uuid>/<description> reads best
        root.insert(min(3, len(root)), metadata)
    for old in metadata.findall(f"{{{XMLNS}}}policy"):
        metadata.remove(old)
    metadata.append(ET.fromstring(element))
    return ET.tostring(root, encoding="unicode")


def disk_targets(xml: str) -> list[str]:
    """The target names of every disk of a libvirt-written domain XML."""
    out: list[str] = []
    for disk in _tree(xml).iterfind("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev:
            out.append(dev)
    return out


def unprefixed(element: str) -> str:
    """``<hvc:policy xmlns:hvc=...>`` as libvirt's metadata API wants it: without the prefix
    and declaration (libvirt adds both from the key and URI it is given)."""
    import re

    element = element.replace(f' xmlns:hvc="{XMLNS}"', "", 1)
    return re.sub(r"<(/?)hvc:", r"<\1", element)


def unsaveable(xml: str) -> str | None:
    """Why libvirt cannot save this guest (so the stream backend cannot reach it), from its
    live XML; None when nothing known stands in the way (the save itself has the last word)."""
    root = _tree(xml)
    if root.find("devices/hostdev") is not None:
        return "it has a host device (VFIO) assigned, which cannot migrate"
    for fs in root.iterfind("devices/filesystem"):
        driver = fs.find("driver")
        if driver is not None and driver.get("type") == "virtiofs":
            return "it shares a directory through virtiofs, which cannot migrate"
    for iface in root.iterfind("devices/interface"):
        if iface.get("type") == "vhostuser":
            return "it has a vhost-user interface, whose backend may not migrate"
    for arg in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg"):
        if "mte=on" in (arg.get("value") or ""):
            return "it has MTE enabled, which disables migration"
    for feature in root.iterfind("features/*"):
        if feature.tag == "mte" or (feature.tag == "arm" and feature.find("mte") is not None):
            return "it has MTE enabled, which disables migration"
    return None
