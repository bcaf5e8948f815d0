"""The merge of an operator policy with a domain's ``<hvc:policy>`` narrowing (SPEC.md section 4).

A domain may only tighten: allow -> deny or require; unknown allow -> deny -> refuse; a PSCI pin
only where the operator leaves it open or agrees. Anything that widens is invalid input naming
the field.
"""

from __future__ import annotations

from hvcpolicy import catalogue as cat
from hvcpolicy.errors import InvalidInput
from hvcpolicy.policy import UNKNOWN_RANK, Mode, Policy, Unknown, key_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from hvcpolicy.domainxml import DomainPolicy
    from hvcpolicy.policy import FeatureKey

# What a domain may turn each effective operator mode into.
_TIGHTER: dict[Mode | Unknown, frozenset[Mode]] = {
    Mode.ALLOW: frozenset({Mode.ALLOW, Mode.DENY, Mode.REQUIRE}),
    Mode.DENY: frozenset({Mode.DENY}),
    Mode.REQUIRE: frozenset({Mode.REQUIRE}),
    # Unnamed under unknown=allow/deny behave as allow/deny; under refuse any offer refuses,
    # which nothing a domain can say would tighten.
    Unknown.ALLOW: frozenset({Mode.ALLOW, Mode.DENY, Mode.REQUIRE}),
    Unknown.DENY: frozenset({Mode.DENY}),
    Unknown.REFUSE: frozenset(),
}


def _operator_mode(policy: Policy, key: FeatureKey) -> Mode | Unknown:
    rid, bit = key
    mode = policy.features.get(key) if bit is None else policy.mode_of(rid, bit)
    return mode if mode is not None else policy.unknown


def merge(operator: Policy, domain: DomainPolicy, where: str) -> Policy:
    """The policy a domain runs under; InvalidInput when the domain would widen ``operator``."""
    features = dict(operator.features)
    for key, mode in domain.features.items():
        current = _operator_mode(operator, key)
        if mode not in _TIGHTER[current]:
            was = (
                f"'{current.value}'"
                if isinstance(current, Mode)
                else f"unnamed, unknown: {current.value}"
            )
            raise InvalidInput(
                f"<hvc:feature name={key_text(key)!r} mode={mode.value!r}> widens policy "
                f"{operator.name!r} ({was}); a domain may only tighten it",
                where,
            )
        features[key] = mode
    unknown = operator.unknown
    if domain.unknown is not None:
        if UNKNOWN_RANK[domain.unknown] < UNKNOWN_RANK[operator.unknown]:
            raise InvalidInput(
                f"<hvc:unknown mode={domain.unknown.value!r}> widens policy {operator.name!r} "
                f"(unknown: {operator.unknown.value})",
                where,
            )
        unknown = domain.unknown
    psci = operator.psci
    if domain.psci is not None:
        if operator.psci is not None and operator.psci != domain.psci:
            raise InvalidInput(
                f"<hvc:psci version={cat.psci_text(domain.psci)!r}> conflicts with policy "
                f"{operator.name!r} (psci.version {cat.psci_text(operator.psci)})",
                where,
            )
        psci = domain.psci
    if features == operator.features and unknown == operator.unknown and psci == operator.psci:
        return operator
    return operator.replace(
        features=features,
        unknown=unknown,
        psci=psci,
        source=f"{operator.source} + {where}",
    )
