"""Where a policy comes from, for the hook and the CLI alike: one resolver (``resolve``) over the
policy directory and the cache of validated policies.

The cache spares the hook (and ``hvcpolicy start``) parsing YAML and compiling the schema: one
file per policy in the cache directory, the policy file's exact bytes when it was validated and
the compiled result. A hit requires the current policy file to be byte-for-byte what was
validated, so an edited policy is never served stale (no mtimes involved), and the cache file
must be trustworthy (``trust.read_private``). Anything else is a miss, and the policy is
validated from scratch.
"""

from __future__ import annotations

import json
import os

from hvcpolicy import __version__
from hvcpolicy.errors import InvalidInput, Unavailable
from hvcpolicy.files import MAX_FILE, read_prefix
from hvcpolicy.policy import (
    EXTENSIONS,
    Policy,
    decode_file,
    parse_policy,
    policy_path,
    stem_of,
)

FORMAT = 1


def _entry_path(cache_dir: str, name: str) -> str:
    return os.path.join(cache_dir, f"{name}.json")


def load_cached(ref: str, policy_dir: str, cache_dir: str | None) -> Policy | None:
    """The policy named ``ref`` from the cache, or None (a miss: validate it the slow way)."""
    if not cache_dir:
        return None
    try:
        path = policy_path(ref, policy_dir)
    except InvalidInput:
        return None
    if path is None:
        return None
    if os.geteuid() == 0:
        from hvcpolicy.trust import check_policy_path

        try:  # a policy root cannot trust is a miss: the slow path refuses it, with the reason
            check_policy_path(path, policy_dir, as_root=True)
        except InvalidInput:
            return None
    from hvcpolicy.trust import read_private

    raw = read_private(_entry_path(cache_dir, ref), 4 * MAX_FILE)
    source = read_prefix(path)
    if raw is None or source is None:
        return None
    try:
        entry = json.loads(raw)
        if (
            entry.get("format") != FORMAT
            or entry.get("tool") != __version__
            or entry.get("path") != os.path.abspath(path)
            or entry.get("source", "").encode("utf-8") != source
        ):
            return None
        return Policy.from_compiled(entry["policy"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def store(policy: Policy, policy_dir: str, cache_dir: str | None) -> bool:
    """Cache ``policy``, after validating the file again as it is now: what is stored is exactly
    what was validated, even if the file changed since ``policy`` was loaded."""
    if not cache_dir:
        return False
    path = policy_path(policy.name, policy_dir)
    source = read_prefix(path) if path is not None else None
    if path is None or source is None or len(source) > MAX_FILE:
        return False
    try:
        current = parse_policy(decode_file(path, source), path, stem_of(path))
        text = source.decode("utf-8")
    except (InvalidInput, UnicodeDecodeError):
        return False
    if current != policy:
        return False
    entry = {
        "format": FORMAT,
        "tool": __version__,
        "path": os.path.abspath(path),
        "source": text,
        "policy": current.to_compiled(),
    }
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    from hvcpolicy.files import write_atomic

    write_atomic(_entry_path(cache_dir, policy.name), json.dumps(entry), 0o600, f".{policy.name}.")
    return True


def has_policy(directory: str, name: str) -> bool:
    return policy_path(name, directory) is not None


def resolve(
    ref: str, directory: str | None, cache_dir: str | None, refresh: bool = False
) -> Policy:
    """Policy ``ref`` (a name in ``directory``, or a file path): from the validated cache when
    it holds the name exactly as its file is now; else parsed and validated (``load_policy``:
    YAML and jsonschema, from site-packages) and, with ``refresh``, cached for next time."""
    from hvcpolicy.policy import policy_dir

    if "/" not in ref and not ref.endswith(EXTENSIONS):
        cached = load_cached(ref, policy_dir(directory), cache_dir)
        if cached is not None:
            return cached
    enable_site()
    from hvcpolicy.policy import load_policy

    try:
        policy = load_policy(ref, directory)
    except ImportError as err:
        raise Unavailable(
            f"policy {ref!r}: not in the cache {cache_dir} and this Python cannot validate "
            f"policies ({err}); run `hvcpolicy install-hook` to refresh the cache"
        ) from None
    if refresh:
        import contextlib

        with contextlib.suppress(OSError):  # a cache we cannot write: validate again next time
            store(policy, policy_dir(directory), cache_dir)
    return policy


def enable_site() -> None:
    """The slow paths under the hook's ``-S``: site-packages for what only they hold (yaml and
    jsonschema for a policy the cache does not hold; qemu.qmp, libvirt-python where the system
    installs them there). ``hvcpolicy`` itself is already imported, so it stays this package."""
    import sys

    if sys.flags.no_site and "site" not in sys.modules:
        import site

        site.main()
