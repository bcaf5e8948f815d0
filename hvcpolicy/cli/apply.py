"""``hvcpolicy apply``: enforce a policy on a running QEMU over QMP (SPEC.md sections 6-8)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from hvcpolicy import catalogue as cat
from hvcpolicy.cli.common import add_subject_options, emit_json, resolve_subject
from hvcpolicy.errors import EXIT_OK, UsageError

if TYPE_CHECKING:
    from hvcpolicy.enforce import ApplyResult

DEFAULT_TIMEOUT = 5.0  # hvcpolicy.qmp.DEFAULT_TIMEOUT; not imported here (asyncio is heavy)


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 300:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds in (0, 300]")
    return value


def register(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "apply",
        parents=[parent],
        help="enforce a policy on a running QEMU over QMP",
        description=(
            "Read the guest's firmware registers over QMP and enforce the policy. In runstate "
            "prelaunch or inmigrate: plan, write through the first vCPU, read back through every "
            "vCPU, and with --resume let the guest run. In any other runstate nothing is written: "
            "the registers are verified and enforcement.already-running decides. A QEMU without "
            "the kvm-firmware-registers interface follows enforcement.unsupported-qemu. "
            "Exit 0 ok, 3 refused by policy, 4 invalid input, 5 QEMU unreachable or lacking the "
            "interface (also: a write failed or did not hold)."
        ),
        epilog="example: hvcpolicy simulate --socket /tmp/web1.qmp --kernel 6.18 --vcpus 2 & "
        "hvcpolicy apply --qmp /tmp/web1.qmp --policy examples/policies/fleet-2026.yaml --resume",
    )
    add_subject_options(p)
    p.add_argument(
        "--qmp",
        metavar="SOCKET",
        help="QEMU's QMP unix socket (default: the one the --domain-xml names)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument(
        "--resume", action="store_true", help="resume (QMP cont) the guest once it complies"
    )
    p.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"bound on every QMP wait, in seconds (default {DEFAULT_TIMEOUT:g})",
    )
    p.set_defaults(func=cmd_apply)


def cmd_apply(args: argparse.Namespace) -> int:
    subject = resolve_subject(args)
    address = args.qmp
    applied = None
    if subject.domain is not None:
        if address is None:
            address = subject.domain.qmp_socket
        meta = subject.domain.meta
        if meta is not None and meta.applied is not None:
            applied = meta.applied.registers
    if address is None:
        raise UsageError("--qmp SOCKET is needed (the domain XML names no QMP socket)")
    if subject.policy is None:
        sys.stdout.write(f"{subject.why_unmanaged}: hvcpolicy leaves this domain alone\n")
        return EXIT_OK

    from hvcpolicy.enforce import enforce_at
    from hvcpolicy.errors import QMPError

    try:
        result = enforce_at(
            address,
            subject.policy,
            timeout=args.timeout,
            applied=applied,
            dry_run=args.dry_run,
            resume=args.resume,
        )
    except QMPError as err:
        if args.verbose:  # the exchange that failed, before the traceback
            sys.stderr.write(f"hvcpolicy: QMP sent: {json.dumps(err.sent, default=str)}\n")
            sys.stderr.write(f"hvcpolicy: QMP received: {json.dumps(err.received, default=str)}\n")
        raise
    for warning in result.warnings:
        sys.stderr.write(f"hvcpolicy: warning: {warning}\n")
    if args.format == "json":
        emit_json(result.to_json())
    else:
        sys.stdout.write("\n".join(result_lines(result)) + "\n")
    return EXIT_OK


def result_lines(result: ApplyResult) -> list[str]:
    from hvcpolicy.enforce import DRY_RUN, UNSUPPORTED_WARNED

    n = result.vcpus
    head = (
        f"policy {result.policy} on {result.where}: runstate {result.runstate}, "
        f"{n} vCPU{'s' if n != 1 else ''}"
    )
    lines = [head]
    if result.outcome == UNSUPPORTED_WARNED:
        lines.append("outcome: unsupported-qemu-warned (nothing read, nothing written)")
        return lines
    lines.append("")
    lines.append(f"{'REGISTER':<44}{'BEFORE':>10}  {'TARGET':>10}  ACTION")
    for rid in sorted(result.before.keys() | result.target.keys()):
        before = result.before.get(rid)
        target = result.target.get(rid)
        if rid in result.written:
            action = "written"
        elif rid in result.writes:
            action = "would write" if result.outcome == DRY_RUN else "planned"
        elif not result.writable and target is not None and target != before:
            action = "differs (not writable)"
        else:
            action = "-"
        lines.append(
            f"{cat.reg_name(rid):<44}"
            f"{cat.fmt_value(before) if before is not None else 'absent':>10}  "
            f"{cat.fmt_value(target) if target is not None else '-':>10}  {action}"
        )
    if result.features:
        lines.append("")
        lines.append(f"{'FEATURE':<24}{'POLICY':<24}GUEST SEES")
        for v in result.features:
            seen = "uncontrolled" if v.visible is None else ("yes" if v.visible else "no")
            lines.append(f"{v.name:<24}{v.mode:<24}{seen}")
    lines.append("")
    lines.extend(f"note: {note}" for note in result.notes)
    lines.extend(f"mismatch: {m}" for m in result.mismatches)
    tail = f"outcome: {result.outcome}"
    if result.after:
        tail += (
            f" (read back through {len(result.after)} vCPU{'s' if len(result.after) != 1 else ''})"
        )
    if result.resumed:
        tail += "; resumed"
    lines.append(tail)
    return lines
