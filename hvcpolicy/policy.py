"""Operator policies (SPEC.md sections 3 and 4): the model, loading, and the checks on meaning.

A policy on disk is YAML or JSON, checked against schemas/policy.schema.json and then for meaning
(feature names, ``REGID:BIT`` forms, the name against the file's stem). Parsing YAML and compiling
the schema are the slow part: ``Policy.to_compiled`` / ``from_compiled`` let a cache (see
``policycache``) skip them without trusting anything that changed since.
"""

from __future__ import annotations

import os

from hvcpolicy import catalogue as cat
from hvcpolicy.errors import InvalidInput, bounded
from hvcpolicy.files import read_bounded
from hvcpolicy.lean import match_name
from hvcpolicy.record import Record
from hvcpolicy.snapshot import decode_json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from enum import Enum
    from typing import Any
else:  # enum costs the hook more than the interpreter's start-up (hvcpolicy/lean.py)
    from hvcpolicy.lean import Enum

API_VERSION = "hvcpolicy/v1"
KIND = "FirmwarePolicy"
DEFAULT_POLICY_DIR = "/etc/hvcpolicy/policies"
DEFAULT_NAME = "default"
EXTENSIONS = (".yaml", ".yml", ".json")
# A policy name: ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z (\Z, not $: "$" also matches before a
# trailing newline, and "fleet-2026\n" would pass). lean.match_name is that pattern, without re.
is_policy_name = match_name


class Mode(Enum):
    ALLOW = "allow"
    DENY = "deny"
    REQUIRE = "require"


class Unknown(Enum):
    DENY = "deny"
    ALLOW = "allow"
    REFUSE = "refuse"


UNKNOWN_RANK = {Unknown.ALLOW: 0, Unknown.DENY: 1, Unknown.REFUSE: 2}

# Lowest mitigation level a host must report, as a rank comparable with the host's level.
LEVELS = {"any": 0, "available": 1, "not-required": 2}
LEVEL_NAMES = {v: k for k, v in LEVELS.items()}

if TYPE_CHECKING:
    # A feature key: (register, bit), or (register, None) for a whole register named by id.
    FeatureKey = tuple[int, int | None]


def key_text(key: FeatureKey) -> str:
    rid, bit = key
    return cat.fmt_id(rid) if bit is None else cat.bit_key(rid, bit)


class Policy(Record):
    __slots__ = (
        "already_running",
        "description",
        "features",
        "name",
        "psci",
        "source",
        "unknown",
        "unsupported_qemu",
        "workarounds",
    )

    def __init__(
        self,
        name: str,
        features: dict[FeatureKey, Mode] | None = None,
        unknown: Unknown = Unknown.DENY,
        psci: int | None = None,
        workarounds: dict[int, int] | None = None,  # register id -> LEVELS rank
        unsupported_qemu: str = "refuse",
        already_running: str = "refuse",
        description: str = "",
        source: str = "",  # the file it came from, or what merged it
    ) -> None:
        self.name = name
        self.features: dict[FeatureKey, Mode] = features if features is not None else {}
        self.unknown = unknown
        self.psci = psci
        self.workarounds: dict[int, int] = workarounds if workarounds is not None else {}
        self.unsupported_qemu = unsupported_qemu
        self.already_running = already_running
        self.description = description
        self.source = source

    def mode_of(self, rid: int, bit: int) -> Mode | None:
        """The mode the policy names for a bit (by bit first, then by whole register)."""
        mode = self.features.get((rid, bit))
        return mode if mode is not None else self.features.get((rid, None))

    def names_register(self, rid: int) -> bool:
        return any(k[0] == rid for k in self.features)

    def to_compiled(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "features": [[rid, bit, mode.value] for (rid, bit), mode in self.features.items()],
            "unknown": self.unknown.value,
            "psci": self.psci,
            "workarounds": [[rid, rank] for rid, rank in self.workarounds.items()],
            "unsupported_qemu": self.unsupported_qemu,
            "already_running": self.already_running,
        }

    @classmethod
    def from_compiled(cls, doc: dict[str, Any]) -> Policy:
        return cls(
            name=doc["name"],
            description=doc["description"],
            source=doc["source"],
            features={
                (int(r), None if b is None else int(b)): Mode(m) for r, b, m in doc["features"]
            },
            unknown=Unknown(doc["unknown"]),
            psci=doc["psci"],
            workarounds={int(r): int(k) for r, k in doc["workarounds"]},
            unsupported_qemu=doc["unsupported_qemu"],
            already_running=doc["already_running"],
        )

    def to_document(self) -> dict[str, Any]:
        """The policy as a user would write it (for ``explain`` and merged views)."""
        spec: dict[str, Any] = {
            "features": {key_text(k): m.value for k, m in self.features.items()},
            "unknown": self.unknown.value,
        }
        if self.psci is not None:
            spec["psci"] = {"version": cat.psci_text(self.psci)}
        if self.workarounds:
            spec["workarounds"] = {
                cat.REGISTERS[rid].policy_key: LEVEL_NAMES[rank]
                for rid, rank in self.workarounds.items()
            }
        spec["enforcement"] = {
            "unsupported-qemu": self.unsupported_qemu,
            "already-running": self.already_running,
        }
        meta: dict[str, Any] = {"name": self.name}
        if self.description:
            meta["description"] = self.description
        return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": spec}


# --- decoding -------------------------------------------------------------------------------


def decode_yaml(data: bytes, where: str) -> object:
    """Safe YAML, without aliases (no entity-bomb analogue) and with duplicate keys refused."""
    import yaml

    class _Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise yaml.YAMLError("anchors and aliases are not allowed in policies")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[object] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, str):
                    raise yaml.YAMLError(f"key {bounded(repr(key), 40)} is not a string")
                if key in seen:
                    raise yaml.YAMLError(f"duplicate key {bounded(key, 60)!r}")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    try:
        text = data.decode("utf-8")
        return yaml.load(text, Loader=_Loader)
    except UnicodeDecodeError:
        raise InvalidInput("not UTF-8 text", where) from None
    except RecursionError:
        raise InvalidInput("YAML nested too deeply", where) from None
    except (ValueError, TypeError, AttributeError, OverflowError) as err:
        # PyYAML's constructors raise these on values that match a tag's pattern but not its
        # meaning: `2001-13-45` (an implicit timestamp), `!!timestamp x`, `!!int x`, `!!set [1]`.
        raise InvalidInput(
            f"not valid YAML: bad value ({type(err).__name__}: {bounded(str(err), 80)})", where
        ) from None
    except yaml.YAMLError as err:
        line = ""
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            line = f"line {mark.line + 1}: "
        problem = getattr(err, "problem", None) or str(err)
        raise InvalidInput(f"{line}not valid YAML: {bounded(str(problem), 120)}", where) from None


def decode_file(path: str, data: bytes) -> object:
    if path.endswith(".json"):
        return decode_json(data, path)
    return decode_yaml(data, path)


_validator: Any = None


def schema_problems(doc: object, schema_name: str) -> list[str]:
    """Every schema violation as ``field.path: message``, in document order."""
    import json
    from importlib import resources

    import jsonschema

    global _validator
    validators: dict[str, Any] = _validator or {}
    if schema_name not in validators:
        text = resources.files("hvcpolicy").joinpath(f"schemas/{schema_name}.schema.json")
        schema = json.loads(text.read_text(encoding="utf-8"))
        validators[schema_name] = jsonschema.Draft202012Validator(schema)
        _validator = validators
    problems: list[str] = []
    errors = sorted(validators[schema_name].iter_errors(doc), key=lambda e: list(map(str, e.path)))
    for err in errors:
        path = ".".join(str(p) for p in err.absolute_path) or "(document)"
        if "propertyNames" in err.schema_path and path == "spec.features":
            # The schema can only say "not valid"; the meaning check says what is wrong.
            parse_feature(str(err.instance), "allow", problems)
            continue
        problems.append(f"{bounded(path, 80)}: {bounded(err.message, 160)}")
    return problems


# --- meaning --------------------------------------------------------------------------------


def parse_feature(key: str, mode: str, problems: list[str]) -> tuple[FeatureKey, Mode] | None:
    where = f"spec.features.{bounded(key, 60)}"
    parsed = cat.parse_feature_key(key)
    if parsed is not None:
        return (parsed[0], parsed[1]), Mode(mode)
    rid = cat.parse_regid(key)
    if rid is None:
        if ":" in key:
            problems.append(
                f"{where}: not REGID:BIT with a bitmap register (coproc 0x16) and a bit 0-63"
            )
        else:
            problems.append(
                f"{where}: unknown feature (known: {', '.join(cat.FEATURES)}; "
                "or REGID:BIT, or a register id)"
            )
        return None
    if rid in cat.REGISTERS and not cat.is_bitmap(rid):
        problems.append(
            f"{where}: {cat.REGISTERS[rid].name} is set by spec.psci or spec.workarounds, "
            "not spec.features"
        )
        return None
    if not cat.is_bitmap(rid) and mode == "deny":
        problems.append(f"{where}: only bitmap registers (coproc 0x16) can be denied")
        return None
    return (rid, None), Mode(mode)


def _invalid(problems: list[str], where: str) -> InvalidInput:
    """One error for many problems: the first in its message, all in ``.problems``."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    err = InvalidInput(problems[0] + more, where)
    err.problems = [f"{where}: {p}" for p in problems]
    return err


def parse_policy(doc: object, where: str, stem: str | None = None) -> Policy:
    """A decoded policy document -> Policy; InvalidInput lists every problem with its field."""
    problems = schema_problems(doc, "policy")
    if problems:
        raise _invalid(problems, where)
    assert isinstance(doc, dict)
    meta, spec = doc["metadata"], doc.get("spec", {})
    name: str = meta["name"]
    if stem is not None and name != stem:
        problems.append(f"metadata.name: {name!r} differs from the file name {stem!r}")
    features: dict[FeatureKey, Mode] = {}
    named_by: dict[FeatureKey, str] = {}
    for key, mode in spec.get("features", {}).items():
        parsed = parse_feature(key, mode, problems)
        if parsed is None:
            continue
        fkey, fmode = parsed
        if fkey in features:
            problems.append(
                f"spec.features.{bounded(key, 60)}: names the same bit as {named_by[fkey]!r}"
            )
            continue
        features[fkey] = fmode
        named_by[fkey] = key
    psci = None
    if "psci" in spec and "version" in spec["psci"]:
        psci = cat.psci_parse(spec["psci"]["version"])
        if psci is None or psci not in (cat.PSCI_0_1, *cat.PSCI_VERSIONS_0_2_AND_LATER):
            problems.append(
                f"spec.psci.version: {spec['psci']['version']!r} is not a PSCI version KVM "
                "implements (0.1, 0.2, 1.0, 1.1, 1.2, 1.3)"
            )
    workarounds = {
        cat.WORKAROUND_KEYS[k]: LEVELS[v] for k, v in spec.get("workarounds", {}).items()
    }
    enforcement = spec.get("enforcement", {})
    if problems:
        raise _invalid(problems, where)
    return Policy(
        name=name,
        description=meta.get("description", ""),
        features=features,
        unknown=Unknown(spec.get("unknown", "deny")),
        psci=psci,
        workarounds=workarounds,
        unsupported_qemu=enforcement.get("unsupported-qemu", "refuse"),
        already_running=enforcement.get("already-running", "refuse"),
        source=where,
    )


def stem_of(path: str) -> str:
    base = os.path.basename(path)
    for ext in EXTENSIONS:
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def load_policy_file(path: str) -> Policy:
    if not path.endswith(EXTENSIONS):
        raise InvalidInput("a policy file must end in .yaml, .yml or .json", path)
    data = read_bounded(path)
    return parse_policy(decode_file(path, data), path, stem_of(path))


def policy_dir(arg: str | None) -> str:
    return arg or os.environ.get("HVCPOLICY_POLICY_DIR") or DEFAULT_POLICY_DIR


def policy_path(ref: str, directory: str) -> str | None:
    """The file that defines policy ``ref`` in ``directory``; None when there is none."""
    if not is_policy_name(ref):
        raise InvalidInput(
            f"policy name {bounded(ref, 80)!r} is not a valid name ([a-z0-9-], at most 63)"
        )
    found = [
        os.path.join(directory, ref + ext)
        for ext in EXTENSIONS
        if os.path.isfile(os.path.join(directory, ref + ext))
    ]
    if len(found) > 1:
        raise InvalidInput(f"policy {ref!r} is defined twice: {', '.join(found)}")
    return found[0] if found else None


def load_policy(ref: str, directory: str | None = None) -> Policy:
    """``--policy``: a file path (anything with a slash or a policy extension) or a name.

    As root, the file must be one only root could have written, and a name must resolve inside
    the policy directory (``trust.check_policy_path``, docs/SECURITY.md T4/T5)."""
    from hvcpolicy.trust import check_policy_path

    as_root = os.geteuid() == 0
    if "/" in ref or ref.endswith(EXTENSIONS):
        if as_root:
            check_policy_path(ref, None, as_root=True)
        return load_policy_file(ref)
    path = policy_path(ref, policy_dir(directory))
    if path is None:
        raise InvalidInput(f"no policy named {ref!r} in {policy_dir(directory)}")
    if as_root:
        check_policy_path(path, policy_dir(directory), as_root=True)
    return load_policy_file(path)
