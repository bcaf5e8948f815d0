"""``hvcpolicy status --format prometheus``: gather this host's facts for :mod:`hvcpolicy.metrics`
(libvirt's domains through ``status``'s own rows, the host snapshot, the policy directory, the
decision counters) and write the exposition, to stdout or atomically into node_exporter's
textfile directory.

Bad input never breaks the export: libvirt unreachable is ``hvcpolicy_libvirt_up 0``, a missing
or invalid snapshot is a state, a policy that does not load is ``hvcpolicy_policy_valid 0`` and a
domain whose metadata does not load is ``state="invalid"`` (status's own row). Only failing to
write the file is an error.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Protocol

from hvcpolicy import counters
from hvcpolicy.errors import HvcError, InvalidInput, Unavailable, bounded
from hvcpolicy.metrics import HostFacts, PolicyFact, exposition, parse_time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from hvcpolicy.libvirt_status import Row


class HookSettings(Protocol):
    """What the exporter needs of the hook's config (hvcpolicy.hook.config.Config)."""

    host_snapshot: str
    counters_dir: str


def snapshot_path(conf: HookSettings | None) -> str:
    """The snapshot the hook checks against: $HVCPOLICY_HOST_SNAPSHOT, the hook config's, or
    the default (as ``hvcpolicy start`` finds it)."""
    from hvcpolicy.snapshot import DEFAULT_PATH

    env = os.environ.get("HVCPOLICY_HOST_SNAPSHOT")
    if env:
        return env
    return conf.host_snapshot if conf is not None else DEFAULT_PATH


def counters_dir(snap_path: str, conf: HookSettings | None) -> str:
    """The hook's counters: its config's ``counters_dir`` when that config has the same
    snapshot (so the same daemon), else ``counters/`` beside the snapshot."""
    if conf is not None and os.path.abspath(conf.host_snapshot) == os.path.abspath(snap_path):
        return conf.counters_dir
    return counters.default_dir(snap_path)


def host_facts(snap_path: str, now: float) -> HostFacts:
    import platform
    import socket

    from hvcpolicy.cli.host import qemu_version
    from hvcpolicy.snapshot import load_snapshot

    facts = HostFacts(
        host=socket.gethostname(),
        kernel=platform.release(),
        now=now,
        qemu=qemu_version(),
        snapshot_path=snap_path,
    )
    if not os.path.exists(snap_path):
        return facts
    try:
        snap = load_snapshot(snap_path)
    except HvcError as err:
        sys.stderr.write(f"hvcpolicy: {err}\n")
        return facts.replace(snapshot_state="invalid")
    return facts.replace(
        snapshot_state="ok", snapshot_kernel=snap.kernel, snapshot_taken=parse_time(snap.taken)
    )


def policy_facts(directory: str) -> list[PolicyFact]:
    """Every policy file of the directory, loaded (schema and meaning) or not."""
    from hvcpolicy.policy import EXTENSIONS, load_policy_file, stem_of

    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(EXTENSIONS))
    except OSError:
        return []
    out = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            load_policy_file(path)
            valid = True
        except HvcError:
            valid = False
        out.append(PolicyFact(stem_of(path), name, valid))
    return out


def rows(uri: str | None, policy_dir: str | None, timeout: float) -> list[Row] | None:
    """status's rows; None when libvirt cannot be reached (said on stderr)."""
    from hvcpolicy.libvirt_status import collect

    try:
        return collect(uri, policy_dir, timeout)
    except HvcError as err:
        sys.stderr.write(f"hvcpolicy: {err}\n")
        return None


def gather(
    uri: str | None, policy_dir_arg: str | None, timeout: float, conf: HookSettings | None
) -> str:
    from hvcpolicy.policy import policy_dir

    now = time.time()
    snap = snapshot_path(conf)
    try:
        decisions = counters.read(counters_dir(snap, conf))
    except OSError as err:
        sys.stderr.write(f"hvcpolicy: counters: {err.strerror}\n")
        decisions = {}
    return exposition(
        rows(uri, policy_dir_arg, timeout),
        host_facts(snap, now),
        policy_facts(policy_dir(policy_dir_arg)),
        decisions,
    )


def write_atomic(path: str, text: str) -> None:
    """Replace ``path`` whole (files.write_atomic: temporary file in the same directory, fsync,
    rename, fsync the directory); the temporary name does not end in ``.prom``, so the textfile
    collector never reads a torn or empty file."""
    from hvcpolicy.files import write_atomic as replace

    if not path.endswith(".prom"):
        raise InvalidInput("the textfile collector reads only *.prom files", path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):  # the collector's directory is the package's, not ours
        raise Unavailable(f"{directory}: cannot write: no such directory")
    try:
        replace(path, text, 0o644, prefix=f".{os.path.basename(path)}.")  # 0644: node_exporter
    except OSError as err:
        raise Unavailable(f"{path}: cannot write: {bounded(str(err.strerror), 80)}") from None


def export(
    uri: str | None,
    policy_dir_arg: str | None,
    timeout: float,
    output: str | None,
    conf: HookSettings | None,
) -> int:
    """Gather and write; 0 once the exposition is out (what it says is in the metrics).
    ``conf``: the hook's config, when it loads (where the snapshot and counters are)."""
    text = gather(uri, policy_dir_arg, timeout, conf)
    if output is None or output == "-":
        sys.stdout.write(text)
    else:
        write_atomic(output, text)
    return 0
