"""Hardening suites: print the fuzzing figures (inputs, tracebacks, hangs) at the end of the run."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hardening.fuzzlib import FIGURES

# Suites whose inputs are fuzzed inputs (the others count runs, scenarios or reads).
FUZZ_SUITES = ("parsers/", "hypothesis/", "cli/", "hook-input/", "hostile-xml", "qmp-replies/")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    tr = terminalreporter
    tr.section("hvcpolicy hardening figures")
    total_in = total_tb = total_hang = 0
    for suite, fig in sorted(FIGURES.items()):
        tr.write_line(
            f"{suite:<34} inputs {fig.inputs:>8}  tracebacks {fig.tracebacks:>3}  "
            f"hangs {fig.hangs:>3}  {fig.seconds:7.1f} s"
        )
        if suite.startswith(FUZZ_SUITES):
            total_in += fig.inputs
            total_tb += fig.tracebacks
            total_hang += fig.hangs
    tr.write_line(
        f"{'TOTAL fuzzed (parsers, CLI, hook, QMP)':<34} inputs {total_in:>8}  "
        f"tracebacks {total_tb:>3}  hangs {total_hang:>3}"
    )


@pytest.fixture
def trusted_tmp() -> Iterator[Path]:
    """A scratch directory that root's StrictModes checks accept (hvcpolicy.trust): under a
    root-owned 0755 directory (/run), not /tmp (1777), when running as root."""
    base = "/run" if os.geteuid() == 0 and os.access("/run", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="hvcpolicy-test-", dir=base))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
