"""tests/daytwo: the operator's day two (diff, status, completion and man page, pre-commit)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "contract: a CLI rule every command module must keep; a failure lists the offenders",
    )
