"""Fixtures for the QMP adapter tests (real QEMU and hand-made servers)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path holds 108 bytes; pytest's tmp_path may not)."""
    path = Path(tempfile.mkdtemp(prefix="hvq-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
