"""A real ``prometheus-node-exporter`` (the Debian package), its textfile collector pointed at a
directory, listening on a loopback port, and a parser for what it serves."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

BINARY = "/usr/bin/prometheus-node-exporter"
Sample = tuple[str, dict[str, str], float]

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: \d+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse(text: str) -> list[Sample]:
    """Every sample of an exposition: (name, labels, value). Asserts each line parses."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m, f"not a sample line: {line!r}"
        labels = {k: _unescape(v) for k, v in _LABEL.findall(m.group(2) or "")}
        out.append((m.group(1), labels, float(m.group(3))))
    return out


class NodeExporter:
    """Started in ``__enter__``, stopped (by the process we started) in ``__exit__``."""

    def __init__(self, textfile_dir: Path) -> None:
        self.dir = textfile_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = textfile_dir.parent / f"node_exporter-{self.port}.log"
        # loopback only, never through a proxy the environment may name
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __enter__(self) -> NodeExporter:
        log = open(self.log, "wb")  # a file, not a pipe: a full pipe would block it
        self.proc = subprocess.Popen(
            [
                BINARY,
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.disable-exporter-metrics",  # no go_*/process_*: only what we read
                "--collector.disable-defaults",
                "--collector.textfile",
                f"--collector.textfile.directory={self.dir}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd="/",
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                self.scrape()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.log.read_text(errors="replace")
                    self.__exit__(None, None, None)
                    raise AssertionError(f"node_exporter did not come up: {err[-2000:]}") from None
                time.sleep(0.1)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def scrape(self) -> str:
        with self._opener.open(self.url, timeout=10) as resp:
            assert resp.status == 200
            return str(resp.read().decode("utf-8"))

    def samples(self) -> list[Sample]:
        return parse(self.scrape())


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The value of the one sample of ``name`` whose labels include ``labels``."""
    found = [v for n, lab, v in samples if n == name and labels.items() <= lab.items()]
    assert len(found) <= 1, f"{name} {labels}: {len(found)} samples"
    return found[0] if found else None
