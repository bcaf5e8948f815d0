"""hvcpolicy.saveimage: libvirt's header around real QEMU streams (the real ``virsh save`` images
are in tests/libvirt/test_save_image.py): raw and sparse read, every refusal named."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from hvcpolicy.errors import InvalidInput
from hvcpolicy.imagefile import patch_image, read_image
from hvcpolicy.saveimage import parse_image
from tests.stream.streamlib import KERNEL_618, PSCI, save_header


def test_raw_and_sparse_images(fw_stream: bytes) -> None:
    for fmt, kind in ((0, "libvirt-raw"), (6, "libvirt-sparse")):
        data = save_header(fw_stream, fmt=fmt, was_running=1)
        image = parse_image(data, "web1.save")
        assert image.kind == kind and image.save is not None
        assert image.save.xml == "<domain type='kvm'><name>web1</name></domain>"
        assert image.save.was_running is True and image.save.version == 2
        assert image.stream.start == 92 + 65536 == image.save.stream_offset
        assert image.stream.firmware() == KERNEL_618
        assert all(c.ids_offset > image.stream.start for c in image.stream.vcpus)


def test_bare_stream(fw_stream: bytes) -> None:
    image = parse_image(fw_stream, "s.bin")
    assert image.save is None and image.kind == "qemu-stream"


def test_other_byte_order(fw_stream: bytes) -> None:
    image = parse_image(save_header(fw_stream, order=">"), "be.save")
    assert image.save is not None and image.save.data_len == 65536
    assert image.stream.firmware() == KERNEL_618


def test_patch_a_save_image_in_place(fw_stream: bytes, tmp_path: Path) -> None:
    path = tmp_path / "web1.save"
    path.write_bytes(save_header(fw_stream, fmt=6))
    before = read_image(str(path))
    after = patch_image(str(path), {PSCI: 0x10001}, expect=before)
    assert [c.firmware[PSCI] for c in after.stream.vcpus] == [0x10001, 0x10001]
    assert after.save == before.save
    assert path.read_bytes()[: 92 + 65536] == save_header(b"", fmt=6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"magic": b"LibvirtQemudPart"}, "incomplete libvirt save image"),
        ({"magic": b"LibvirtQemudXXXX"}, "not a libvirt save image"),
        ({"version": 3}, "version 3"),
        ({"fmt": 1}, r"gzip-compressed save image.*save_image_format.*qemu\.conf"),
        ({"fmt": 5}, "zstd-compressed"),
        ({"fmt": 7}, "format 7: unknown"),
        ({"was_running": 2}, "was_running is 2"),
        ({"xml": "\x00"}, "empty or not NUL-terminated"),
        ({"xml": "not xml"}, "not XML"),
    ],
)
def test_refused_headers(fw_stream: bytes, change: dict[str, object], message: str) -> None:
    data = save_header(fw_stream, **change)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"^web1\.save: .*" + message):
        parse_image(data, "web1.save")


def test_refused_lengths(fw_stream: bytes) -> None:
    data = bytearray(save_header(fw_stream))
    for bad_len in (0, 1 << 30):
        struct.pack_into("<I", data, 20, bad_len)
        with pytest.raises(InvalidInput, match="data_len"):
            parse_image(bytes(data), "x.save")
    good = save_header(fw_stream)
    for cut in (10, 91, 92 + 100, 92 + 65536 + 4):
        with pytest.raises(InvalidInput, match=r"^x\.save: "):
            parse_image(good[:cut], "x.save")
    # no NUL inside data_len
    nonul = save_header(fw_stream, xml="<domain/>" + "x" * 70000, pad=0)
    nonul = nonul[:92] + nonul[92:].replace(b"\0", b"y", 1)
    with pytest.raises(InvalidInput, match="NUL"):
        parse_image(nonul, "x.save")
