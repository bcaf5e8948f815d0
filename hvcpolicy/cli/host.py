"""``hvcpolicy host probe [-o FILE]``: snapshot this host's firmware registers from /dev/kvm."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from typing import Any

from hvcpolicy import catalogue as cat
from hvcpolicy import kvm
from hvcpolicy.errors import EXIT_OK, Unavailable

DEFAULT_SNAPSHOT = "/var/lib/hvcpolicy/host.json"
_QEMU_VERSION = re.compile(r"QEMU emulator version (\d+\.\d+(?:\.\d+)?)")


def register(sub: Any, parent: argparse.ArgumentParser) -> None:
    host = sub.add_parser(
        "host",
        help="this host's firmware registers",
        description="This host's firmware registers.",
        epilog="example: hvcpolicy host probe -o /var/lib/hvcpolicy/host.json",
    )
    hsub = host.add_subparsers(dest="host_command", metavar="SUBCOMMAND", parser_class=type(host))
    probe = hsub.add_parser(
        "probe",
        parents=[parent],
        help="snapshot this host from /dev/kvm",
        description="Snapshot this host's firmware registers from /dev/kvm alone: a scratch VM, "
        "one vCPU with PSCI 0.2, KVM_GET_REG_LIST and KVM_GET_ONE_REG (no QEMU needed).",
        epilog="example: hvcpolicy host probe -o /var/lib/hvcpolicy/host.json",
    )
    probe.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        default=None,
        help=f"write here (default $HVCPOLICY_HOST_SNAPSHOT or {DEFAULT_SNAPSHOT}); - for stdout",
    )
    probe.set_defaults(func=cmd_probe)


def qemu_version() -> str | None:
    """The installed qemu-system-aarch64's version, e.g. ``10.0.13``; None when there is none."""
    exe = shutil.which("qemu-system-aarch64")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = _QEMU_VERSION.search(out)
    return m.group(1) if m else None


def cmd_probe(args: argparse.Namespace) -> int:
    from hvcpolicy import snapshot

    path = args.output or os.environ.get("HVCPOLICY_HOST_SNAPSHOT") or DEFAULT_SNAPSHOT
    registers = kvm.probe()
    if not registers:
        raise Unavailable("KVM lists no firmware registers on this host (kernel older than 4.16?)")
    taken = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    snap = snapshot.Snapshot(
        host=socket.gethostname(),
        kernel=platform.release(),
        source="kvm",
        registers=registers,
        taken=taken,
        qemu=qemu_version(),
    )
    if path == "-":
        sys.stdout.write(json.dumps(snap.to_json(), indent=2) + "\n")
        return EXIT_OK
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    snapshot.save_snapshot(snap, path)
    if args.format == "json":
        sys.stdout.write(json.dumps({"path": path, **snap.to_json()}) + "\n")
    else:
        names = ", ".join(f"{cat.reg_name(r)}={cat.fmt_value(v)}" for r, v in registers.items())
        sys.stdout.write(f"{path}: {snap.kernel}, {len(registers)} registers: {names}\n")
    return EXIT_OK
