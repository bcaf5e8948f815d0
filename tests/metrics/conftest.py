"""tests/metrics: hvcpolicy in Prometheus, read back through a real node_exporter.

The libvirt part uses the libvirt tests' harness (tests/libvirt/conftest.py), wrapped at package
scope as tests/daytwo does: this package's daemon and hook are set up and torn down around
tests/metrics alone, and only for the tests that ask for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.libvirt import conftest as harness


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
