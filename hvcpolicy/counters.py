"""Per-stage, per-outcome decision totals: what the audit lines say, counted, for the metrics.

Each decision (one audit line, from the hook or ``hvcpolicy start``) appends ONE byte to the file
``STAGE,OUTCOME`` under the counters directory (default ``counters/`` beside the host snapshot,
``/var/lib/hvcpolicy/counters``); the total is the file's size. Why this shape:

- cheap: one ``open(O_APPEND|O_CREAT)``, one 1-byte ``write``, one ``close`` on the hook's path
  (no lock, no read-modify-write, no parsing); a reader only ``stat``s;
- crash-safe and concurrent: a 1-byte ``O_APPEND`` write is atomic, so two hooks at once both
  count, and a crash loses at most the decision being written. A counter never goes down
  (Prometheus's rule for ``_total``) unless an operator deletes the directory: then it is a
  counter reset, which ``rate()`` and ``increase()`` handle;
- bounded: stages and outcomes come from fixed vocabularies (anything else is refused, so a
  hostile domain name or runstate can never name a file), at most ``len(STAGES) *
  len(OUTCOMES)`` files, one byte per decision (a million decisions are a megabyte).

Stdlib only and cheap to import: the hook imports this on every decision it logs. Counting never
raises: a decision must not change because it could not be counted.
"""

from __future__ import annotations

import os

# QEMU's RunState values (qapi/run-state.json): the hook's ``started`` stage is refined to
# ``started/RUNSTATE``; ``started/recorder`` is the detached child that records <hvc:applied>.
RUNSTATES = (
    "debug",
    "inmigrate",
    "internal-error",
    "io-error",
    "paused",
    "postmigrate",
    "prelaunch",
    "finish-migrate",
    "restore-vm",
    "running",
    "save-vm",
    "shutdown",
    "suspended",
    "watchdog",
    "guest-panicked",
    "colo",
)
STAGES = frozenset(
    (
        "prepare",
        "start",  # hvcpolicy start's own line (its stages step aside)
        "started",
        "started/recorder",
        "migrate",
        "restore",
        "reconnect",
        *(f"started/{state}" for state in RUNSTATES),
    )
)
# Every outcome an audit line carries (hook.py ``Hook.log``, cli/libvirt.py ``_audit``);
# tests/metrics/test_counters.py checks the sources name no other.
OUTCOMES = frozenset(
    (
        "allowed",
        # the flow's vocabulary (enforce.OUTCOMES; tests hold the two together)
        "applied",
        "unchanged",
        "verified",
        "dry-run",
        "predicted",
        # a stock QEMU's started stage (hook/stock.py)
        "stream-deferred",
        "paused-unenforced",
        "differs",
        "differs-warned",
        "unsupported-qemu-warned",
        "recorded",
        "recorded-resumed",
        "record-failed",
        "refused",
        "error",
    )
)
_SEP = ","  # in neither vocabulary


def file_name(stage: str, outcome: str) -> str:
    """The counter file of a (stage, outcome); ValueError for a name outside the vocabularies."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage[:40]!r}")
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome[:40]!r}")
    return stage.replace("/", ":") + _SEP + outcome


def parse_name(name: str) -> tuple[str, str] | None:
    """(stage, outcome) of a counter file name; None for anything else in the directory."""
    stage, sep, outcome = name.partition(_SEP)
    stage = stage.replace(":", "/")
    if not sep or stage not in STAGES or outcome not in OUTCOMES:
        return None
    return stage, outcome


def count(directory: str | None, stage: str, outcome: str) -> bool:
    """Add one decision; never raises. -> whether it was counted."""
    if not directory:
        return False
    try:
        path = os.path.join(directory, file_name(stage, outcome))
    except ValueError:
        return False
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:  # the first decision on this host
            os.makedirs(directory, mode=0o755, exist_ok=True)
            fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, b".")
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


def read(directory: str) -> dict[tuple[str, str], int]:
    """Every (stage, outcome) counted so far and its total; empty when nothing was counted."""
    totals: dict[tuple[str, str], int] = {}
    try:
        entries = os.scandir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return totals
    with entries:
        for entry in entries:
            key = parse_name(entry.name)
            if key is None or not entry.is_file(follow_symlinks=False):
                continue
            totals[key] = entry.stat(follow_symlinks=False).st_size
    return totals


def default_dir(host_snapshot: str) -> str:
    """Where counters live unless the hook config says: beside the host snapshot."""
    return os.path.join(os.path.dirname(os.path.abspath(host_snapshot)), "counters")
