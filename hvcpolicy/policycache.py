"""A cache of validated policies, so the hook need not parse YAML or compile the schema.

One file per policy in the cache directory: the policy file's exact bytes when it was validated,
and the compiled result. A hit requires the current policy file to be byte-for-byte what was
validated, so an edited policy is never served stale (no mtimes involved), and the cache file
must be trustworthy: a regular file, not a link, owned by us, writable by nobody else. Anything
else is a miss, and the caller validates from scratch.
"""

from __future__ import annotations

import os
import stat

from hvcpolicy import __version__
from hvcpolicy.errors import InvalidInput
from hvcpolicy.lean import json_loads
from hvcpolicy.policy import (
    EXTENSIONS,
    Policy,
    decode_file,
    parse_policy,
    policy_path,
    stem_of,
)
from hvcpolicy.snapshot import MAX_FILE

FORMAT = 1


def _entry_path(cache_dir: str, name: str) -> str:
    return os.path.join(cache_dir, f"{name}.json")


def _trusted(st: os.stat_result) -> bool:
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_uid == os.geteuid()
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _read_trusted(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not _trusted(os.fstat(fd)):
            return None
        dir_st = os.stat(os.path.dirname(path))
        if dir_st.st_uid != os.geteuid() or dir_st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        return os.read(fd, 4 * MAX_FILE)
    finally:
        os.close(fd)


def _source(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(MAX_FILE + 1)
    except OSError:
        return None


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
    raw = _read_trusted(_entry_path(cache_dir, ref))
    source = _source(path)
    if raw is None or source is None:
        return None
    try:
        entry = json_loads(raw)
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


def load_policy_cached(ref: str, directory: str | None, cache_dir: str | None) -> Policy:
    """``policy.load_policy(ref, directory)``, answered from the cache when it holds policy
    ``ref`` exactly as its file is now (the CLI's commands that run on every guest start, like
    ``hvcpolicy start``, so skip YAML and jsonschema: ~50 ms). A path, or a miss, loads and
    validates as ``load_policy`` does."""
    from hvcpolicy.policy import load_policy, policy_dir

    if "/" not in ref and not ref.endswith(EXTENSIONS):
        cached = load_cached(ref, policy_dir(directory), cache_dir)
        if cached is not None:
            return cached
    return load_policy(ref, directory)


def store(policy: Policy, policy_dir: str, cache_dir: str | None) -> bool:
    """Cache ``policy``, after validating the file again as it is now: what is stored is exactly
    what was validated, even if the file changed since ``policy`` was loaded."""
    if not cache_dir:
        return False
    path = policy_path(policy.name, policy_dir)
    source = _source(path) if path is not None else None
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
    import json
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{policy.name}.", dir=cache_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(entry, fh)
        os.chmod(tmp, 0o600)
        os.replace(tmp, _entry_path(cache_dir, policy.name))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True
