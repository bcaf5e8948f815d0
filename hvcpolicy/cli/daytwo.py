"""The operator's day two: ``diff`` (what a kernel upgrade changed, for the host and for each
policy) and ``status`` (every domain on the host, its policy, its record, its live registers).

Top-level imports stay light: the parser is built (for --help, completion and the man page)
without importing libvirt or asyncio.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from hvcpolicy.errors import (
    EXIT_INVALID,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    InvalidInput,
)

DIFF_EPILOG = (
    "example: hvcpolicy diff examples/hosts/neoverse-n1_linux-6.1.json "
    "examples/hosts/neoverse-n1_linux-6.18.json --policy-dir examples/policies"
)
# shtab's completion of a file argument, without importing shtab at run time
FILES = {"bash": "_shtab_compgen_files", "zsh": "_files"}
STATUS_EPILOG = "example: hvcpolicy status --connect qemu:///system --format json"


def register(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "diff",
        parents=[parent],
        help="what changed between two snapshots of a host, policy by policy",
        description="Compare two host snapshots (say, before and after a kernel upgrade): "
        "registers added or gone, bits offered or withdrawn, the PSCI default, mitigation levels "
        "up or down. Then, for each policy given (or every policy in the policy directory): would "
        "guests now be refused, would they see something new (or lose something), and could they "
        "still migrate between a host on the old and one on the new kernel, in both directions. "
        "Exit 0 when nothing that matters changed for the policies checked, 3 when a policy is "
        "affected, 4 on invalid input.",
        epilog=DIFF_EPILOG,
    )
    for name, when in (("old", "before (e.g. the old kernel)"), ("new", "after")):
        arg = p.add_argument(name, metavar=f"{name.upper()}.json", help=f"snapshot {when}")
        arg.complete = FILES  # read by shtab (scripts/gen-docs.py)
    p.add_argument(
        "--policy",
        action="append",
        default=None,
        metavar="P",
        help="a policy file or name (repeatable); default: every policy in the policy directory",
    )
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser(
        "status",
        parents=[parent],
        help="every domain with its policy, record and live registers",
        description="List every libvirt domain with the policy it runs under, its <hvc:applied> "
        "record, and whether its live firmware registers (read over the domain's own QMP socket, "
        "<hvc:qmp>: every vCPU) still match that record (without a record: what the policy "
        "plans), by the rule the hook's reconnect uses. Like `virsh list --all`; --format json "
        "for monitoring. Exit 0 when every checked domain matches (or QEMU lacks the interface), "
        "3 when one drifted (DRIFT), else 4 when one's metadata or policy is invalid, else 5 "
        "when libvirt or a domain's QMP is unreachable.",
        epilog=STATUS_EPILOG,
    )
    p.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="bound on each QMP wait"
    )
    p.set_defaults(func=cmd_status)


# --- diff -----------------------------------------------------------------------------------


def _policies(args: argparse.Namespace) -> tuple[list[Any], str]:
    """The policies to judge, and where they came from (for the report)."""
    from hvcpolicy.policy import EXTENSIONS, load_policy, load_policy_file, policy_dir

    if args.policy:
        return [load_policy(ref, args.policy_dir) for ref in args.policy], "given"
    directory = policy_dir(args.policy_dir)
    explicit = args.policy_dir is not None or "HVCPOLICY_POLICY_DIR" in os.environ
    if not os.path.isdir(directory):
        if explicit:
            raise InvalidInput("not a directory", directory)
        return [], f"no policy directory {directory}"
    names = sorted(n for n in os.listdir(directory) if n.endswith(EXTENSIONS))
    return [load_policy_file(os.path.join(directory, n)) for n in names], directory


def cmd_diff(args: argparse.Namespace) -> int:
    from hvcpolicy.cli.common import emit_json
    from hvcpolicy.diff import diff, text_lines
    from hvcpolicy.snapshot import load_snapshot

    old = load_snapshot(args.old)
    new = load_snapshot(args.new)
    policies, origin = _policies(args)
    result = diff(old, new, policies)
    if args.format == "json":
        doc = result.to_json()
        doc["policies_from"] = origin
        emit_json(doc)
    else:
        sys.stdout.write("\n".join(text_lines(result, origin)) + "\n")
    return EXIT_REFUSED if result.affected else EXIT_OK


# --- status ---------------------------------------------------------------------------------


def _cell(text: str, width: int) -> str:
    return text if len(text) < width else text[: width - 2] + "~ "


def status_lines(rows: list[Any]) -> list[str]:
    head = f" {'Id':<5}{'Name':<24}{'State':<11}{'Policy':<20}{'Applied':<24}Live"
    lines = [head, "-" * (len(head) + 20)]
    for r in rows:
        applied = "-"
        if r.applied is not None:
            # the kernel's version without the distribution's suffix: the column stays narrow
            kernel = r.applied.kernel.split("-")[0]
            applied = f"{r.applied.host} {kernel}".strip() or "(recorded)"
        live = r.live
        if r.detail:
            live += f": {r.detail}"
        lines.append(
            f" {r.id_text:<5}{_cell(r.name, 24):<24}{r.state:<11}{_cell(r.policy_text, 20):<20}"
            f"{_cell(applied, 24):<24}{live}"
        )
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    from hvcpolicy.cli.common import emit_json
    from hvcpolicy.libvirt_status import collect

    rows = collect(args.connect, args.policy_dir, args.timeout)
    if args.format == "json":
        emit_json([r.to_json() for r in rows])
    else:
        sys.stdout.write("\n".join(status_lines(rows)) + "\n")
    return status_exit(rows)


def status_exit(rows: list[Any]) -> int:
    """3 when a domain drifted, else 4 when one's metadata or policy is invalid, else 5 when
    one's QMP could not be read, else 0 (QEMU lacking the interface is a state, not an error:
    its policy's ``unsupported-qemu`` decided at start)."""
    from hvcpolicy.libvirt_status import DRIFT, INVALID, UNREACHABLE

    live = {r.live for r in rows}
    if DRIFT in live:
        return EXIT_REFUSED
    if INVALID in live:
        return EXIT_INVALID
    return EXIT_UNAVAILABLE if UNREACHABLE in live else EXIT_OK
