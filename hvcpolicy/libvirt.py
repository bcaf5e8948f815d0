"""Every use of libvirt (libvirt-python) in hvcpolicy: ``attach``, ``start``,
``check-migration --domain``, ``status``. Never imported by the hook (it must not call libvirt).

libvirt errors become :class:`~hvcpolicy.errors.Unavailable` (exit 5) with libvirt's message;
libvirt's own printing to stderr is silenced with ``registerErrorHandler``.
"""

from __future__ import annotations

from typing import Any

from hvcpolicy import XMLNS
from hvcpolicy.domainxml import unprefixed
from hvcpolicy.errors import InvalidInput, Unavailable

METADATA_KEY = "hvc"


def _lib() -> Any:
    try:
        import libvirt
    except ImportError:
        raise Unavailable(
            "libvirt-python is not installed (Debian: python3-libvirt; pip: libvirt-python)"
        ) from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def _message(err: Exception) -> str:
    get = getattr(err, "get_error_message", None)
    return str(get() if get is not None else err)


def connect(uri: str | None) -> Any:
    lib = _lib()
    try:
        return lib.open(uri)
    except lib.libvirtError as err:
        raise Unavailable(f"libvirt {uri or '(default URI)'}: {_message(err)}") from None


def lookup(conn: Any, name: str) -> Any:
    lib = _lib()
    try:
        return conn.lookupByName(name)
    except lib.libvirtError as err:
        if err.get_error_code() == lib.VIR_ERR_NO_DOMAIN:
            raise InvalidInput(f"no domain named {name!r} on {conn.getURI()}") from None
        raise Unavailable(f"libvirt: {_message(err)}") from None


def domain_xml(dom: Any, inactive: bool = False) -> str:
    lib = _lib()
    try:
        flags = lib.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(dom.XMLDesc(flags))
    except lib.libvirtError as err:
        raise Unavailable(f"libvirt: {_message(err)}") from None


def fetch_domain_xml(name: str, uri: str | None, inactive: bool = False) -> str:
    """A domain's XML (live when running, unless ``inactive``: the persistent definition)."""
    conn = connect(uri)
    try:
        return domain_xml(lookup(conn, name), inactive)
    finally:
        conn.close()


def call(what: str, fn: Any, *args: Any) -> Any:
    """Run one libvirt call; its error becomes Unavailable naming ``what``."""
    lib = _lib()
    try:
        return fn(*args)
    except lib.libvirtError as err:
        raise Unavailable(f"libvirt {what}: {_message(err)}") from None


def define(conn: Any, xml: str) -> Any:
    return call("define", conn.defineXML, xml)


def set_policy_metadata(dom: Any, element: str, live: bool) -> None:
    """Replace the ``<hvc:policy>`` element, in the live XML or the persistent definition."""
    lib = _lib()
    flags = lib.VIR_DOMAIN_AFFECT_LIVE if live else lib.VIR_DOMAIN_AFFECT_CONFIG
    call(
        "set metadata",
        dom.setMetadata,
        lib.VIR_DOMAIN_METADATA_ELEMENT,
        unprefixed(element),
        METADATA_KEY,
        XMLNS,
        flags,
    )


def start_paused(dom: Any) -> None:
    lib = _lib()
    call("start --paused", dom.createWithFlags, lib.VIR_DOMAIN_START_PAUSED)


def resume(dom: Any) -> None:
    call("resume", dom.resume)


def destroy(dom: Any) -> None:
    call("destroy", dom.destroy)


def state(dom: Any) -> str:
    """``running``, ``paused``, ``shutoff``, ... (virsh's words)."""
    lib = _lib()
    names = {
        lib.VIR_DOMAIN_NOSTATE: "nostate",
        lib.VIR_DOMAIN_RUNNING: "running",
        lib.VIR_DOMAIN_BLOCKED: "blocked",
        lib.VIR_DOMAIN_PAUSED: "paused",
        lib.VIR_DOMAIN_SHUTDOWN: "shutdown",
        lib.VIR_DOMAIN_SHUTOFF: "shutoff",
        lib.VIR_DOMAIN_CRASHED: "crashed",
        lib.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
    }
    st = call("state", dom.state)
    return names.get(st[0], str(st[0]))


def is_active(dom: Any) -> bool:
    return bool(call("isActive", dom.isActive))
