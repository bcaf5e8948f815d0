"""Fuzz the stream and save-image parsers (tests/hardening's fuzzer and bookkeeping): byte-level
mutation of the parts the parser reads (the libvirt header and XML, the stream's device sections
and vmdesc) and structure-aware mutation of the vmdesc (sizes, counts, names, nesting) with a
correct length, so inputs get past the framing to the walk. Every input must end in a result or
InvalidInput within ``HANG_SECONDS``: 0 tracebacks, 0 hangs; the campaign stays under ~20 s.

Seeds come from a real QEMU stream (compacted: QEVM header + the tail the parser reads), the same
with KVM's firmware registers, and libvirt save images around both."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvcpolicy.errors import InvalidInput
from hvcpolicy.saveimage import parse_image
from hvcpolicy.stream import parse_stream
from tests.conftest import EXAMPLES
from tests.hardening.fuzzlib import Figures, Mutator, assert_clean, run_inputs
from tests.hardening.test_fuzz_cli import _check, _main
from tests.stream.streamlib import save_header

TOKENS = [
    b"QEVM",
    b"\x00\x00\x00\x03",
    b"LibvirtQemudSave",
    b"LibvirtQemudPart",
    b"\x04",
    b"\x05",
    b"\x06",
    b"\x7e",
    b"\x00",
    b"\xff\xff\xff\xff",
    b"\x7f\xff\xff\xff",
    b"\x03cpu",
    b'"array_len": ',
    b'"size": ',
    b'"subsections": [',
    b'"name": "cpu"',
    b'"instance_id": ',
    b"{",
    b"}",
    b"[",
    b"]",
    b"<domain/>",
    b"\x60\x30\x00\x00\x00\x14\x00\x00",
]


def compact(stream: bytes, keep: int = 60_000) -> bytes:
    """The stream's header and tail only: all the parser reads (the RAM is never looked at)."""
    compacted = stream[:8] + stream[-keep:]
    parse_stream(compacted, "seed")  # still a whole stream to the parser
    return compacted


def target(data: bytes) -> None:
    image = parse_image(data, "fuzz.save")
    fw = image.stream.firmware()
    if fw:
        image.stream.edits({r: 0 for r in fw})


def doc_mutations(stream: bytes, count: int, seed: int) -> Iterator[bytes]:
    """The stream with its vmdesc changed as a document, re-framed with the right length."""
    s = parse_stream(stream, "seed")
    head = stream[: s.vmdesc_offset + 1]
    doc = json.loads(stream[s.vmdesc_offset + 5 :])
    rng = random.Random(seed)
    values: list[object] = [0, 1, -1, 7, 1 << 31, 1 << 64, 10**30, 1.5, None, "x", [], {}]
    for _ in range(count):
        d = json.loads(json.dumps(doc))
        for _ in range(rng.choice((1, 1, 2, 4))):
            dev = rng.choice(d["devices"]) if d["devices"] else {}
            op = rng.randrange(8)
            fields = dev.get("fields") or [{}]
            f = rng.choice(fields)
            if op == 0:
                f["size"] = rng.choice(values)
            elif op == 1:
                f["array_len"] = rng.choice(values)
            elif op == 2:
                dev["instance_id"] = rng.choice(values)
            elif op == 3:
                dev["name"] = rng.choice(["cpu", "", "\ud800", "x" * 300, 5, "timer"])
            elif op == 4 and d["devices"]:
                d["devices"].insert(rng.randrange(len(d["devices"]) + 1), dev)
            elif op == 5 and d["devices"]:
                del d["devices"][rng.randrange(len(d["devices"]))]
            elif op == 6:
                sub: dict[str, object] = {"vmsd_name": "cpu/x", "version": 1, "fields": fields}
                for _ in range(rng.choice((1, 40))):
                    sub = {"vmsd_name": "s", "version": 1, "fields": [], "subsections": [sub]}
                dev["subsections"] = [sub]
            else:
                f["name"] = rng.choice(
                    ["cpreg_vmstate_array_len", "cpreg_vmstate_indexes", "cpreg_vmstate_values"]
                )
        text = json.dumps(d).encode("utf-8", "surrogatepass")
        yield head + struct.pack(">I", len(text)) + text


@pytest.fixture(scope="module")
def seeds(real_stream: bytes, fw_stream: bytes) -> list[bytes]:
    streams = [compact(real_stream), compact(fw_stream)]
    return (
        streams
        + [save_header(s, pad=512) for s in streams]
        + [save_header(streams[1], fmt=6, order=">", pad=0)]
    )


def test_fuzz_bytes(seeds: list[bytes]) -> None:
    """Byte mutations, placed where the parser looks: the first 1 KiB or the last 40 KiB."""
    rng = random.Random(13)
    m = Mutator(seeds, TOKENS, rng)

    def inputs(n: int) -> Iterator[bytes]:
        for _ in range(n):
            seed = rng.choice(seeds)
            cut = 1024 if rng.random() < 0.3 else len(seed) - 40_000
            part = seed[:cut] if cut == 1024 else seed[cut:]
            m.seeds = [part]
            mutated = m.one()
            yield mutated + seed[cut:] if cut == 1024 else seed[:cut] + mutated

    fig = run_inputs(inputs(8000), target, (InvalidInput,))
    assert fig.inputs == 8000
    assert_clean("parsers/stream-bytes", fig)


def test_fuzz_vmdesc(real_stream: bytes, fw_stream: bytes) -> None:
    fig = Figures()
    for i, s in enumerate((compact(real_stream), compact(fw_stream))):
        fig.merge(run_inputs(doc_mutations(s, 1500, 29 + i), target, (InvalidInput,)))
    assert fig.inputs == 3000
    assert_clean("parsers/stream-vmdesc", fig)


def test_fuzz_truncations(seeds: list[bytes]) -> None:
    """Every cut of the header, and cuts all through the tail."""
    inputs = [s[:n] for s in seeds for n in range(0, 200)]
    inputs += [s[:n] for s in seeds for n in range(len(s) - 40_000, len(s), 97)]
    fig = run_inputs(inputs, target, (InvalidInput,))
    assert_clean("parsers/stream-truncated", fig)


def test_fuzz_cli(seeds: list[bytes], tmp_path: Path) -> None:
    """``image show`` (text and JSON) and ``check-migration --image`` on mutated image files,
    in-process: exit 0, 3 or 4, no traceback, one ``hvcpolicy:`` line on stderr at most."""
    path = tmp_path / "fuzz.save"
    host = str(EXAMPLES / "hosts" / "neoverse-n1_linux-6.1.json")
    commands = [
        ["image", "show", str(path)],
        ["image", "show", str(path), "--format", "json"],
        ["check-migration", "--image", str(path), "--to", host],
    ]
    rng = random.Random(41)
    m = Mutator(seeds, TOKENS, rng)

    def inputs(n: int) -> Iterator[bytes]:
        for i in range(n):
            seed = rng.choice(seeds)
            if i % 2:
                yield m.one()
            else:
                cut = len(seed) - 40_000
                m.seeds = [seed[cut:]]
                yield seed[:cut] + m.one()

    def target(data: bytes) -> None:
        path.write_bytes(data)
        for argv in commands:
            rc, _, err = _main(argv)
            _check(argv, rc, err, True)

    fig = run_inputs(inputs(400), target, ())
    assert fig.inputs == 400
    assert_clean("cli/in-process-image", fig)
