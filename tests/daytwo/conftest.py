"""tests/daytwo: the operator's day two (diff, status, completion and man page, pre-commit).

``status`` is tested against the real libvirtd of the libvirt tests: their fixtures are reused
from tests/libvirt/conftest.py (one harness, one way to start and stop the daemons).
"""

from __future__ import annotations

import pytest

from tests.libvirt.conftest import guest_factory, lab, system_libvirtd

__all__ = ["guest_factory", "lab", "system_libvirtd"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "contract: a CLI rule every command module must keep; a failure lists the offenders",
    )
