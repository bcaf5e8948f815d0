"""Enforcement on a stock QEMU against ``virsh start`` of the same guest, at 1, 4 and 16 GiB.

Run by run.py as a pytest module (it reuses ``tests/libvirt/conftest.py``: the system libvirtd,
started under a prompt reaper of orphans, the hook installed, the machine lock). For each RAM size,
one TCG aarch64 guest (2 vCPUs, never run) is defined twice, identical but for its name; in every
round, in a fresh random order, the benchmark times:

- ``virsh start`` of one: the baseline, what starting this guest costs without hvcpolicy;
- the stock-QEMU cycle on the other, as one command run to its exit: paused start, save of the
  never-run guest, read (and patch) the image, paused restore with a changed XML, read-back, resume.

What that command is, is ``MEASURED`` (``HVC_BENCH_STOCK=hvcpolicy|calls``):

- ``calls``: this file run as a script
  (``--cycle``), a fresh interpreter making the libvirt calls the enforcing start makes, with
  libvirt-python: ``createWithFlags(PAUSED)``, ``saveFlags(PAUSED)``, reading and patching the
  image with ``hvcpolicy.imagefile`` (nothing to change on TCG: the parses are the cost),
  ``restoreFlags(xml, PAUSED)``, a memory-only external snapshot read back with
  ``hvcpolicy.imagefile`` as the read-back, ``resume``.
  It prints each step's time, which the report breaks down.
- ``hvcpolicy`` (the default): ``hvcpolicy start DOMAIN`` through its console script, as a host
  runs it (no breakdown: the command does not report its steps).

Each run is followed, off the clock, by ``virsh destroy`` and the removal of its images.

Environment: HVC_BENCH_STOCK_REPS (rounds, default 5), HVC_BENCH_STOCK_SIZES (GiB, default
"1,4,16"), HVC_BENCH_STOCK (above), HVC_BENCH_READBACK (``snapshot``, the default, or ``save``: a
second save and restore), HVC_BENCH_JSON (where the figures go).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

if TYPE_CHECKING:
    from common import Figure

if __name__ != "__main__":  # under pytest; the --cycle script stays as lean as a CLI would be
    sys.path.insert(0, str(HERE.parent))
    from libvirt_start import _console_script  # type: ignore[import-not-found]

    from tests.libvirt.conftest import (
        NS,
        SYSTEM_URI,
        Lab,
        lab,  # noqa: F401  (a fixture)
        system_libvirtd,  # noqa: F401  (a fixture)
    )

# The one line to switch when ``hvcpolicy start`` enforces on a stock QEMU: "hvcpolicy".
MEASURED = os.environ.get("HVC_BENCH_STOCK", "hvcpolicy")

# How the cycle reads back what QEMU holds (HVC_BENCH_READBACK): "snapshot", a memory-only external
# snapshot (QEMU stays), or "save", a second save and restore.
READBACK = os.environ.get("HVC_BENCH_READBACK", "snapshot")

STEPS = ["start paused", "save", "read+patch", "restore paused", "read-back", "resume"]
RESTORE_MARK = (
    '<metadata><bench:cycle xmlns:bench="urn:hvcpolicy:bench" restored="yes"/></metadata>'
)


def guest_xml(name: str, gib: int, meta: str = "") -> str:
    """A TCG aarch64 guest that never runs: nothing but RAM and 2 vCPUs (as the reference's)."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  {meta}
  <memory unit='GiB'>{gib}</memory>
  <vcpu>2</vcpu>
  <os><type arch='aarch64' machine='virt'>hvm</type></os>
  <cpu mode='custom' match='exact'><model fallback='forbid'>cortex-a57</model></cpu>
  <devices><console type='pty'/></devices>
</domain>
"""


def read_and_patch(image: str) -> int:
    """Read the save image and patch every vCPU in place as ``hvcpolicy start`` does
    (``hvcpolicy.imagefile``: parse the stream's tail, write the edits, parse again); -> vCPUs.
    A TCG guest's lists hold no firmware registers, so there is nothing to change: the edits are
    empty and the cost is the two parses (the writes are a few 8-byte ``pwrite`` calls)."""
    from hvcpolicy.imagefile import patch_image, read_image

    before = read_image(image)
    after = patch_image(image, {}, expect=before)
    return len(after.stream.vcpus)


def read_back_image(image: str) -> int:
    """Read the read-back image as the check after the restore does; -> vCPUs."""
    from hvcpolicy.imagefile import read_image

    return len(read_image(image).stream.vcpus)


def cycle(uri: str, name: str, workdir: str) -> dict[str, float]:
    """The stock-QEMU enforcement cycle through libvirt-python; -> seconds per step."""
    import libvirt

    steps: dict[str, float] = {}
    image = os.path.join(workdir, f"{name}.save")
    readback = os.path.join(workdir, f"{name}.mem")

    def step(label: str, fn: object) -> None:
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        steps[label] = time.perf_counter() - t0

    conn = libvirt.open(uri)
    dom = conn.lookupByName(name)
    step("start paused", lambda: dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED))
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_MIGRATABLE)
    step("save", lambda: dom.saveFlags(image, None, libvirt.VIR_DOMAIN_SAVE_PAUSED))
    step("read+patch", lambda: read_and_patch(image))
    changed = xml.replace("</name>", "</name>" + RESTORE_MARK, 1)
    step(
        "restore paused", lambda: conn.restoreFlags(image, changed, libvirt.VIR_DOMAIN_SAVE_PAUSED)
    )
    dom = conn.lookupByName(name)
    snap = (
        f"<domainsnapshot><memory snapshot='external' file='{readback}'/><disks/></domainsnapshot>"
    )

    def read_back() -> None:
        nonlocal dom
        if READBACK == "save":  # the other way: a second save, read, and a second restore
            dom.saveFlags(readback, None, libvirt.VIR_DOMAIN_SAVE_PAUSED)
            read_back_image(readback)
            conn.restoreFlags(readback, None, libvirt.VIR_DOMAIN_SAVE_PAUSED)
            dom = conn.lookupByName(name)
            return
        # QEMU keeps running (paused): a memory-only snapshot writes the same stream as a save
        dom.snapshotCreateXML(snap, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
        read_back_image(readback)

    step("read-back", read_back)
    step("resume", lambda: dom.resume())
    for path in (image, readback):
        os.unlink(path)
    return steps


def _spread(values: list[float]) -> str:
    return f"{min(values) * 1000:.0f}-{max(values) * 1000:.0f}"


def _virsh(uri: str, *args: str, check: bool = True) -> str:
    done = subprocess.run(
        ["virsh", "-q", "-c", uri, *args], capture_output=True, text=True, timeout=120
    )
    if check and done.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {done.returncode} {done.stderr}")
    return done.stdout


Totals = dict[tuple[int, str], list[float]]
Steps = dict[int, dict[str, list[float]]]


def measure(
    uri: str, workdir: Path, sizes: list[int], reps: int, measured_cmd: list[str],
    env: dict[str, str], meta: str = "",
) -> tuple[Totals, Steps]:  # fmt: skip
    """Interleaved rounds of ``virsh start`` (``v``) and the measured command (``c``, run as
    ``measured_cmd + [DOMAIN, WORKDIR]`` when it is the cycle, ``+ [DOMAIN]`` otherwise) per size;
    -> the seconds of every run, and the cycle's own steps."""
    cycle_cmd = MEASURED == "calls"
    tag = os.urandom(3).hex()
    names = {g: (f"hvct-stock-{g}g-{tag}", f"hvct-stock-plain-{g}g-{tag}") for g in sizes}
    for gib, (measured, plain) in names.items():
        for name in (measured, plain):
            xml = workdir / f"{name}.xml"
            xml.write_text(guest_xml(name, gib, meta if name == measured else ""))
            _virsh(uri, "define", str(xml))
    totals: Totals = {(g, w): [] for g in sizes for w in ("v", "c")}
    steps: Steps = {g: {s: [] for s in STEPS} for g in sizes}
    rng = random.Random(13)
    try:
        for rnd in range(reps + 1):  # round 0 warms up (QEMU's first starts, the page cache)
            order = [(g, w) for g in sizes for w in ("v", "c")]
            rng.shuffle(order)
            for gib, which in order:
                measured, plain = names[gib]
                name = plain if which == "v" else measured
                if which == "v":
                    cmd = ["virsh", "-q", "-c", uri, "start", plain]
                else:
                    cmd = [*measured_cmd, measured] + ([str(workdir)] if cycle_cmd else [])
                try:
                    t0 = time.perf_counter()
                    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
                    elapsed = time.perf_counter() - t0
                    assert done.returncode == 0, f"{cmd}: {done.returncode} {done.stderr}"
                    state = _virsh(uri, "domstate", name).strip()
                    assert state == "running", f"{name} is {state} after {cmd}"
                    if which == "c" and cycle_cmd:
                        live = _virsh(uri, "dumpxml", name)
                        assert 'restored="yes"' in live, "the restore did not take the new XML"
                    if rnd:
                        totals[(gib, which)].append(elapsed)
                        if which == "c" and cycle_cmd:
                            for label, sec in json.loads(done.stdout).items():
                                steps[gib][label].append(sec)
                finally:
                    _virsh(uri, "destroy", name, check=False)
                    for leftover in workdir.glob(f"{name}.*"):
                        if leftover.suffix != ".xml":
                            leftover.unlink()
    finally:
        for measured, plain in names.values():
            for name in (measured, plain):
                _virsh(uri, "destroy", name, check=False)
                _virsh(uri, "undefine", name, check=False)
    return totals, steps


def figures_and_report(
    totals: Totals, steps: Steps, sizes: list[int], reps: int, daemon: str
) -> tuple[list[Figure], list[str]]:
    from common import Figure

    med = {k: statistics.median(v) * 1000 for k, v in totals.items()}
    what = (
        "hvcpolicy start"
        if MEASURED == "hvcpolicy"
        else f"stock cycle (libvirt calls, read-back by {READBACK})"
    )
    figures = [
        Figure(
            f"{what}, {g} GiB TCG guest", med[(g, "c")], "ms",
            f"virsh start ({g} GiB, same guest)", med[(g, "v")], 4.0, "<= 4x",
            informational=g != 4,
        )
        for g in sizes
    ]  # fmt: skip
    report = [
        f"{what} against virsh start, {reps} rounds; libvirtd {daemon}",
        "| GiB | virsh start | cycle | ratio | " + " | ".join(STEPS) + " |",
        "|---|---|---|---|" + "---|" * len(STEPS),
    ]
    for g in sizes:
        v, c = totals[(g, "v")], totals[(g, "c")]
        cells = [
            f"{statistics.median(steps[g][s]) * 1000:.0f}" if steps[g][s] else "-" for s in STEPS
        ]
        report.append(
            f"| {g} | {med[(g, 'v')]:.0f} ({_spread(v)}) | {med[(g, 'c')]:.0f} ({_spread(c)}) "
            f"| {med[(g, 'c')] / med[(g, 'v')]:.2f}x | " + " | ".join(cells) + " |"
        )
    report.append("(ms: medians, the range over the rounds in brackets; steps are medians too)")
    if len(sizes) > 1:
        lo, hi = min(sizes), max(sizes)
        extra = ((med[(hi, "c")] - med[(hi, "v")]) - (med[(lo, "c")] - med[(lo, "v")])) / (hi - lo)
        slope_v = (med[(hi, "v")] - med[(lo, "v")]) / (hi - lo)
        figures.append(
            Figure(
                f"{what}: more than virsh start per extra GiB ({lo}->{hi} GiB)", extra, "ms",
                "virsh start's own cost per extra GiB", slope_v, 60.0, "< 60 ms", absolute=True,
            )
        )  # fmt: skip
    return figures, report


def reaped_promptly(pid: int) -> str:
    """How the daemon's QEMUs are reaped: under a subreaper (its parent is not PID 1) or not."""
    ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    return "under a prompt reaper" if ppid != "1" else "reaped by PID 1 (see PERFORMANCE.md)"


def _settings() -> tuple[int, list[int]]:
    reps = int(os.environ.get("HVC_BENCH_STOCK_REPS", "5"))
    sizes = [int(s) for s in os.environ.get("HVC_BENCH_STOCK_SIZES", "1,4,16").split(",")]
    return reps, sizes


def test_stock_start_vs_virsh_start(lab: Lab, system_libvirtd: object) -> None:
    reps, sizes = _settings()
    out = Path(os.environ.get("HVC_BENCH_JSON", str(HERE / "out" / "stock.json")))
    daemon = reaped_promptly(int(Path("/run/libvirtd.pid").read_text()))
    workdir = Path("/var/lib/libvirt/qemu/save/hvcpolicy-bench")
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, str(HERE / "stock_start.py"), "--cycle", SYSTEM_URI]
    meta = ""
    if MEASURED == "hvcpolicy":  # as a host runs it: the console script over the lab's copy
        cmd = [str(_console_script(lab)), "start", "--connect", SYSTEM_URI]
        env = lab.env()
        # ptp denied: the host snapshot predicts a write, so start takes the save path (the one
        # that costs); nothing required, since a TCG guest's stream has no firmware registers
        lab.write_policy("bench-stock", {"features": {"ptp": "deny"}, "unknown": "allow"})
        meta = f'<metadata><hvc:policy xmlns:hvc="{NS}" ref="bench-stock"/></metadata>'
    try:
        totals, steps = measure(SYSTEM_URI, workdir, sizes, reps, cmd, env, meta)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    figures, report = figures_and_report(totals, steps, sizes, reps, daemon)
    extra = {"reps": reps, "report": report, "steps": steps,
             "timings": {f"{g}:{w}": t for (g, w), t in totals.items()}}  # fmt: skip
    from common import write_figures

    write_figures(out, figures, extra)


def _standalone(uri: str, workdir: str, pidfile: str) -> None:
    """Measure against any libvirtd (a private one, say), without the test harness."""
    reps, sizes = _settings()
    cmd = [sys.executable, str(HERE / "stock_start.py"), "--cycle", uri]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    totals, steps = measure(uri, Path(workdir), sizes, reps, cmd, env)
    _, report = figures_and_report(totals, steps, sizes, reps, reaped_promptly(
        int(Path(pidfile).read_text())))  # fmt: skip
    print("\n".join(report))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--cycle"] and len(sys.argv) == 5:
        print(json.dumps(cycle(sys.argv[2], sys.argv[3], sys.argv[4])))
    elif sys.argv[1:2] == ["--standalone"] and len(sys.argv) == 5:
        _standalone(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(
            "usage: stock_start.py --cycle URI DOMAIN WORKDIR | --standalone URI WORKDIR PIDFILE"
        )
