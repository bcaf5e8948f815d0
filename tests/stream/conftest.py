"""Real QEMU streams, made once per run by qemu-system-aarch64 (TCG): a never-run guest with
2 vCPUs, and the same stream with KVM's firmware registers put into every vCPU's list."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stream.qemulib import save_stream
from tests.stream.streamlib import KERNEL_618, with_firmware


@pytest.fixture(scope="session")
def stream_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("streams")


@pytest.fixture(scope="session")
def real_stream(stream_dir: Path) -> bytes:
    """A real QEMU 7.2 stream: virt, -cpu max, -smp 2, 128 MiB, never run (-S)."""
    return save_stream(stream_dir / "real.bin").read_bytes()


@pytest.fixture(scope="session")
def fw_stream(real_stream: bytes) -> bytes:
    """The real stream with a 6.18 kernel's firmware registers in both vCPUs' lists."""
    return with_firmware(real_stream, KERNEL_618)
