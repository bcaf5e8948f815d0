"""Commands that need neither QEMU nor libvirt: validate, explain, baseline, check-migration,
matrix."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any

from hvcpolicy import catalogue as cat
from hvcpolicy.cli.common import (
    Subject,
    add_subject_options,
    emit_json,
    resolve_subject,
    subject_from_domain,
)
from hvcpolicy.errors import EXIT_INVALID, EXIT_OK, EXIT_REFUSED, InvalidInput
from hvcpolicy.files import read_bounded
from hvcpolicy.planner import (
    FeatureView,
    Plan,
    Verdict,
    check_migration,
    host_level_rank,
    plan_start,
    predict_load,
)
from hvcpolicy.policy import EXTENSIONS, LEVEL_NAMES, parse_policy, schema_problems, stem_of
from hvcpolicy.snapshot import (
    Snapshot,
    baseline,
    decode_json,
    dumps,
    load_snapshot,
    parse_snapshot,
    save_snapshot,
)


def register(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "validate",
        parents=[parent],
        help="check policies, snapshots and domain XML",
        description="Check policies, host snapshots and domain XML files (or directories of "
        "them): schema and meaning. Every problem is printed with its file and field.",
        epilog="example: hvcpolicy validate examples/policies examples/hosts/*.json",
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "explain",
        parents=[parent],
        help="what a guest would see on a host",
        description="Show, feature by feature, what a guest under this policy would see on the "
        "host of SNAP, and whether a start would be refused (exit 3).",
        epilog="example: hvcpolicy explain --policy examples/policies/fleet-2026.yaml "
        "--host examples/hosts/neoverse-n1_linux-6.18.json",
    )
    add_subject_options(p)
    p.add_argument("--host", required=True, metavar="SNAP", help="a host snapshot")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "baseline",
        parents=[parent],
        help="least-common snapshot of many hosts",
        description="The least-common snapshot: registers every host has, bitmaps ANDed, "
        "lowest PSCI and mitigation levels, oldest QEMU.",
        epilog="example: hvcpolicy baseline examples/hosts/*.json -o fleet-baseline.json",
    )
    p.add_argument("snapshots", nargs="+", metavar="SNAP")
    p.add_argument("-o", "--output", metavar="FILE", help="write here (atomically), not stdout")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser(
        "check-migration",
        parents=[parent],
        help="would a destination accept this guest",
        description="Would the host of --to accept this guest? From the guest's <hvc:applied> "
        "record when the domain has one, else from the policy planned on --from, and the "
        "policy on --to; for --image, from the registers the saved guest carries (would it "
        "restore there). Exit 0 accept, 3 refuse (every reason listed).",
        epilog="example: hvcpolicy check-migration --domain-xml "
        "examples/domains/web1-applied-6.18.xml --to examples/hosts/neoverse-n1_linux-6.1.json",
    )
    add_subject_options(p, domain=True, image=True)
    p.add_argument("--to", required=True, metavar="SNAP", help="destination host snapshot")
    p.add_argument("--from", dest="source", metavar="SNAP", help="source host snapshot")
    p.set_defaults(func=cmd_check_migration)

    p = sub.add_parser(
        "matrix",
        parents=[parent],
        help="which hosts can start a policy, and where guests can migrate",
        description="Group hosts by identical firmware (register set and QEMU), then show which "
        "groups can start the policy and the group-to-group migration matrix.",
        epilog="example: hvcpolicy matrix --policy examples/policies/fleet-2026.yaml "
        "examples/hosts/*.json",
    )
    p.add_argument("--policy", required=True, metavar="P")
    p.add_argument("snapshots", nargs="+", metavar="SNAP")
    p.set_defaults(func=cmd_matrix)


# --- validate -------------------------------------------------------------------------------


def _expand(paths: list[str]) -> list[str]:
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                if name.endswith((*EXTENSIONS, ".xml")):
                    out.append(os.path.join(path, name))
        else:
            out.append(path)
    return out


def validate_file(path: str, policy_dir: str | None) -> tuple[str, list[str]]:
    """(what the file is, its problems)."""
    try:
        data = read_bounded(path)
        if path.endswith(".xml"):
            text = data.decode("utf-8", errors="replace")
            from hvcpolicy.domainxml import parse_domain

            domain = parse_domain(text, path)
            if domain.meta is not None:
                subject_from_domain(domain, path, policy_dir)
            return "domain", []
        from hvcpolicy.policy import decode_file

        doc = decode_file(path, data) if path.endswith(EXTENSIONS) else decode_json(data, path)
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if kind == "HostSnapshot":
            problems = [f"{path}: {p}" for p in schema_problems(doc, "snapshot")]
            if problems:
                return "snapshot", problems
            parse_snapshot(doc, path)
            return "snapshot", []
        if kind == "FirmwarePolicy":
            parse_policy(doc, path, stem_of(path))
            return "policy", []
        return "unknown", [f"{path}: kind: must be FirmwarePolicy or HostSnapshot"]
    except InvalidInput as err:
        return "invalid", err.problems


def cmd_validate(args: argparse.Namespace) -> int:
    results = []
    bad = 0
    for path in _expand(args.paths):
        kind, problems = validate_file(path, args.policy_dir)
        bad += bool(problems)
        results.append({"path": path, "kind": kind, "ok": not problems, "problems": problems})
        if args.format == "text":
            if problems:
                for problem in problems:
                    sys.stderr.write(f"hvcpolicy: {problem}\n")
            else:
                sys.stdout.write(f"ok {path} ({kind})\n")
    if args.format == "json":
        emit_json(results)
    return EXIT_INVALID if bad else EXIT_OK


# --- explain --------------------------------------------------------------------------------


def _require_policy(subject: Subject) -> None:
    if subject.policy is None:
        sys.stdout.write(f"{subject.why_unmanaged}: hvcpolicy leaves this domain alone\n")


def feature_lines(features: list[FeatureView], policy: bool = True) -> list[str]:
    """The feature table: what the guest sees, bit by bit (``policy``: with the policy's mode
    and the host's offer; without, for a saved guest, whose registers are what it sees)."""
    middle = f"{'POLICY':<24}{'HOST':<17}" if policy else ""
    lines = [f"{'FEATURE':<24}{'REGISTER':<20}{'BIT':>3}  {middle}GUEST SEES"]
    for v in features:
        reg = cat.REGISTERS.get(v.register)
        host = "missing register" if v.offered is None else ("offers" if v.offered else "lacks")
        seen = "uncontrolled" if v.visible is None else ("yes" if v.visible else "no")
        middle = f"{v.mode:<24}{host:<17}" if policy else ""
        lines.append(
            f"{v.name:<24}{reg.name if reg else cat.fmt_id(v.register):<20}{v.bit:>3}  "
            f"{middle}{seen}"
        )
    return lines


def level_lines(registers: Mapping[int, int], who: str = "host") -> list[str]:
    """One line per mitigation register: its level and what that level means."""
    lines = []
    for reg in cat.REGISTERS.values():
        if reg.policy_key is None:
            continue
        level = registers.get(reg.id)
        if level is None:
            lines.append(f"{reg.policy_key}: the {who} lacks {reg.name}")
        else:
            lines.append(
                f"{reg.policy_key}: {who} level {level} "
                f"({LEVEL_NAMES[host_level_rank(reg.id, level)]})"
            )
    return lines


def explain_lines(plan: Plan, snap: Snapshot) -> list[str]:
    lines = [f"policy {plan.policy} on host {snap.host} (kernel {snap.kernel})", ""]
    lines.extend(feature_lines(plan.features))
    lines.append("")
    psci = snap.registers.get(cat.PSCI_VERSION)
    target = plan.target.get(cat.PSCI_VERSION)
    if psci is None:
        lines.append("PSCI: the host lists no PSCI_VERSION register")
    else:
        how = "pinned by policy" if target != psci else "host default"
        shown = target if target is not None else psci
        lines.append(
            f"PSCI: host default {cat.psci_text(psci)}, guest sees {cat.psci_text(shown)} ({how})"
        )
    lines.extend(level_lines(snap.registers))
    lines.append("")
    if plan.writes:
        lines.append(
            "writes at start: "
            + ", ".join(f"{cat.reg_name(r)}={cat.fmt_value(v)}" for r, v in plan.writes.items())
        )
    else:
        lines.append("writes at start: none (the host's defaults already conform)")
    for note in plan.notes:
        lines.append(f"note: {note}")
    if plan.ok:
        lines.append("verdict: a start would be allowed")
    else:
        lines.append("verdict: a start would be REFUSED")
        lines.extend(f"  - {r}" for r in plan.refusals)
    return lines


def cmd_explain(args: argparse.Namespace) -> int:
    subject = resolve_subject(args)
    snap = load_snapshot(args.host)
    if subject.policy is None:
        _require_policy(subject)
        return EXIT_OK
    plan = plan_start(subject.policy, snap.registers)
    if args.format == "json":
        doc = plan.to_json()
        doc["host"] = snap.host
        doc["kernel"] = snap.kernel
        emit_json(doc)
    else:
        sys.stdout.write("\n".join(explain_lines(plan, snap)) + "\n")
    return EXIT_OK if plan.ok else EXIT_REFUSED


# --- baseline -------------------------------------------------------------------------------


def cmd_baseline(args: argparse.Namespace) -> int:
    result = baseline(load_snapshot(p) for p in args.snapshots)
    if args.output:
        save_snapshot(result, args.output)
    else:
        sys.stdout.write(dumps(result))
    return EXIT_OK


# --- check-migration ------------------------------------------------------------------------


def verdict_lines(verdict: Verdict, dest: Snapshot) -> list[str]:
    head = "ACCEPT" if verdict.ok else "REFUSE"
    basis = {
        "applied": "the guest's <hvc:applied> record",
        "source": "the policy planned on the source host",
        "policy": "the policy",
        "image": "the registers the saved guest carries",
    }[verdict.basis]
    lines = [f"{head}: migration to {dest.host} (kernel {dest.kernel}), judged from {basis}"]
    lines.extend(f"  reason: {r}" for r in verdict.reasons)
    if verdict.clears:
        lines.append("  clears on arrival: " + ", ".join(cat.reg_name(r) for r in verdict.clears))
    lines.extend(f"  note: {n}" for n in verdict.notes)
    return lines


def _image_verdict(path: str, dest: Snapshot) -> Verdict:
    """Would the saved guest in ``path`` restore on ``dest``: QEMU loads every register the
    image carries into the destination's KVM, so the kernel's verdict on each decides."""
    from hvcpolicy.imagefile import read_image

    image = read_image(path)
    applied = image.stream.firmware()
    verdict = predict_load(applied, dest)
    verdict.basis = "image"
    if not applied:
        verdict.notes.append(
            f"{path} carries no firmware registers (not a KVM guest's stream): nothing for the "
            "destination kernel to refuse"
        )
    return verdict


def cmd_check_migration(args: argparse.Namespace) -> int:
    dest = load_snapshot(args.to)
    if getattr(args, "image", None) is not None:
        verdict = _image_verdict(args.image, dest)
        return _report_verdict(args, verdict, dest)
    subject = resolve_subject(args)
    source = load_snapshot(args.source) if args.source else None
    applied = None
    if subject.domain is not None and subject.domain.meta is not None:
        rec = subject.domain.meta.applied
        applied = rec.registers if rec is not None else None
    if subject.policy is None and applied is None:
        _require_policy(subject)
        return EXIT_OK
    verdict = check_migration(subject.policy, dest, applied=applied, source=source)
    return _report_verdict(args, verdict, dest)


def _report_verdict(args: argparse.Namespace, verdict: Verdict, dest: Snapshot) -> int:
    if args.format == "json":
        emit_json(verdict.to_json())
    else:
        sys.stdout.write("\n".join(verdict_lines(verdict, dest)) + "\n")
    if not verdict.ok and args.format == "text":
        sys.stderr.write(f"hvcpolicy: migration to {dest.host} refused: {verdict.reasons[0]}\n")
    return EXIT_OK if verdict.ok else EXIT_REFUSED


# --- matrix ---------------------------------------------------------------------------------


def _label(i: int) -> str:
    label = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        label = chr(65 + r) + label
    return label


def _cell(i: int, j: int, v: Verdict | None) -> str:
    if i == j:
        return "."
    if v is None:
        return "n/a"
    return "ok" if v.ok else "--"


def cmd_matrix(args: argparse.Namespace) -> int:
    from hvcpolicy.policy import load_policy

    policy = load_policy(args.policy, args.policy_dir)
    classes: dict[object, list[Snapshot]] = {}
    for path in args.snapshots:
        snap = load_snapshot(path)
        classes.setdefault(snap.register_key(), []).append(snap)
    groups = list(classes.values())
    labels = [_label(i) for i in range(len(groups))]
    starts = [plan_start(policy, g[0].registers) for g in groups]
    # A guest never runs on a class that cannot start it, so such rows have no migrations.
    moves: list[list[Verdict | None]] = [
        [check_migration(policy, dst[0], source=src[0]) if starts[i].ok else None for dst in groups]
        for i, src in enumerate(groups)
    ]
    if args.format == "json":
        emit_json(
            {
                "policy": policy.name,
                "classes": [
                    {
                        "id": labels[i],
                        "kernel": g[0].kernel,
                        "qemu": g[0].qemu,
                        "hosts": [s.host for s in g],
                        "start": {"ok": starts[i].ok, "reasons": starts[i].refusals},
                    }
                    for i, g in enumerate(groups)
                ],
                "migrations": [
                    {"from": labels[i], "to": labels[j], "ok": v.ok, "reasons": v.reasons}
                    for i, row in enumerate(moves)
                    for j, v in enumerate(row)
                    if i != j and v is not None
                ],
            }
        )
        return EXIT_OK
    out = [f"policy {policy.name}: {len(args.snapshots)} hosts in {len(groups)} classes", ""]
    for i, g in enumerate(groups):
        names = ", ".join(s.host for s in g[:5]) + (f", ... (+{len(g) - 5})" if len(g) > 5 else "")
        verdict = "can start" if starts[i].ok else "REFUSED: " + "; ".join(starts[i].refusals)
        out.append(f"{labels[i]}: {len(g)} host(s), kernel {g[0].kernel}: {names}")
        out.append(f"   {verdict}")
    out += ["", "migration (row = from, column = to; ok, -- refused, n/a: cannot start there):"]
    width = max(3, *(len(lbl) for lbl in labels)) + 2
    out.append(" " * width + "".join(f"{lbl:>{width}}" for lbl in labels))
    for i, row in enumerate(moves):
        cells = "".join(f"{_cell(i, j, v):>{width}}" for j, v in enumerate(row))
        out.append(f"{labels[i]:<{width}}{cells}")
    refused = [
        (i, j, v)
        for i, row in enumerate(moves)
        for j, v in enumerate(row)
        if i != j and v is not None and not v.ok
    ]
    if refused:
        out.append("")
        for i, j, v in refused:
            out.append(f"{labels[i]} -> {labels[j]}: {v.reasons[0]}")
    sys.stdout.write("\n".join(out) + "\n")
    return EXIT_OK
