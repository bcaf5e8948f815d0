"""What several commands share: finding the policy a guest runs under, and printing."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from hvcpolicy.domainxml import Domain, parse_domain
from hvcpolicy.errors import UsageError
from hvcpolicy.files import MAX_FILE, read_bounded
from hvcpolicy.merge import merge
from hvcpolicy.policy import DEFAULT_NAME, Policy, load_policy, policy_dir, policy_path
from hvcpolicy.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Subject(Record):
    """The guest a command talks about: its policy (None: hvcpolicy leaves it alone)."""

    __slots__ = ("domain", "policy", "why_unmanaged")

    def __init__(
        self, policy: Policy | None, domain: Domain | None = None, why_unmanaged: str = ""
    ) -> None:
        self.policy = policy
        self.domain = domain
        self.why_unmanaged = why_unmanaged


def add_subject_options(
    p: argparse.ArgumentParser, *, domain: bool = False, image: bool = False
) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--policy", metavar="P", help="a policy file, or a name in the policy dir")
    group.add_argument(
        "--domain-xml", metavar="X", help="a libvirt domain XML file, or - for stdin"
    )
    if domain:
        group.add_argument("--domain", metavar="NAME", help="a libvirt domain, read over --connect")
    if image:
        group.add_argument(
            "--image",
            metavar="FILE",
            help="a saved guest: a libvirt save image (managed save too) or a QEMU stream",
        )


def read_xml_arg(arg: str) -> tuple[str, str]:
    if arg == "-":
        data = sys.stdin.buffer.read(MAX_FILE * 8 + 1)
        return data.decode("utf-8", errors="replace"), "domain XML (stdin)"
    return read_bounded(arg).decode("utf-8", errors="replace"), arg


def subject_from_domain(
    domain: Domain, where: str, directory: str | None, load: Callable[..., Policy] = load_policy
) -> Subject:
    """The policy a domain runs under; ``load`` is ``load_policy`` or a cache in front of it."""
    if domain.meta is None:
        path = policy_path(DEFAULT_NAME, policy_dir(directory))
        if path is None:
            return Subject(None, domain, f"{where}: no hvcpolicy metadata and no 'default' policy")
        return Subject(load(path), domain)
    operator = load(domain.meta.ref, directory)
    return Subject(merge(operator, domain.meta, where), domain)


def resolve_subject(args: argparse.Namespace) -> Subject:
    if args.policy is not None:
        return Subject(load_policy(args.policy, args.policy_dir))
    if getattr(args, "domain", None) is not None:
        from hvcpolicy import libvirt as libvirt_adapter

        xml = libvirt_adapter.fetch_domain_xml(args.domain, args.connect)
        where = f"domain {args.domain}"
    elif args.domain_xml is not None:
        xml, where = read_xml_arg(args.domain_xml)
    else:
        raise UsageError("one of --policy, --domain-xml or --domain is needed")
    return subject_from_domain(parse_domain(xml, where), where, args.policy_dir)


def emit_json(doc: Any) -> None:
    import json

    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
