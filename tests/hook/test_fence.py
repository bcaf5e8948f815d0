"""The import fence: the hook is only a hook. Nothing but ``hvcpolicy.cli`` (and the hook
package itself) imports from ``hvcpolicy.hook``; shared logic lives in the core."""

from __future__ import annotations

import ast
from pathlib import Path

import hvcpolicy

PACKAGE = Path(hvcpolicy.__file__).parent
KNOWN: set[str] = set()  # none: status reads with hvcpolicy.qmp, as the hook does


def _imports(path: Path) -> set[str]:
    seen: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            seen.add(node.module)
            seen.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            seen.update(a.name for a in node.names)
    return seen


def test_only_the_cli_imports_the_hook() -> None:
    offenders = set()
    checked = 0
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("cli", "hook"):
            continue
        checked += 1
        if any(m == "hvcpolicy.hook" or m.startswith("hvcpolicy.hook.") for m in _imports(path)):
            offenders.add(str(rel))
    assert checked > 20  # the walk saw the package
    assert offenders <= KNOWN, offenders


def test_the_cli_reaches_the_hook_only_through_its_modules() -> None:
    """The walk above does see an import of the hook: the CLI's own."""
    assert "hvcpolicy.hook.entry" in _imports(PACKAGE / "cli" / "libvirt.py")
