"""The arm64 KVM lab, once per test session: build it, boot every kernel, collect the answers.

The lab is built and run by the tests themselves (``python3 lab/run.py``: lab/build.py, then every
kernel booted under TCG twice: probe + conformance + migration sources, then migration
destinations). It is never skipped: without root, the host tools or the Debian mirror, the
session fixture fails and names what is missing.

``HVCLAB_REUSE=1`` reuses lab/build/out from an earlier run (for working on the tests by hand).
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
    reuse = os.environ.get("HVCLAB_REUSE") == "1" and (OUT / "timings.json").exists()
    if not reuse:
        proc = subprocess.run([sys.executable, str(LAB / "run.py")], cwd=REPO, check=False)
        assert proc.returncode == 0, "the lab failed to build or boot (see its output above)"
    kernels = json.loads((LAB / "build" / "kernels.json").read_text())
    result = {}
    for info in kernels:
        k = LabKernel(info["label"], info["release"], OUT / info["release"], info)
        result[k.label] = k
    assert sorted(result) == sorted(LABELS)
    return result
