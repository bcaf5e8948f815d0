"""Split a QMP byte stream into JSON texts, the way QEMU's JSON streamer does.

QMP is a stream of JSON values, not of lines: ``qemu.qmp`` sends no newline, a client may send
one message in several writes or several in one. The splitter tracks strings and bracket depth
and hands back each complete top-level value; parsing happens afterwards. Oversized or too
deeply nested input is reported once and skipped up to the end of that value.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_MESSAGE = 1 << 20  # bytes per input value; QEMU's own lexer allows more, clients send < 1 KiB
MAX_DEPTH = 1024  # QEMU's MAX_NESTING

_WS = b" \t\r\n"
_OPEN = b"{["
_CLOSE = b"}]"


@dataclass(frozen=True, slots=True)
class Chunk:
    """A complete top-level JSON text, or (``error`` set) input that was skipped."""

    text: bytes = b""
    error: str | None = None


class JSONStreamSplitter:
    def __init__(self, max_message: int = MAX_MESSAGE, max_depth: int = MAX_DEPTH) -> None:
        self.max_message = max_message
        self.max_depth = max_depth
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._bare = False  # a top-level scalar (number, keyword) is being read
        self._discarding = False
        self._string_top = False  # the value being read is a top-level string

    def feed(self, data: bytes) -> list[Chunk]:
        out: list[Chunk] = []
        for byte in data:
            self._step(byte, out)
        return out

    def _emit(self, out: list[Chunk]) -> None:
        if not self._discarding:
            out.append(Chunk(bytes(self._buf)))
        self._buf.clear()
        self._discarding = False

    def _step(self, byte: int, out: list[Chunk]) -> None:
        if self._bare:
            if byte in _WS or byte in _OPEN or byte in _CLOSE or byte == 0x22:
                self._bare = False
                self._emit(out)
            else:
                self._append(byte, out)
                return
        if self._depth == 0:
            if byte in _WS:
                return
            if byte in _OPEN:
                self._depth = 1
                self._append(byte, out)
                return
            if byte in _CLOSE:
                out.append(Chunk(error=f"JSON parse error, unexpected '{chr(byte)}'"))
                return
            if byte == 0x22:  # a top-level string: read it as a value of its own
                self._in_string = True
                self._depth = 1
                self._append(byte, out)
                self._string_top = True
                return
            self._bare = True
            self._append(byte, out)
            return
        self._append(byte, out)
        if self._in_string:
            if self._escape:
                self._escape = False
            elif byte == 0x5C:  # backslash
                self._escape = True
            elif byte == 0x22:
                self._in_string = False
                if self._string_top:
                    self._string_top = False
                    self._depth = 0
                    self._emit(out)
            return
        if byte == 0x22:
            self._in_string = True
        elif byte in _OPEN:
            self._depth += 1
            if self._depth > self.max_depth and not self._discarding:
                out.append(Chunk(error="JSON parse error, too deeply nested"))
                self._discarding = True
                self._buf.clear()
        elif byte in _CLOSE:
            self._depth -= 1
            if self._depth == 0:
                self._emit(out)

    def _append(self, byte: int, out: list[Chunk]) -> None:
        if self._discarding:
            return
        self._buf.append(byte)
        if len(self._buf) > self.max_message:
            out.append(
                Chunk(error=f"JSON parse error, message larger than {self.max_message} bytes")
            )
            self._discarding = True
            self._buf.clear()
