"""The simulator is a second, independent reading of the kernel's rules: it must not use the
planner's kernel model, the planner or the policy code, even indirectly."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import hvcpolicy.simulator

FORBIDDEN = ("hvcpolicy.kernel", "hvcpolicy.planner", "hvcpolicy.policy")
ALLOWED_OUTSIDE = {
    "hvcpolicy.catalogue",
    "hvcpolicy.errors",
    "hvcpolicy.cli",
    "hvcpolicy.cli.main",
    "hvcpolicy.firmware",  # the interface's names only (the property served): no rules
}


def test_no_forbidden_module_is_loaded() -> None:
    code = (
        "import json, sys\n"
        "import hvcpolicy.simulator.server, hvcpolicy.simulator.harness\n"
        "import hvcpolicy.cli.simulate, hvcpolicy.simulator.__main__\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = json.loads(out.stdout)
    assert "hvcpolicy.simulator.server" in loaded
    assert [m for m in loaded if m.startswith(FORBIDDEN)] == []


def test_direct_imports_stay_within_catalogue_and_errors() -> None:
    package = Path(hvcpolicy.simulator.__file__).parent
    files = [*package.glob("*.py"), package.parent / "cli" / "simulate.py"]
    seen: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                seen.add(node.module)
            elif isinstance(node, ast.Import):
                seen.update(a.name for a in node.names)
    ours = {m for m in seen if m.startswith("hvcpolicy")}
    outside = {m for m in ours if not m.startswith("hvcpolicy.simulator")}
    assert outside <= ALLOWED_OUTSIDE, outside
    assert "hvcpolicy.simulator.vm" in ours  # the walk did see the package's imports
