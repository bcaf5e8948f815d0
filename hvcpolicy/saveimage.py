"""libvirt's save image (``virsh save``, managed save): header, domain XML, then QEMU's stream.

Pure: bytes in, records out. The header (``virQEMUSaveHeader``, 92 bytes, the saving host's byte
order) is: magic[16] ``LibvirtQemudSave`` (``LibvirtQemudPart`` while libvirt is still writing),
u32 version (2; byte-swapped when it reads > 2), u32 data_len, u32 was_running, u32 format
(0 raw, 1-5 compressed, 6 sparse/mapped-ram), u32 cookieOffset, u32 unused[14]. Then data_len
bytes: the XML, a NUL, the cookie, padding. QEMU's stream begins at 92 + data_len; raw and sparse
streams are read in place, compressed ones are refused with what to change.

:func:`parse_image` also takes a bare QEMU stream (``QEVM``), so every caller handles both.
"""

from __future__ import annotations

import struct

from hvcpolicy.errors import InvalidInput
from hvcpolicy.record import Record
from hvcpolicy.stream import MAGIC as STREAM_MAGIC
from hvcpolicy.stream import Stream, parse_stream

TYPE_CHECKING = False
if TYPE_CHECKING:
    from hvcpolicy.stream import Buffer

MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"
HEADER_SIZE = 92
VERSIONS = (1, 2)
RAW, SPARSE = 0, 6
FORMATS = {0: "raw", 1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop", 5: "zstd", 6: "sparse"}
MAX_XML = 16 << 20  # libvirt pads the XML to 64 KiB; a domain XML is far below this


class SaveHeader(Record):
    """A libvirt save image's header and XML. ``stream_offset``: where QEMU's stream begins."""

    __slots__ = ("data_len", "format", "stream_offset", "version", "was_running", "xml")

    def __init__(
        self, version: int, data_len: int, was_running: bool, format: int, xml: str
    ) -> None:
        self.version = version
        self.data_len = data_len
        self.was_running = was_running
        self.format = format  # RAW or SPARSE (others are refused)
        self.xml = xml
        self.stream_offset = HEADER_SIZE + data_len

    @property
    def format_name(self) -> str:
        return FORMATS[self.format]


class Image(Record):
    """A saved guest: the libvirt header (None for a bare QEMU stream) and its stream."""

    __slots__ = ("save", "stream")

    def __init__(self, save: SaveHeader | None, stream: Stream) -> None:
        self.save = save
        self.stream = stream

    @property
    def kind(self) -> str:
        """``qemu-stream``, ``libvirt-raw`` or ``libvirt-sparse``."""
        return "qemu-stream" if self.save is None else f"libvirt-{self.save.format_name}"


def parse_save_header(buf: Buffer, where: str) -> SaveHeader:
    """The header and XML of a libvirt save image (refusing partial, unknown and compressed)."""
    head = buf[0:HEADER_SIZE]
    if head[:16] == PARTIAL_MAGIC:
        raise InvalidInput(
            "an incomplete libvirt save image (LibvirtQemudPart): the save did not finish; "
            "it cannot be restored",
            where,
        )
    if head[:16] != MAGIC:
        raise InvalidInput("not a libvirt save image (no LibvirtQemudSave magic)", where)
    if len(head) < HEADER_SIZE:
        raise InvalidInput(f"truncated: a header of {len(head)} bytes, not 92", where)
    fields = struct.unpack_from("<5I", head, 16)
    read_as = fields[0]
    if read_as > VERSIONS[-1]:
        # Saved on a host of the other byte order (libvirt swaps on the same test).
        fields = struct.unpack_from(">5I", head, 16)
    version, data_len, was_running, fmt, cookie = fields
    if version not in VERSIONS:
        raise InvalidInput(f"libvirt save image version {read_as}: not 1 or 2", where)
    if fmt not in FORMATS:
        raise InvalidInput(f"libvirt save image format {fmt}: unknown", where)
    if fmt not in (RAW, SPARSE):
        raise InvalidInput(
            f"a {FORMATS[fmt]}-compressed save image: hvcpolicy reads the stream in place, so "
            'set save_image_format = "raw" (or "sparse") in /etc/libvirt/qemu.conf, or save '
            "with --image-format raw, and save again",
            where,
        )
    if was_running not in (0, 1):
        raise InvalidInput(f"was_running is {was_running}, not 0 or 1", where)
    if not 0 < data_len <= MAX_XML:
        raise InvalidInput(f"data_len {data_len}: no XML, or larger than {MAX_XML}", where)
    if cookie and cookie >= data_len:
        raise InvalidInput(f"cookie offset {cookie} is past data_len {data_len}", where)
    data = buf[HEADER_SIZE : HEADER_SIZE + data_len]
    if len(data) != data_len:
        raise InvalidInput("truncated: the file ends inside the domain XML", where)
    nul = data.find(b"\0")
    if nul <= 0:
        raise InvalidInput("the domain XML is empty or not NUL-terminated", where)
    try:
        xml = data[:nul].decode()
    except UnicodeDecodeError:
        raise InvalidInput("the domain XML is not UTF-8", where) from None
    if not xml.lstrip().startswith("<"):
        raise InvalidInput("the domain XML is not XML", where)
    return SaveHeader(version, data_len, bool(was_running), fmt, xml)


def parse_image(buf: Buffer, where: str) -> Image:
    """A libvirt save image or a bare QEMU stream; reads the header, the XML and the stream's
    tail only."""
    magic = buf[0:16]
    if magic[:4] == STREAM_MAGIC:
        return Image(None, parse_stream(buf, where))
    save = parse_save_header(buf, where)
    return Image(save, parse_stream(buf, where, start=save.stream_offset))
