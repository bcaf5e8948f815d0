"""``hvcpolicy image show FILE``: a saved guest's firmware registers, per vCPU, and what it sees."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hvcpolicy import catalogue as cat
from hvcpolicy.cli.common import emit_json
from hvcpolicy.cli.offline import feature_lines, level_lines
from hvcpolicy.errors import EXIT_OK
from hvcpolicy.imagefile import read_image
from hvcpolicy.planner import FeatureView, plan_start
from hvcpolicy.policy import Policy, Unknown
from hvcpolicy.saveimage import Image


def register(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "image",
        parents=[parent],
        help="a saved guest's firmware registers",
        description="Saved guests: libvirt save images (virsh save, managed save; raw or sparse) "
        "and QEMU migration streams.",
    )
    images = p.add_subparsers(dest="image_command", metavar="SUBCOMMAND", required=True)
    show = images.add_parser(
        "show",
        parents=[parent],
        help="every vCPU's firmware registers and what the guest sees",
        description="Every vCPU's firmware registers, by name, and the features the guest "
        "sees (as explain shows them). Exit 4 for an image it cannot account for.",
        epilog="example: hvcpolicy image show /var/lib/libvirt/qemu/save/web1.save",
    )
    show.add_argument("file", metavar="FILE")
    show.set_defaults(func=cmd_show)


def _name(rid: int) -> str:
    reg = cat.REGISTERS.get(rid)
    return reg.name if reg else "(unknown)"


def guest_view(registers: dict[int, int]) -> list[FeatureView]:
    """What a guest with these firmware registers sees: its registers are what KVM gives it, so
    every bit it holds is visible (planned under a policy that allows everything)."""
    return plan_start(Policy("saved guest", unknown=Unknown.ALLOW), registers).features


def _describe(image: Image, path: str) -> str:
    stream = image.stream
    where = f"QEMU stream at offset {stream.start}, {len(stream.vcpus)} vCPU(s)"
    if image.save is None:
        return f"{path}: QEMU migration stream, {len(stream.vcpus)} vCPU(s)"
    s = image.save
    return (
        f"{path}: libvirt save image ({s.format_name}, version {s.version}, "
        f"was running: {'yes' if s.was_running else 'no'}), {where}"
    )


def show_lines(image: Image, path: str) -> list[str]:
    vcpus = image.stream.vcpus
    fw = image.stream.firmware()
    lines = [_describe(image, path), ""]
    if not fw:
        lines.append("no firmware registers: the stream's cpreg lists carry none (not a KVM guest)")
        return lines
    head = "".join(f"{'vCPU ' + str(c.instance_id):>12}" for c in vcpus)
    lines.append(f"{'REGISTER':<20}{'ID':<20}{head}")
    for rid in fw:
        values = "".join(f"{cat.fmt_value(c.firmware[rid]):>12}" for c in vcpus)
        lines.append(f"{_name(rid):<20}{cat.fmt_id(rid):<20}{values}")
    lines.append("")
    lines.extend(feature_lines(guest_view(fw), policy=False))
    lines.append("")
    psci = fw.get(cat.PSCI_VERSION)
    lines.append(
        "PSCI: the guest sees "
        + ("no PSCI_VERSION register" if psci is None else cat.psci_text(psci))
    )
    lines.extend(level_lines(fw, who="guest"))
    return lines


def show_json(image: Image, path: str) -> dict[str, Any]:
    fw = image.stream.firmware()
    doc: dict[str, Any] = {"file": path, "kind": image.kind}
    if image.save is not None:
        doc["save"] = {
            "version": image.save.version,
            "format": image.save.format_name,
            "was_running": image.save.was_running,
            "stream_offset": image.save.stream_offset,
        }
    doc["vcpus"] = [
        {
            "instance_id": c.instance_id,
            "cpregs": len(c.registers),
            "registers": {cat.fmt_id(r): cat.fmt_value(v) for r, v in c.firmware.items()},
            "names": {cat.fmt_id(r): _name(r) for r in c.firmware},
        }
        for c in image.stream.vcpus
    ]
    doc["features"] = [f.to_json() for f in guest_view(fw)] if fw else []
    return doc


def cmd_show(args: argparse.Namespace) -> int:
    image = read_image(args.file)
    if args.format == "json":
        emit_json(show_json(image, args.file))
    else:
        sys.stdout.write("\n".join(show_lines(image, args.file)) + "\n")
    return EXIT_OK
