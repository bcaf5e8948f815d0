"""Paths every suite shares. ``../shared`` sits beside the checkout, in CI as on a laptop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("HVCPOLICY_SHARED", REPO.parent / "shared"))
FIXTURE_HOSTS = SHARED / "fixtures" / "hosts"
EXAMPLES = REPO / "examples"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="rewrite tests/golden/ from what the code writes now (review the diff)",
    )


class Golden:
    """Compare text with a golden file, or (``--update-golden``) rewrite the file."""

    def __init__(self, update: bool) -> None:
        self.update = update

    def check(self, path: Path, text: str) -> None:
        if self.update:
            path.write_text(text)
            return
        assert path.exists(), f"{path}: no golden file yet; run pytest --update-golden"
        want = path.read_text()
        if text != want:
            import difflib

            diff = "".join(
                difflib.unified_diff(want.splitlines(True), text.splitlines(True), str(path), "now")
            )
            pytest.fail(f"{path.name} differs from its golden file:\n{diff}", pytrace=False)


@pytest.fixture()
def golden(request: pytest.FixtureRequest) -> Golden:
    return Golden(bool(request.config.getoption("--update-golden")))
