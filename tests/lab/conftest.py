"""The arm64 KVM lab, once per test session: build it, boot every kernel, collect the answers.

The lab is built and run by the tests themselves (``python3 lab/run.py``: lab/build.py, then every
kernel booted under TCG once per phase: probe + conformance + migration sources, the same on a
cortex-a72, migration destinations, and the stream backend with the SMCCC probe guest, by QMP
and through libvirtd). It is never skipped: without root, the host tools or the Debian mirror,
the session fixture fails and names what is missing.

Runs serialize on a lock, and each phase's answers from an earlier run of the same build are
reused when none of that phase's inputs changed (``lab/run.py --if-stale``, lab/run.py's
INPUTS); a fresh checkout, as in CI, always builds and boots everything. ``HVCLAB_FRESH=1``
forces a new run; ``HVCLAB_REUSE=1`` takes lab/build/out as it is, without looking (only for
working on these tests by hand).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.lab.labdata import LAB, LABELS, OUT, REPO, LabKernel


@pytest.fixture(scope="session")
def lab() -> dict[str, LabKernel]:
    cmd = [sys.executable, str(LAB / "run.py")]
    if os.environ.get("HVCLAB_FRESH") != "1":
        cmd.append("--if-stale")
    if os.environ.get("HVCLAB_REUSE") != "1":
        proc = subprocess.run(cmd, cwd=REPO, check=False)
        assert proc.returncode == 0, "the lab failed to build or boot (see its output above)"
    assert (OUT / "timings.json").exists()
    kernels = json.loads((LAB / "build" / "kernels.json").read_text())
    result = {}
    for info in kernels:
        k = LabKernel(info["label"], info["release"], OUT / info["release"], info)
        result[k.label] = k
    assert sorted(result) == sorted(LABELS)
    return result
