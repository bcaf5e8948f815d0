"""What the lab left in lab/build/out, as the lab tests read it."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "lab"
OUT = LAB / "build" / "out"
FIXTURES = REPO / "tests" / "fixtures" / "lab"

sys.path.insert(0, str(LAB))
from build import KERNELS  # noqa: E402

LABELS = [k[0] for k in KERNELS]


@dataclass
class LabKernel:
    label: str
    release: str
    out: Path
    info: dict[str, str]

    def read_json(self, name: str) -> Any:
        path = self.out / name
        assert path.exists(), f"{self.release}: the lab left no {path.relative_to(REPO)}"
        return json.loads(path.read_text())

    def rc(self, name: str) -> int:
        path = self.out / f"{name}.rc"
        assert path.exists(), f"{self.release}: {name} never finished in the lab (see console)"
        return int(path.read_text().strip())


def fixture_path(label: str) -> Path:
    return FIXTURES / f"debian-{label}.json"
