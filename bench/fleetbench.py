"""``hvcpolicy baseline`` and ``hvcpolicy matrix`` over a generated fleet of 10,000 hosts.

The fleet is generated at run time into ``bench/out/fleet/`` (gitignored) from the real host
fixtures in ``examples/hosts`` and ``examples/fleet``: four kernel generations on two CPU types,
each with a few point releases and QEMU versions, weighted as a fleet mid-upgrade is, plus a few
odd hosts (a missing register, a bit a newer kernel added, a lower PSCI version, a mitigation
reported as not available). Both commands are timed as an operator runs them, the whole CLI in
a fresh process, against the floor of merely ``json.load``-ing the same files in one process.

Usage (run.py does this): ``python3 bench/fleetbench.py --hosts 10000 --reps N --json OUT``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, REPO, Case, Figure, interleave, median, write_figures

# (fixture, weight, point releases of that kernel seen in the fleet, QEMU versions)
GENERATIONS = [
    ("neoverse-n1_linux-6.1.json", 30, ["6.1.172-216.329", "6.1.170-210.320", "6.1.0-18"],
     ["7.2.0", "8.2.2", "11.1.0"]),
    ("neoverse-v1_linux-6.1.json", 20, ["6.1.172-216.329", "6.1.0-21"], ["8.2.2", "11.1.0"]),
    ("neoverse-n1_linux-6.18.json", 15, ["6.18.30-61.116"], ["11.1.0"]),
    ("neoverse-v1_linux-6.18.json", 15, ["6.18.30-61.116", "6.18.28-60.101"], ["11.1.0", "10.0.3"]),
    ("neoverse-n1_linux-5.10.json", 10, ["5.10.255-253.1008", "5.10.240-238.959"], ["7.2.0"]),
    ("neoverse-v1_linux-5.10.json", 6, ["5.10.255-253.1008"], ["7.2.0", "8.2.2"]),
    ("neoverse-n1_linux-4.14.json", 2, ["4.14.336-257.568"], [None]),
    ("neoverse-v1_linux-4.14.json", 2, ["4.14.336-257.568"], [None]),
]  # fmt: skip
ODD_EVERY = 997  # about ten odd hosts in 10,000


def odd(doc: dict[str, object], rng: random.Random) -> None:
    regs = doc["registers"]
    assert isinstance(regs, dict)
    kind = rng.randrange(4)
    if kind == 0 and "0x6030000000160003" in regs:  # a kernel built without a service
        del regs["0x6030000000160003"]
    elif kind == 1 and "0x6030000000160002" in regs:  # a backport added a vendor bit
        regs["0x6030000000160002"] = hex(int(regs["0x6030000000160002"], 16) | 0x10)
    elif kind == 2 and "0x6030000000140000" in regs:  # PSCI capped at 1.0
        regs["0x6030000000140000"] = "0x10000"
    elif "0x6030000000140001" in regs:  # SMCCC_ARCH_WORKAROUND_1 not available
        regs["0x6030000000140001"] = "0x0"


def generate(dest: Path, hosts: int, seed: int = 2026) -> list[str]:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    rng = random.Random(seed)
    hosts_dir = REPO / "examples" / "hosts"
    fixtures = {g[0]: json.loads((hosts_dir / g[0]).read_text()) for g in GENERATIONS}
    weights = [g[1] for g in GENERATIONS]
    paths = []
    for i in range(hosts):
        fixture, _, releases, qemus = rng.choices(GENERATIONS, weights)[0]
        doc = json.loads(json.dumps(fixtures[fixture]))
        name = f"node-{i:05d}"
        doc["host"] = name
        old = fixture.endswith(("5.10.json", "4.14.json"))
        doc["kernel"] = rng.choice(releases) + (".amzn2.aarch64" if old else ".amzn2023.aarch64")
        day, hour, minute = rng.randint(1, 24), rng.randint(0, 23), rng.randint(0, 59)
        doc["taken"] = f"2026-11-{day:02d}T{hour:02d}:{minute:02d}:00Z"
        doc["source"] = "kvm"
        qemu = rng.choice(qemus)
        if qemu is not None:
            doc["qemu"] = qemu
        if i % ODD_EVERY == ODD_EVERY - 1:
            odd(doc, rng)
        path = dest / f"{name}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        paths.append(str(path))
    return paths


LOAD_ALL = "import json,sys\nfor p in sys.argv[1:]:\n    with open(p,'rb') as f: json.load(f)\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=10000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=OUT / "fleet.json")
    args = ap.parse_args()
    paths = generate(OUT / "fleet", args.hosts)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "LC_ALL": "C.UTF-8", "HOME": "/"}
    py = sys.executable
    policy = str(REPO / "examples" / "policies" / "fleet-2026.yaml")
    floor = Case(f"json.load of the {args.hosts} files", [py, "-c", LOAD_ALL, *paths], None, env)
    base = Case(
        f"baseline of {args.hosts} snapshots",
        [py, "-m", "hvcpolicy", "baseline", *paths],
        None,
        env,
    )
    matrix = Case(
        f"matrix of {args.hosts} hosts",
        [py, "-m", "hvcpolicy", "matrix", "--policy", policy, *paths], None, env,
    )  # fmt: skip
    matrix_json = Case(
        f"matrix --format json of {args.hosts} hosts",
        [py, "-m", "hvcpolicy", "matrix", "--format", "json", "--policy", policy, *paths],
        None, env,
    )  # fmt: skip
    cases = [floor, base, matrix, matrix_json]
    classes = check(base, matrix_json, args.hosts)
    interleave(cases, args.reps, warmup=1)
    figs = [
        Figure(c.name, median(c.times), "s", floor.name, median(floor.times), 2.0, "< 2 s",
               absolute=True, informational=c is matrix_json)
        for c in (base, matrix, matrix_json)
    ]  # fmt: skip
    extra = {"reps": args.reps, "hosts": args.hosts, "classes": classes}
    extra["timings"] = {c.name: c.times for c in cases}
    write_figures(args.json, figs, extra)
    return 0


def check(base: Case, matrix: Case, hosts: int) -> int:
    """Each command must succeed and answer for every host; -> the number of host classes."""
    done = subprocess.run(base.argv, env=base.env, capture_output=True, timeout=120, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench: baseline failed: {done.stderr.decode(errors='replace')}")
    doc = json.loads(done.stdout)
    assert doc["source"] == "baseline" and doc["registers"], doc
    done = subprocess.run(
        matrix.argv, env=matrix.env, capture_output=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"bench: matrix failed: {done.stderr.decode(errors='replace')}")
    doc = json.loads(done.stdout)
    assert sum(len(c["hosts"]) for c in doc["classes"]) == hosts, "matrix lost hosts"
    return len(doc["classes"])


if __name__ == "__main__":
    sys.exit(main())
