"""tests/daytwo: the operator's day two (diff, status, completion and man page, pre-commit).

``status`` is tested against the real libvirtd of the libvirt tests, through their harness
(tests/libvirt/conftest.py: one way to start and stop the daemons). Its fixtures are
session-scoped there; here they are wrapped at package scope, so that this package's daemon and
hook are set up and torn down around tests/daytwo alone, and tests/libvirt, run later in the same
session, still starts (and owns) its own libvirtd.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.libvirt import conftest as harness


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "contract: a CLI rule every command module must keep; a failure lists the offenders",
    )


@pytest.fixture(scope="package")
def lab() -> Iterator[harness.Lab]:
    yield from harness.lab.__wrapped__()


@pytest.fixture(scope="package")
def system_libvirtd(lab: harness.Lab) -> Iterator[harness.Daemon]:
    yield from harness.system_libvirtd.__wrapped__(lab)


@pytest.fixture()
def guest_factory(
    lab: harness.Lab, system_libvirtd: harness.Daemon
) -> Iterator[Callable[..., harness.Guest]]:
    yield from harness.guest_factory.__wrapped__(lab, system_libvirtd)
