"""A small, deterministic mutation fuzzer and the bookkeeping every hardening suite shares.

Each parser the outside world feeds is run on inputs derived from the corpus under
``tests/hardening/corpus/`` (seeded ``random.Random``: CI sees the same inputs on every run).
An input is *fine* when the parser returns or raises one of the documented errors; anything
else is a *traceback*; an input that takes longer than ``HANG_SECONDS`` is a *hang* (an
interval timer interrupts it, so a real hang cannot stall the run).

``FIGURES`` collects, per suite, how many inputs ran and how many failed; ``conftest.py``
prints them at the end of the run, so the CI log shows the figures issue 7 asks for.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
HANG_SECONDS = 2.0


@dataclass
class Figures:
    inputs: int = 0
    tracebacks: int = 0
    hangs: int = 0
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)

    def merge(self, other: Figures) -> None:
        self.inputs += other.inputs
        self.tracebacks += other.tracebacks
        self.hangs += other.hangs
        self.seconds += other.seconds
        self.examples.extend(other.examples)


FIGURES: dict[str, Figures] = {}


def record(suite: str, figures: Figures) -> None:
    FIGURES.setdefault(suite, Figures()).merge(figures)


class Hang(BaseException):
    """Raised by the interval timer inside an input that ran too long."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def _alarm(signum: int, frame: object) -> None:
        raise Hang()

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def corpus(kind: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / kind).iterdir()) if p.is_file()]


# --- mutation -------------------------------------------------------------------------------

INTERESTING = [
    b"",
    b"\x00",
    b"\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\n",
    b"\r\n",
    b"\t",
    b" ",
    b"-1",
    b"0",
    b"0x",
    b"0xffffffffffffffff",
    b"0x10000000000000000",
    b"18446744073709551616",
    b"1e999",
    b"NaN",
    b"Infinity",
    b"null",
    b"true",
    b"[]",
    b"{}",
    b'"',
    b"'",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"%s%n",
    b"../../../../etc/passwd",
    b"\xe2\x80\xae",
]


@dataclass
class Mutator:
    seeds: Sequence[bytes]
    tokens: Sequence[bytes]
    rng: random.Random

    def one(self) -> bytes:
        data = bytearray(self.rng.choice(self.seeds))
        for _ in range(self.rng.choice((1, 1, 1, 2, 3, 5, 8))):
            self._mutate(data)
        return bytes(data)

    def _pos(self, data: bytearray) -> int:
        return self.rng.randrange(len(data) + 1)

    def _mutate(self, data: bytearray) -> None:
        r = self.rng
        op = r.randrange(10)
        if op == 0 and data:  # flip a bit
            i = r.randrange(len(data))
            data[i] ^= 1 << r.randrange(8)
        elif op == 1 and data:  # replace a byte
            data[r.randrange(len(data))] = r.randrange(256)
        elif op in (2, 3):  # insert a format token
            i = self._pos(data)
            data[i:i] = r.choice(self.tokens)
        elif op == 4:  # insert an interesting value
            i = self._pos(data)
            data[i:i] = r.choice(INTERESTING)
        elif op == 5 and data:  # delete a chunk
            i = r.randrange(len(data))
            del data[i : i + r.randrange(1, 64)]
        elif op == 6 and data:  # duplicate a chunk
            i = r.randrange(len(data))
            chunk = data[i : i + r.randrange(1, 128)]
            j = self._pos(data)
            data[j:j] = chunk * r.choice((1, 2, 16))
        elif op == 7 and data:  # truncate
            del data[r.randrange(len(data)) :]
        elif op == 8:  # splice with another seed
            other = r.choice(self.seeds)
            if other:
                k = r.randrange(len(other))
                i = self._pos(data)
                data[i:] = other[k:]
        elif op == 9 and data:  # replace a token by another
            tok = r.choice(self.tokens)
            i = r.randrange(len(data))
            data[i : i + len(tok)] = r.choice(self.tokens)


Outcome = Callable[[bytes], None]


def run_inputs(
    inputs: Iterator[bytes] | Sequence[bytes],
    target: Callable[[bytes], object],
    allowed: tuple[type[BaseException], ...],
    corpus_dir: Path | None = None,
    suffix: str = "",
) -> Figures:
    """Feed every input to ``target``; count the ones that raise outside ``allowed`` or hang."""
    fig = Figures()
    start = time.monotonic()
    for data in inputs:
        fig.inputs += 1
        try:
            with time_limit(HANG_SECONDS):
                target(data)
        except allowed:
            pass
        except Hang:
            fig.hangs += 1
            _keep(fig, data, "hang", corpus_dir, suffix)
        except Exception:
            fig.tracebacks += 1
            _keep(fig, data, traceback.format_exc(limit=-3), corpus_dir, suffix)
    fig.seconds = time.monotonic() - start
    return fig


def _keep(fig: Figures, data: bytes, why: str, corpus_dir: Path | None, suffix: str) -> None:
    if len(fig.examples) < 5:
        fig.examples.append(f"{data[:300]!r}: {why}")
    if corpus_dir is not None and len(fig.examples) <= 5:
        # A crasher found in CI lands beside the corpus, ready to be committed with the fix.
        out = corpus_dir / "crashers"
        out.mkdir(exist_ok=True)
        (out / f"crash-{abs(hash(data)) % 10**12}{suffix}").write_bytes(data)


def mutated(kind: str, tokens: Sequence[bytes], count: int, seed: int) -> Iterator[bytes]:
    m = Mutator(corpus(kind), tokens, random.Random(seed))
    for _ in range(count):
        yield m.one()


def assert_clean(suite: str, fig: Figures) -> None:
    record(suite, fig)
    assert fig.tracebacks == 0 and fig.hangs == 0, (
        f"{suite}: {fig.tracebacks} tracebacks, {fig.hangs} hangs in {fig.inputs} inputs; "
        + " | ".join(fig.examples)
    )


# --- structure-aware mutation (documents that get past the syntax, to reach the meaning) ------

SCALARS: list[object] = [
    None,
    True,
    False,
    0,
    -1,
    1.1,
    1 << 64,
    -(1 << 63),
    float("inf"),
    "",
    "x" * 5000,
    "\x00",
    "\ud800",
    "1.1",
    "0.1",
    "0.2",
    "1.3",
    "9.9",
    "65535.0",
    "allow",
    "deny",
    "require",
    "refuse",
    "warn",
    "any",
    "available",
    "not-required",
    "fleet-2026",
    "fleet-2026\n",
    "hvcpolicy/v1",
    "FirmwarePolicy",
    "HostSnapshot",
    "kvm",
    "baseline",
    "0x0",
    "0x1",
    "0x3",
    "0xffffffffffffffff",
    "0x10000000000000000",
    "0x10001",
    "0x6030000000160002",
    "0x6030000000160002:1",
    "0x6030000000160002:63",
    "0x6030000000160002:64",
    "0x6030000000140002",
    "0x6030000000170000",
    "7.2.0",
    "11.1",
    "2026-11-24T23:00:00Z",
    "2026-13-45T99:99:99Z",
]


def random_value(rng: random.Random, keys: Sequence[str], depth: int = 0) -> object:
    r = rng.randrange(10)
    if depth < 4 and r == 0:
        return [random_value(rng, keys, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 4 and r == 1:
        return {
            rng.choice(keys): random_value(rng, keys, depth + 1) for _ in range(rng.randrange(4))
        }
    if r == 2:
        return rng.choice(keys)
    if r == 3:
        return rng.randrange(-(1 << 65), 1 << 65)
    return rng.choice(SCALARS)


def mutate_tree(doc: object, rng: random.Random, keys: Sequence[str]) -> object:
    """A copy of a decoded JSON document with a few nodes replaced, added or removed."""
    import copy

    doc = copy.deepcopy(doc)
    for _ in range(rng.choice((1, 1, 2, 3))):
        # pick a random container on a random path
        node = doc
        for _ in range(rng.randrange(1, 6)):
            if isinstance(node, dict) and node:
                child = node[rng.choice(list(node))]
            elif isinstance(node, list) and node:
                child = rng.choice(node)
            else:
                break
            if not isinstance(child, (dict, list)):
                break
            node = child
        if isinstance(node, dict):
            op = rng.randrange(4)
            if op == 0 and node:
                node[rng.choice(list(node))] = random_value(rng, keys)
            elif op == 1:
                node[rng.choice(keys)] = random_value(rng, keys)
            elif op == 2 and node:
                del node[rng.choice(list(node))]
            elif node:
                key = rng.choice(list(node))
                node[rng.choice(keys)] = node.pop(key)
        elif isinstance(node, list):
            if node and rng.random() < 0.5:
                node[rng.randrange(len(node))] = random_value(rng, keys)
            else:
                node.append(random_value(rng, keys))
        else:
            doc = random_value(rng, keys)
    return doc


def tree_inputs(kind: str, keys: Sequence[str], count: int, seed: int) -> Iterator[bytes]:
    """JSON bytes of tree-mutated corpus documents (the corpus files that decode)."""
    import json

    import yaml

    docs = []
    for data in corpus(kind):
        try:
            docs.append(json.loads(data))
        except ValueError:
            try:
                docs.append(yaml.safe_load(data))
            except Exception:  # the corpus keeps crashers too
                continue
    rng = random.Random(seed)
    for _ in range(count):
        doc = mutate_tree(rng.choice(docs), rng, keys)
        yield json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")


HVC = "https://hvcpolicy.dev/xmlns/libvirt/1"
XML_ATTR_VALUES = [
    "fleet-2026",
    "strict-review",
    "default",
    "Fleet",
    "../etc/passwd",
    "fleet-2026&#10;",
    "ptp",
    "trng",
    "0x6030000000160002:1",
    "0x6030000000160003:63",
    "0x6030000000160004",
    "0x6030000000140000",
    "0x6030000000140001:0",
    "allow",
    "deny",
    "require",
    "refuse",
    "1.0",
    "1.1",
    "0.1",
    "2.0",
    "apply",
    "/tmp/x.qmp",
    "relative.qmp",
    "/" + "a" * 200,
    "0x0",
    "0x1",
    "0x3",
    "0x10001",
    "0xffffffffffffffff",
    "0x1ffffffffffffffff",
    "",
    "&amp;&lt;&gt;&quot;&apos;",
    "&#0;",
    "&#x1F600;",
    "\u202e",
    "x" * 5000,
]
XML_HVC_ELEMENTS = {
    "policy": ["ref"],
    "feature": ["name", "mode"],
    "unknown": ["mode"],
    "psci": ["version"],
    "qmp": ["socket"],
    "resume": ["after"],
    "applied": ["host", "kernel", "at"],
    "register": ["id", "value"],
}


def random_domain_xml(rng: random.Random) -> bytes:
    """A libvirt-like domain whose <metadata> holds a random, mostly well-formed <hvc:policy>."""

    def attrs(names: list[str]) -> str:
        out = []
        for name in names:
            if rng.random() < 0.9:
                out.append(f"{name}='{rng.choice(XML_ATTR_VALUES)}'")
        if rng.random() < 0.05:
            out.append(f"{rng.choice(['bogus', 'xmlns:x', 'hvc:ref'])}='1'")
        rng.shuffle(out)
        return " ".join(out)

    def element(depth: int) -> str:
        local = rng.choice(list(XML_HVC_ELEMENTS))
        if rng.random() < 0.03:
            local = rng.choice(["polcy", "Feature", "register2"])
        prefix = rng.choice(["hvc:"] * 8 + ["", "h:"])
        kids = ""
        if depth < 3 and rng.random() < (0.7 if local == "applied" else 0.1):
            kids = "".join(element(depth + 1) for _ in range(rng.randrange(6)))
        a = attrs(XML_HVC_ELEMENTS.get(local, []))
        return (
            f"<{prefix}{local} {a}>{kids}</{prefix}{local}>" if kids else f"<{prefix}{local} {a}/>"
        )

    ns = rng.choice([HVC] * 10 + [HVC + "/", "https://hvcpolicy.dev/xmlns/libvirt/2", ""])
    decl = f'xmlns:hvc="{ns}"' if ns else ""
    if rng.random() < 0.05:
        decl += f' xmlns:h="{HVC}"'
    if rng.random() < 0.05:
        decl += f' xmlns="{HVC}"'
    policies = []
    for _ in range(rng.choice([1] * 12 + [0, 2])):
        body = "".join(element(1) for _ in range(rng.randrange(7)))
        policies.append(f"<hvc:policy {decl} {attrs(['ref'])}>{body}</hvc:policy>")
    args = ""
    if rng.random() < 0.5:
        sock = rng.choice(["/run/q.qmp", "", "/tmp/" + "b" * 120, "x"])
        args = (
            "<qemu:commandline><qemu:arg value='-qmp'/>"
            f"<qemu:arg value='unix:{sock},server=on,wait=off'/></qemu:commandline>"
        )
    name = rng.choice(["web1", "", "x" * 300, "a b", "'", "\u00e9"])
    text = (
        "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        f"<name>{name}</name><uuid>6c1b7a1e-3f0c-4c52-9a51-1f6b0e1e0001</uuid>"
        f"<metadata>{''.join(policies)}</metadata><memory unit='MiB'>256</memory>{args}</domain>"
    )
    if rng.random() < 0.1:
        text = "<domstatus><domain-x/>" + text + "</domstatus>"
    return text.encode("utf-8", "surrogatepass")


def xml_inputs(count: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(count):
        yield random_domain_xml(rng)
