"""What the lab left in lab/build/out, as the lab tests read it."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "lab"
OUT = LAB / "build" / "out"
FIXTURES = REPO / "tests" / "fixtures" / "lab"

# lab/build.py's kernel list, loaded by path (lab/ is not a package, and "build" is a common name).
_spec = importlib.util.spec_from_file_location("hvclab_build", LAB / "build.py")
assert _spec is not None and _spec.loader is not None
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)
KERNELS: tuple[tuple[str, str, str], ...] = _build.KERNELS

LABELS = [k[0] for k in KERNELS]
# The CPUs each kernel's conformance run is repeated on: the main one (neoverse-n1: VHE, WA
# levels 2/0/1) and a cortex-a72 (nVHE, WA levels 0/0/0).
CPUS = ("main", "cortex-a72")
CASES = [(label, cpu) for label in LABELS for cpu in CPUS]
CASE_IDS = [f"{label}-{cpu}" for label, cpu in CASES]


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

    def at_cpu(self, cpu: str) -> LabKernel:
        """This kernel's answers on the lab's main CPU ("main") or on another (lab/run.py)."""
        if cpu == "main":
            return self
        return LabKernel(self.label, self.release, self.out / f"cpu-{cpu}", self.info)

    def rc(self, name: str) -> int:
        path = self.out / f"{name}.rc"
        assert path.exists(), f"{self.release}: {name} never finished in the lab (see console)"
        return int(path.read_text().strip())


def fixture_path(label: str) -> Path:
    return FIXTURES / f"debian-{label}.json"
