"""hvcpolicy's benchmark: what the libvirt hook costs, ``hvcpolicy start``, the fleet commands.

    python3 bench/run.py            # everything (as root: the hook part and libvirtd need it)
    python3 bench/run.py --quick    # a few repetitions, no libvirtd (CI's smoke test)

Every figure is printed next to a baseline measured in the same run, interleaved with it, as a
median and a ratio, with its target and PASS or FAIL. The parts:

- ``bench/hookbench.py``: the hook as libvirtd runs it, for an ignored stage and domain (against
  ``sh -c 'cat >/dev/null'``), ``prepare``/``migrate``/``restore`` (against
  ``python3 -I -S -c pass``), the QMP stages ``started`` with 1, 8 and 64 vCPUs and ``reconnect``
  (against ``python3 -I -S -c 'import qemu.qmp'``), and its peak RSS;
- ``bench/fleetbench.py``: ``baseline`` and ``matrix`` over 10,000 generated host snapshots;
- ``bench/libvirt_start.py``: ``hvcpolicy start`` against ``virsh start`` on a real libvirtd.

Results: printed, and written to ``bench/out/results.json`` and ``bench/out/results.md``.
Exit status: 0 every target holds, 1 some target does not, 2 a part could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import OUT, REPO, Figure, read_figures  # noqa: E402


def run_part(
    name: str, cmd: list[str], json_out: Path, timeout: float, env: dict[str, str]
) -> str | None:
    """Run one part; -> None when it wrote its figures, else why not."""
    json_out.unlink(missing_ok=True)
    print(f"-- {name}: {' '.join(cmd[:3])} ...", flush=True)
    t0 = time.monotonic()
    try:
        done = subprocess.run(
            cmd, env=env, cwd=REPO, timeout=timeout, capture_output=True, text=True
        )
    except subprocess.TimeoutExpired:
        return f"{name}: did not finish in {timeout:.0f} s"
    print(f"   {name} done in {time.monotonic() - t0:.1f} s (exit {done.returncode})", flush=True)
    if done.returncode != 0 or not json_out.exists():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        return f"{name}: exited {done.returncode}\n{tail}"
    return None


LEGEND = (
    "(medians; ratio = median / same-run baseline median; 'info' rows are measured for "
    "comparison and have no target of their own: the target shown is the one its sibling row has)"
)


def libvirt_missing() -> str | None:
    if os.geteuid() != 0:
        return "not root (the system libvirtd and the hook need it)"
    for tool in ("/usr/sbin/libvirtd", "virsh", "qemu-system-aarch64"):
        if not (os.path.exists(tool) if tool.startswith("/") else shutil.which(tool)):
            return f"{tool} is not installed"
    return None


def fmt_value(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    return f"{value:.1f} {unit}"


def table(figures: list[Figure]) -> list[str]:
    head = ["figure", "median", "baseline (same run)", "baseline", "ratio", "target", "result"]
    rows = [head]
    for f in figures:
        result = "info" if f.informational else ("PASS" if f.passed else "FAIL")
        rows.append(
            [f.name, fmt_value(f.value, f.unit), f.baseline_name, fmt_value(f.baseline, f.unit),
             f"{f.ratio:.2f}x", f.target_text, result]
        )  # fmt: skip
    return (
        ["| " + " | ".join(r) + " |" for r in rows[:1]]
        + ["|" + "|".join("---" for _ in head) + "|"]
        + ["| " + " | ".join(r) + " |" for r in rows[1:]]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few repetitions, skip libvirtd")
    ap.add_argument("--reps", type=int, help="rounds for the hook part (default 40, quick 3)")
    ap.add_argument("--no-libvirt", action="store_true", help="skip the libvirtd part")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    hook_reps = args.reps or (3 if args.quick else 40)
    fleet_reps = 1 if args.quick else 5
    libvirt_reps = 12
    hosts = 2000 if args.quick else 10000
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    py = sys.executable
    hook_cmd = [py, str(HERE / "hookbench.py"), "--reps", str(hook_reps)]
    fleet_cmd = [py, str(HERE / "fleetbench.py"), "--reps", str(fleet_reps), "--hosts", str(hosts)]
    parts: list[tuple[str, list[str], Path, float]] = [
        ("hook", [*hook_cmd, "--json", str(OUT / "hook.json")], OUT / "hook.json", 900),
        ("fleet", [*fleet_cmd, "--json", str(OUT / "fleet.json")], OUT / "fleet.json", 900),
    ]
    skipped: list[str] = []
    why = "--quick" if args.quick else "--no-libvirt" if args.no_libvirt else libvirt_missing()
    if why is None:
        pytest = [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
        libvirt_cmd = [*pytest, str(HERE / "libvirt_start.py")]
        parts.append(("libvirt", libvirt_cmd, OUT / "libvirt.json", 1200))
    else:
        skipped.append(f"hvcpolicy start vs virsh start: SKIPPED ({why})")
    figures: list[Figure] = []
    errors: list[str] = []
    for name, cmd, out, timeout in parts:
        part_env = {**env, "HVC_BENCH_REPS": str(libvirt_reps), "HVC_BENCH_JSON": str(out)}
        err = run_part(name, cmd, out, timeout, part_env)
        if err is not None:
            errors.append(err)
            continue
        figs, _ = read_figures(out)
        figures += figs
    lines = table(figures)
    info = (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.node()}; "
        f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}; hook rounds {hook_reps}, "
        f"fleet rounds {fleet_reps} over {hosts} hosts"
        + (f", libvirt rounds {libvirt_reps}" if why is None else "")
        + ("; quick" if args.quick else "")
    )
    print()
    print(info)
    print("\n".join(lines))
    print(LEGEND)
    for s in skipped:
        print(s)
    for e in errors:
        print(f"ERROR {e}")
    failed = [f.name for f in figures if not f.informational and not f.passed]
    verdict = (
        "ERROR: some parts did not run" if errors
        else f"FAIL: {len(failed)} target(s) missed" if failed
        else "PASS: every target holds" + (" (libvirt part skipped)" if skipped else "")
    )  # fmt: skip
    print(verdict)
    (OUT / "results.md").write_text(
        "\n".join([info, "", *lines, "", LEGEND, *skipped, verdict]) + "\n"
    )
    (OUT / "results.json").write_text(
        json.dumps(
            {"info": info, "figures": [f.to_json() for f in figures], "skipped": skipped,
             "errors": errors, "verdict": verdict},
            indent=2,
        ) + "\n"
    )  # fmt: skip
    return 2 if errors else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
