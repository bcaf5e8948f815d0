"""Timing helpers shared by the benchmark parts: spawn a command as libvirt would, time it to
exit, take its peak RSS from the kernel (wait4), interleave cases, report medians and ratios.

Everything is relative: a figure is only ever printed next to a baseline measured in the same
run, interleaved with it, because the machines this runs on are shared and noisy.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"


@dataclass
class Case:
    """One command to time: argv, the file on its stdin, its environment."""

    name: str
    argv: list[str]
    stdin: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    expect_rc: int = 0
    before: Callable[[], None] | None = None  # off the clock, before every run (e.g. a reset)
    times: list[float] = field(default_factory=list)


def spawn_and_wait(case: Case) -> tuple[float, int, int]:
    """Run ``case`` once: -> (seconds to exit, exit status, ru_maxrss in KiB, which includes
    ours: see ``peak_rss_kib``)."""
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = []
    actions.append((os.POSIX_SPAWN_OPEN, 0, case.stdin or os.devnull, os.O_RDONLY, 0))
    actions.append((os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0))
    actions.append((os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0))
    t0 = time.perf_counter()
    pid = os.posix_spawn(case.argv[0], case.argv, case.env, file_actions=actions)
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - t0
    return elapsed, os.waitstatus_to_exitcode(status), int(usage.ru_maxrss)


GNU_TIME = "/usr/bin/time"


def peak_rss_kib(case: Case, runs: int = 3) -> int:
    """The highest peak RSS of ``runs`` runs of ``case``, in KiB, as GNU time reports it.

    Not from our own wait4: a child forked or vforked from this (larger) process inherits its
    memory high-water mark across exec. GNU time is a small C program, so what it reports is the
    command's own peak (the most of sh, the Python it execs, and any child it waits for)."""
    import tempfile

    if not os.path.exists(GNU_TIME):
        raise SystemExit(f"bench: {GNU_TIME} (Debian package time) is needed for peak RSS")
    peak = 0
    with tempfile.NamedTemporaryFile("r", prefix="rss.", dir=OUT) as out:
        for _ in range(runs):
            if case.before:
                case.before()
            timed = Case(case.name, [GNU_TIME, "-f", "%M", "-o", out.name, *case.argv],
                         case.stdin, case.env)  # fmt: skip
            _, rc, _ = spawn_and_wait(timed)
            if rc != case.expect_rc:
                raise SystemExit(f"bench: {case.name} under {GNU_TIME}: exited {rc}")
            out.seek(0)
            peak = max(peak, int(out.read().strip().splitlines()[-1]))
    return peak


def check_once(case: Case) -> str:
    """Run ``case`` with its stderr captured; the stderr text when it exits as expected,
    else raise: a benchmark of a failing command measures nothing."""
    import subprocess

    if case.before:
        case.before()
    with open(case.stdin or os.devnull, "rb") as stdin:
        done = subprocess.run(
            case.argv, stdin=stdin, capture_output=True, env=case.env, timeout=60, check=False
        )
    if done.returncode != case.expect_rc:
        raise SystemExit(
            f"bench: {case.name}: {' '.join(case.argv)} exited {done.returncode} "
            f"(expected {case.expect_rc})\nstderr: {done.stderr.decode(errors='replace')}"
        )
    return done.stderr.decode(errors="replace")


def interleave(cases: Sequence[Case], reps: int, warmup: int = 2, seed: int = 1) -> None:
    """Run every case ``reps`` times, in a fresh random order each round, so that noise on a
    shared machine falls on every case alike. Each run's exit status is checked."""
    rng = random.Random(seed)
    order = list(cases)
    for rnd in range(warmup + reps):
        rng.shuffle(order)
        for case in order:
            if case.before:
                case.before()
            elapsed, rc, _ = spawn_and_wait(case)
            if rc != case.expect_rc:
                raise SystemExit(f"bench: {case.name}: exited {rc} (expected {case.expect_rc})")
            if rnd >= warmup:
                case.times.append(elapsed)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


@dataclass
class Figure:
    """One line of the report: a measured figure, its same-run baseline, the ratio, a target."""

    name: str
    value: float
    unit: str  # "ms", "s", "MiB"
    baseline_name: str
    baseline: float
    target: float  # a bound on the ratio, or with ``absolute`` on the value in ``unit``
    target_text: str
    absolute: bool = False
    note: str = ""
    informational: bool = False  # printed, no PASS/FAIL

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("inf")

    @property
    def passed(self) -> bool:
        if self.absolute:
            return self.value < self.target
        return self.ratio <= self.target

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "baseline_name": self.baseline_name,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "target": self.target,
            "target_text": self.target_text,
            "absolute": self.absolute,
            "passed": None if self.informational else self.passed,
            "note": self.note,
        }

    @staticmethod
    def from_json(doc: dict[str, object]) -> Figure:
        return Figure(
            name=str(doc["name"]),
            value=float(doc["value"]),  # type: ignore[arg-type]
            unit=str(doc["unit"]),
            baseline_name=str(doc["baseline_name"]),
            baseline=float(doc["baseline"]),  # type: ignore[arg-type]
            target=float(doc["target"]),  # type: ignore[arg-type]
            target_text=str(doc["target_text"]),
            absolute=bool(doc.get("absolute")),
            note=str(doc.get("note", "")),
            informational=doc.get("passed") is None,
        )


def write_figures(path: Path, figures: Sequence[Figure], extra: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"figures": [f.to_json() for f in figures], **extra}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def read_figures(path: Path) -> tuple[list[Figure], dict[str, object]]:
    doc = json.loads(path.read_text())
    return [Figure.from_json(f) for f in doc.pop("figures")], doc
