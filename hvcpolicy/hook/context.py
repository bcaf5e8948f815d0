"""One hook run: the stage, the domain (parsed when first needed), its policy, this host's
snapshot, and the audit fields so far."""

from __future__ import annotations

import os

from hvcpolicy.errors import Unavailable

TYPE_CHECKING = False  # typing costs more than the interpreter's start-up: checker-only names
if TYPE_CHECKING:
    from collections.abc import Mapping

    from hvcpolicy.domainxml import Domain
    from hvcpolicy.hook.config import Config
    from hvcpolicy.policy import Policy
    from hvcpolicy.snapshot import Snapshot


class Hook:
    """One hook run: the stage, the domain, the config, and the audit fields so far."""

    def __init__(self, argv: list[str], xml: bytes, conf: Config) -> None:
        self.argv = argv
        self.stage = argv[1]
        self.xml = xml
        self.conf = conf
        self.audit: dict[str, str] = {
            "domain": argv[0],
            "uuid": "-",
            "stage": self.stage,  # started: refined to started/RUNSTATE
            "policy": "-",
        }
        self._domain: Domain | None = None

    @property
    def domain(self) -> Domain:
        if self._domain is None:
            from hvcpolicy.domainxml import parse_domain

            self._domain = parse_domain(self.xml, f"domain {self.argv[0]!r} ({self.stage} XML)")
            self.audit["uuid"] = self._domain.uuid or "-"
        return self._domain

    def policy(self) -> Policy | None:
        """The merged policy for this domain; None when hvcpolicy leaves the domain alone."""
        from hvcpolicy import policystore

        dom = self.domain
        conf = self.conf
        if dom.meta is None:
            if not policystore.has_policy(conf.policy_dir, "default"):
                return None
            operator = policystore.resolve("default", conf.policy_dir, conf.cache_dir, True)
            self.audit["policy"] = "default"
            return operator
        operator = policystore.resolve(dom.meta.ref, conf.policy_dir, conf.cache_dir, True)
        from hvcpolicy.merge import merge

        merged = merge(operator, dom.meta, f"domain {dom.name!r} <hvc:policy>")
        self.audit["policy"] = dom.meta.ref
        return merged

    def snapshot(self) -> Snapshot:
        from hvcpolicy.snapshot import load_snapshot

        path = self.conf.host_snapshot
        if not os.path.exists(path):
            raise Unavailable(
                f"{path}: no host snapshot; run `hvcpolicy host probe -o {path}` on this host"
            )
        return load_snapshot(path)

    def log(self, outcome: str, warning: bool = False, **fields: str) -> None:
        from hvcpolicy import audit

        audit.record({**self.audit, "outcome": outcome, **fields}, self.conf.audit_file, warning)


def regs(registers: Mapping[int, int] | None) -> str:
    """Registers as an audit field."""
    from hvcpolicy.audit import regs_text

    return regs_text(registers)
