"""Commands that work through libvirt: ``hook``, ``attach``, ``start``, ``install-hook``."""

from __future__ import annotations

import argparse
import os
import sys

from hvcpolicy.errors import EXIT_OK, InvalidInput, UsageError

TYPE_CHECKING = False  # `start` is on a path libvirt users wait on: what it does not use, it
if TYPE_CHECKING:  # does not import (contextlib, re, signal, typing are imported where used)
    from typing import Any

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
DEFAULT_HOOKS_DIR = "/etc/libvirt/hooks"
SYSTEM_QMP_DIR = "/var/lib/libvirt/qemu/hvcpolicy"
LIBVIRTD_PIDFILE = "/run/libvirtd.pid"


def register(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "hook",
        help="what libvirt runs (stdin: domain XML)",
        description="The libvirt qemu hook: DOMAIN OP SUBOP EXTRA, the domain XML on stdin. "
        "Installed hooks run hvcpolicy.hook.entry directly; this is the same entry.",
        epilog="example: hvcpolicy hook web1 prepare begin - < web1.xml",
    )
    p.add_argument("libvirt_args", nargs="*", metavar="ARG")
    p.set_defaults(func=cmd_hook)

    p = sub.add_parser(
        "attach",
        parents=[parent],
        help="add hvcpolicy metadata and a QMP socket to a libvirt domain",
        description="Add <hvc:policy ref=NAME> and a second QMP socket (a <qemu:commandline> "
        "-qmp in a directory QEMU's user can write) to the persistent definition of DOMAIN.",
        epilog="example: hvcpolicy attach web1 --policy fleet-2026 --resume-after-apply",
    )
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--policy", required=True, metavar="NAME", help="operator policy name")
    p.add_argument(
        "--qmp-dir",
        metavar="DIR",
        help=f"where QEMU creates the socket (default {SYSTEM_QMP_DIR}, or "
        "~/.local/share/hvcpolicy/qmp for qemu:///session)",
    )
    p.add_argument("--qemu-user", metavar="USER", help="owner of --qmp-dir (default: libvirt's)")
    p.add_argument(
        "--qmp-socket",
        metavar="PATH",
        help="record <hvc:qmp socket=PATH>: where hvcpolicy talks QMP, when not QEMU's own socket",
    )
    p.add_argument(
        "--resume-after-apply",
        action="store_true",
        help='add <hvc:resume after="apply"/>: `virsh start --paused` resumes once applied',
    )
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser(
        "start",
        parents=[parent],
        help="paused start, apply, record <hvc:applied>, resume",
        description="Start DOMAIN paused, enforce its policy before any vCPU runs (over QEMU's "
        "kvm-firmware-registers QMP property, or on a stock QEMU through a save, a patch of "
        "every vCPU's registers in the image and a paused restore), record <hvc:applied> in the "
        "live XML, then resume. On failure the guest is not resumed: it never ran, so it is "
        "shut off, any save image is kept, and the message says how to recover.",
        epilog="example: hvcpolicy start web1",
    )
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--timeout", type=float, default=5.0, help="bound on each QMP wait (s)")
    p.add_argument("--host-snapshot", metavar="FILE", help="this host's snapshot")
    p.add_argument(
        "--save-dir",
        metavar="DIR",
        help="where the stream backend saves the never-run guest (a 0700 directory; default "
        "/var/lib/hvcpolicy/save, or ~/.local/state/hvcpolicy/save for a non-root user)",
    )
    p.set_defaults(func=cmd_start)

    p = sub.add_parser(
        "install-hook",
        parents=[parent],
        help="install the libvirt hook and reload libvirtd",
        description="Install the hook as HOOKS_DIR/qemu.d/hvcpolicy with this Python and this "
        "package, write the hook's config (policy dir, host snapshot, cache), refresh the policy "
        "cache, and make libvirtd see the hook (SIGHUP).",
        epilog="example: hvcpolicy install-hook --policy-dir /etc/hvcpolicy/policies",
    )
    p.add_argument("--hooks-dir", default=DEFAULT_HOOKS_DIR, metavar="DIR")
    p.add_argument("--config", metavar="FILE", help="hook config (default: the hook's own)")
    p.add_argument("--python", metavar="PATH", help="interpreter the hook runs (default: this)")
    p.add_argument("--host-snapshot", metavar="FILE")
    p.add_argument("--cache-dir", metavar="DIR")
    p.add_argument("--audit-file", metavar="FILE", help="also append audit lines here")
    p.add_argument("--qmp-timeout", metavar="SECONDS")
    p.add_argument("--run-dir", metavar="DIR", help="where `hvcpolicy start` keeps its locks")
    p.add_argument("--pid-file", default=LIBVIRTD_PIDFILE, help="libvirtd's pid file to SIGHUP")
    p.add_argument("--no-reload", action="store_true", help="do not signal libvirtd")
    p.set_defaults(func=cmd_install_hook)


# --- hook ---------------------------------------------------------------------------------------


def cmd_hook(args: argparse.Namespace) -> int:
    from hvcpolicy.hook.entry import main

    return main(list(args.libvirt_args), sys.stdin.buffer)


# --- attach -------------------------------------------------------------------------------------


def _default_qmp_dir(uri: str) -> str:
    if uri.startswith("qemu:///session") or "/session" in uri.split("?")[0]:
        return os.path.join(os.path.expanduser("~"), ".local/share/hvcpolicy/qmp")
    return SYSTEM_QMP_DIR


def _qemu_user() -> str | None:
    """The user the system daemon runs QEMU as: qemu.conf's ``user``, else the distro's."""
    import pwd
    import re

    try:
        with open("/etc/libvirt/qemu.conf", encoding="utf-8", errors="replace") as f:
            for raw in f:
                m = re.match(r'^\s*user\s*=\s*"([^"]+)"', raw)
                if m:
                    return m.group(1)
    except OSError:
        pass
    for name in ("libvirt-qemu", "qemu"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return None


def prepare_qmp_dir(path: str, owner: str | None) -> None:
    """A directory QEMU's user can create its socket in (and only it and root can use)."""
    os.makedirs(path, mode=0o750, exist_ok=True)
    if owner and os.getuid() == 0:
        import pwd

        try:
            pw = pwd.getpwnam(owner)
        except KeyError:
            raise InvalidInput(f"--qemu-user: no user {owner!r}") from None
        os.chown(path, pw.pw_uid, pw.pw_gid)
        os.chmod(path, 0o750)


def add_to_definition(xml: str, element: str, qmp_path: str | None) -> str:
    """The domain XML with ``element`` as its ``<hvc:policy>`` and, unless one is there, a
    ``-qmp unix:QMP_PATH,server=on,wait=off`` in ``<qemu:commandline>``."""
    import xml.etree.ElementTree as ET

    from hvcpolicy.domainxml import set_policy_element

    ET.register_namespace("qemu", QEMU_NS)
    root = ET.fromstring(set_policy_element(xml, element))
    if qmp_path is not None:
        cmdline = root.find(f"{{{QEMU_NS}}}commandline")
        if cmdline is None:
            cmdline = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
        ET.SubElement(cmdline, f"{{{QEMU_NS}}}arg", {"value": "-qmp"})
        ET.SubElement(
            cmdline, f"{{{QEMU_NS}}}arg", {"value": f"unix:{qmp_path},server=on,wait=off"}
        )
    return ET.tostring(root, encoding="unicode")


def cmd_attach(args: argparse.Namespace) -> int:
    from hvcpolicy import libvirt
    from hvcpolicy.domainxml import DomainPolicy, parse_domain, render_policy
    from hvcpolicy.merge import merge
    from hvcpolicy.policy import load_policy

    if "/" in args.policy:
        raise UsageError("attach --policy takes a policy name from the policy directory")
    operator = load_policy(args.policy, args.policy_dir)
    conn = libvirt.connect(args.connect)
    try:
        uri = str(conn.getURI())
        dom = libvirt.lookup(conn, args.domain)
        xml = libvirt.domain_xml(dom, inactive=True)
        where = f"domain {args.domain!r}"
        current = parse_domain(xml, where)
        old = current.meta
        meta = DomainPolicy(
            ref=args.policy,
            features=dict(old.features) if old else {},
            unknown=old.unknown if old else None,
            psci=old.psci if old else None,
            qmp_socket=args.qmp_socket or (old.qmp_socket if old else None),
            resume_after_apply=args.resume_after_apply or bool(old and old.resume_after_apply),
        )
        merge(operator, meta, where)  # the domain's narrowing must still only tighten
        qmp_path = None
        if current.commandline_qmp is None:
            qdir = args.qmp_dir or _default_qmp_dir(uri)
            owner = args.qemu_user or (_qemu_user() if qdir == SYSTEM_QMP_DIR else None)
            prepare_qmp_dir(qdir, owner)
            qmp_path = os.path.join(qdir, f"{current.name or args.domain}.qmp")
            if len(qmp_path.encode()) > 107:
                raise InvalidInput(f"QMP socket path longer than 107 bytes: {qmp_path}")
        new_xml = add_to_definition(xml, render_policy(meta), qmp_path)
        parse_domain(new_xml, where)  # what the hook will read back
        libvirt.define(conn, new_xml)
        running = libvirt.is_active(dom)
    finally:
        conn.close()
    sock = qmp_path or current.commandline_qmp
    sys.stdout.write(
        f"{args.domain}: policy {args.policy!r} attached; QEMU's QMP socket for hvcpolicy: {sock}"
        + (f"; hvcpolicy talks QMP at {meta.qmp_socket}" if meta.qmp_socket else "")
        + "\n"
    )
    if running:
        sys.stdout.write(f"{args.domain}: running; takes effect at the next start\n")
    return EXIT_OK


# --- start --------------------------------------------------------------------------------------


def cmd_start(args: argparse.Namespace) -> int:
    from hvcpolicy import libvirt
    from hvcpolicy.cli.common import subject_from_domain
    from hvcpolicy.domainxml import parse_domain
    from hvcpolicy.errors import HvcError, Refused
    from hvcpolicy.hook.stages import check_host
    from hvcpolicy.savecycle import default_dir, image_dir
    from hvcpolicy.snapshot import DEFAULT_PATH, load_snapshot
    from hvcpolicy.start import start

    conf = _hook_config()
    conn = libvirt.connect(args.connect)
    try:
        dom = libvirt.lookup(conn, args.domain)
        where = f"domain {args.domain!r}"
        domain = parse_domain(libvirt.domain_xml(dom, inactive=True), where)
        subject = subject_from_domain(domain, where, args.policy_dir, load=_cached_loader(conf))
        if subject.policy is None:
            raise InvalidInput(f"{subject.why_unmanaged}; run `hvcpolicy attach` first")
        snap_path = (
            args.host_snapshot
            or os.environ.get("HVCPOLICY_HOST_SNAPSHOT")
            or (conf.host_snapshot if conf else DEFAULT_PATH)
        )
        snap = load_snapshot(snap_path) if os.path.exists(snap_path) else None
        save_dir = image_dir(
            args.save_dir or (conf.save_dir if conf is not None else None) or default_dir()
        )
        lock = None
        if conf is not None:
            from hvcpolicy.startlock import StartLock

            # held until the guest runs: the hook's prepare and started step aside for this
            # start and for the stream backend's restore
            lock = StartLock.acquire(conf.run_dir, args.domain)
        try:
            if snap is not None:
                target = check_host(subject.policy, snap, where)
                if lock is not None:  # the hook's prepare leaves this check to start
                    _audit(conf, domain, "prepare", "allowed", after=_regs(target))
            done = start(
                conn,
                dom,
                subject.policy,
                snap,
                timeout=args.timeout,
                save_dir=save_dir,
                lock=lock,
            )
        except HvcError as err:
            outcome = "refused" if isinstance(err, Refused) else "error"
            _audit(conf, domain, "start", outcome, reason=err.message)
            raise
        finally:
            if lock is not None:
                lock.release()
        result = done.result
        _audit(
            conf,
            domain,
            "start",
            done.outcome,
            before=_regs(result.before),
            after=_regs(result.applied_registers()),
            backend=done.backend,
        )
        for note in done.notes + result.warnings:
            sys.stderr.write(f"hvcpolicy: {args.domain}: {note}\n")
        sys.stdout.write(
            f"{args.domain}: started under policy {subject.policy.name!r} "
            f"({done.outcome}, {done.backend} backend)\n"
        )
    finally:
        conn.close()
    return EXIT_OK


def _audit(conf: Any, domain: Any, stage: str, outcome: str, **fields: str) -> None:
    """A line the hook (its prepare, its recorder) would have logged, said by ``start``,
    which did that part of the work."""
    from hvcpolicy import audit

    if conf is None:
        return
    line = {
        "domain": domain.name,
        "uuid": domain.uuid or "-",
        "stage": stage,
        "policy": domain.meta.ref if domain.meta is not None else "default",
        "outcome": outcome,
    }
    audit.record({**line, **fields, "by": "start"}, conf.audit_file)


def _regs(registers: dict[int, int]) -> str:
    from hvcpolicy.audit import regs_text

    return regs_text(registers)


def _hook_config() -> Any:
    """The hook's config (its cache, policy dir, snapshot, run dir), None when unreadable."""
    from hvcpolicy.errors import HvcError
    from hvcpolicy.hook.config import load_config

    try:
        return load_config()
    except HvcError:
        return None


def _cached_loader(conf: Any) -> Any:
    """Policies from the hook's validated cache when it holds them exactly as their files are
    now (the hook's own rules), else validated as before: no YAML or jsonschema on every start."""
    from hvcpolicy.policystore import resolve

    cache_dir = conf.cache_dir if conf is not None else None
    return lambda ref, directory=None: resolve(ref, directory, cache_dir)


# --- install-hook -------------------------------------------------------------------------------


def cmd_install_hook(args: argparse.Namespace) -> int:
    from hvcpolicy.hook.config import config_path
    from hvcpolicy.hook.install import install_hook
    from hvcpolicy.policy import policy_dir

    python = args.python or os.path.realpath(sys.executable)
    conf_path = args.config or config_path()
    fresh = args.policy_dir is not None or not os.path.exists(conf_path)
    updates = {
        "policy_dir": policy_dir(args.policy_dir) if fresh else None,
        "host_snapshot": args.host_snapshot,
        "cache_dir": args.cache_dir,
        "audit_file": args.audit_file,
        "qmp_timeout": args.qmp_timeout,
        "run_dir": args.run_dir,
    }
    pid_file = None if args.no_reload else args.pid_file
    out = install_hook(args.hooks_dir, conf_path, python, updates, pid_file)
    sys.stdout.write("\n".join(out) + "\n")
    return EXIT_OK
