#!/usr/bin/env python3
"""Copy the snapshots the lab probed into the project's fixtures (tests/fixtures/lab/).

    python3 lab/run.py && python3 lab/refresh_fixtures.py

Each ``lab/build/out/<release>/host.json`` becomes ``tests/fixtures/lab/debian-<label>.json``
(label as in lab/build.py: 6.1, 6.12, 6.18, 7.x), with the host named after the label.
tests/lab/test_probe.py fails when a fresh probe no longer matches its fixture.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LAB = Path(__file__).resolve().parent
FIXTURES = LAB.parent / "tests" / "fixtures" / "lab"


def main() -> int:
    kernels = json.loads((LAB / "build" / "kernels.json").read_text())
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for k in kernels:
        probed = json.loads((LAB / "build" / "out" / k["release"] / "host.json").read_text())
        probed["host"] = f"lab-debian-{k['label'].replace('.', '-')}"
        dest = FIXTURES / f"debian-{k['label']}.json"
        dest.write_text(json.dumps(probed, indent=2) + "\n")
        print(f"{dest.relative_to(LAB.parent)}: {k['release']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
