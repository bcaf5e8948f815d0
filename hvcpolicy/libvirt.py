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


def domain_id(dom: Any) -> int:
    """libvirt's id of the running domain (a new one on every start and restore); -1 when off."""
    return int(call("domain id", dom.ID))


def lookup_uuid(conn: Any, uuid: str) -> Any:
    """The domain of ``uuid`` (a restore gives no handle: look it up again)."""
    return call("lookup", conn.lookupByUUIDString, uuid)


# --- the stream backend (hvcpolicy/savecycle.py) ----------------------------------------------


def qemu_version(conn: Any, live_xml: str) -> int:
    """The guest's QEMU version, libvirt-encoded (7002000 is 7.2.0), at least: the higher of
    libvirt's hypervisor version (its default emulator's; it fails on a host with no emulator
    for its own architecture, as on a test host) and the version in the running domain's
    machine type (``virt`` expands to ``virt-7.2``: the version of the emulator the domain
    really runs, say a wrapper of another QEMU); 0 when neither says."""
    import re

    lib = _lib()
    try:
        version = int(conn.getVersion())
    except lib.libvirtError:
        version = 0
    m = re.search(r"machine=['\"][a-z0-9]*-(\d+)\.(\d+)['\"]", live_xml)
    if m:
        version = max(version, int(m.group(1)) * 1_000_000 + int(m.group(2)) * 1_000)
    return version


def sparse_saves(conn: Any, live_xml: str) -> bool:
    """Whether this host must save sparse images: QEMU >= 11 no longer restores a raw image that
    libvirt hands it as a file (reference/qemu-migration-stream.md), and a libvirt that knows
    the save parameter ``image_format`` (tried with 11.3) can ask for the sparse (mapped-ram)
    format instead. Elsewhere the format is qemu.conf's ``save_image_format`` (raw by default)."""
    lib_version = int(call("version", conn.getLibVersion))
    return qemu_version(conn, live_xml) >= 11_000_000 and lib_version >= 11_003_000


def save_paused(dom: Any, path: str, sparse: bool) -> None:
    """Save the domain to ``path`` (QEMU stops; libvirt writes the image as root) so that a
    restore leaves it paused. ``sparse``: QEMU's mapped-ram format (see :func:`sparse_saves`);
    else qemu.conf's ``save_image_format`` (raw unless the host configured compression)."""
    lib = _lib()
    if sparse:
        params = {
            lib.VIR_DOMAIN_SAVE_PARAM_FILE: path,
            getattr(lib, "VIR_DOMAIN_SAVE_PARAM_IMAGE_FORMAT", "image_format"): "sparse",
        }
        call("save", dom.saveParams, params, lib.VIR_DOMAIN_SAVE_PAUSED)
    else:
        call("save", dom.saveFlags, path, None, lib.VIR_DOMAIN_SAVE_PAUSED)


def save_image_xml(conn: Any, path: str) -> str:
    """The domain XML inside a save image, with its secure parts (what a restore needs)."""
    lib = _lib()
    return str(
        call(
            "save-image-dumpxml",
            conn.saveImageGetXMLDesc,
            path,
            lib.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE,
        )
    )


def restore_paused(conn: Any, path: str, xml: str) -> None:
    """Restore the image at ``path`` with the domain XML ``xml`` (ABI-checked by libvirt),
    leaving the vCPUs paused. A never-run guest's image restores into QEMU's ``prelaunch``."""
    lib = _lib()
    call("restore", conn.restoreFlags, path, xml, lib.VIR_DOMAIN_SAVE_PAUSED)


def memory_snapshot(dom: Any, path: str, disks: list[str]) -> None:
    """Write the running QEMU's migration stream to ``path`` as an external memory-only
    snapshot, without stopping QEMU and without snapshot metadata: a paused guest stays paused
    (QEMU's runstate becomes ``postmigrate``, which ``resume`` leaves). ``disks``: the target
    names of every disk, each marked ``snapshot='no'`` (no overlay is made)."""
    from hvcpolicy.domainxml import quoteattr

    lib = _lib()
    disk_xml = "".join(f"<disk name={quoteattr(d)} snapshot='no'/>" for d in disks)
    xml = (
        "<domainsnapshot><name>hvcpolicy-readback</name>"
        f"<memory snapshot='external' file={quoteattr(path)}/>"
        f"<disks>{disk_xml}</disks></domainsnapshot>"
    )
    call("memory snapshot", dom.snapshotCreateXML, xml, lib.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
