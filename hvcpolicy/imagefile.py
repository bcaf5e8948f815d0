"""Saved guests on disk: read a libvirt save image or a QEMU stream file, patch it in place.

The thin I/O adapter over :mod:`hvcpolicy.saveimage` and :mod:`hvcpolicy.stream`. Files are opened
without following links and read with ``pread`` (the header, the XML and the stream's tail only:
never the RAM, never ``mmap``, which would SIGBUS if someone truncated the file). A patch writes
only the changed 8-byte values (so a sparse image stays sparse), checks each old value just before
overwriting it, fsyncs, then reads the image again and checks every vCPU holds the new values; any
failure puts back what was written before raising, so no half-patched image is left.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct

from hvcpolicy import catalogue as cat
from hvcpolicy.errors import InvalidInput, Unavailable
from hvcpolicy.saveimage import Image, parse_image

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from hvcpolicy.stream import Edit

_MAX_READ = 256 << 20


class FileView:
    """A read-only ``Buffer`` over an open file: slices are read with ``pread`` on demand."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: slice, /) -> bytes:
        start, stop, _ = index.indices(self.size)
        if stop - start > _MAX_READ:
            raise InvalidInput(f"a read of {stop - start} bytes: larger than {_MAX_READ}")
        chunks = []
        while start < stop:
            data = os.pread(self.fd, stop - start, start)
            if not data:
                break  # the file shrank: the parser sees a short read and says truncated
            chunks.append(data)
            start += len(data)
        return b"".join(chunks)


def _open(path: str, write: bool) -> tuple[int, int]:
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise InvalidInput(f"cannot open: {err.strerror}", path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput("not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _parse(fd: int, size: int, path: str) -> Image:
    try:
        return parse_image(FileView(fd, size), path)
    except OSError as err:
        raise InvalidInput(f"cannot read: {err.strerror}", path) from None


def read_image(path: str) -> Image:
    """The saved guest in ``path`` (libvirt save image or bare QEMU stream); InvalidInput (exit 4)
    naming the file for anything unreadable, partial, compressed or unaccounted for."""
    fd, size = _open(path, write=False)
    try:
        return _parse(fd, size, path)
    finally:
        os.close(fd)


def _same_layout(a: Image, b: Image) -> bool:
    return a.save == b.save and [
        (c.instance_id, c.ids_offset, c.values_offset, c.registers) for c in a.stream.vcpus
    ] == [(c.instance_id, c.ids_offset, c.values_offset, c.registers) for c in b.stream.vcpus]


def patch_image(
    path: str,
    changes: Mapping[int, int],
    *,
    expect: Image | None = None,
    any_register: bool = False,
) -> Image:
    """Give every vCPU of the saved guest in ``path`` these register values, in place; returns
    the image as read back afterwards. ``expect``: the image as read before (``read_image``); a
    file that no longer matches it is refused (someone else changed it). Only firmware registers,
    unless ``any_register`` (tests). Raises InvalidInput (exit 4) for a bad or changed image,
    Unavailable (exit 5) when a write fails; either way the file is left as it was."""
    fd, size = _open(path, write=True)
    try:
        image = _parse(fd, size, path)
        if expect is not None and not _same_layout(image, expect):
            raise InvalidInput("changed since it was read: not patched", path)
        edits = image.stream.edits(changes, any_register=any_register)
        _write(fd, path, edits)
        after = _parse(fd, os.fstat(fd).st_size, path)
        for cpu in after.stream.vcpus:
            for rid, value in changes.items():
                if cpu.registers.get(rid) != value:
                    _undo(fd, edits)
                    raise InvalidInput(
                        f"vCPU {cpu.instance_id} {cat.reg_name(rid)} reads back "
                        f"{cat.fmt_value(cpu.registers.get(rid, 0))} after the patch, not "
                        f"{cat.fmt_value(value)}: restored the old values",
                        path,
                    )
        return after
    finally:
        os.close(fd)


def _write(fd: int, path: str, edits: list[Edit]) -> None:
    done: list[Edit] = []
    try:
        for e in edits:
            current = os.pread(fd, 8, e.offset)
            if len(current) != 8 or struct.unpack(">Q", current)[0] != e.old:
                _undo(fd, done)
                raise InvalidInput(
                    f"vCPU {e.vcpu} {cat.reg_name(e.register)} changed under the patch "
                    "(someone else writes this file): restored the old values",
                    path,
                )
            if os.pwrite(fd, struct.pack(">Q", e.new), e.offset) != 8:
                raise OSError(0, "short write")
            done.append(e)
        os.fsync(fd)
    except OSError as err:
        _undo(fd, done + [e for e in edits if e not in done][:1])
        raise Unavailable(
            f"{path}: cannot write: {err.strerror}: restored the old values"
        ) from None


def _undo(fd: int, edits: list[Edit]) -> None:
    """Put the old values back (best effort: the caller raises either way)."""
    for e in edits:
        with contextlib.suppress(OSError):
            os.pwrite(fd, struct.pack(">Q", e.old), e.offset)
    with contextlib.suppress(OSError):
        os.fsync(fd)
