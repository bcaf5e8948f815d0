"""Paths every suite shares. ``../shared`` sits beside the checkout, in CI as on a laptop."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("HVCPOLICY_SHARED", REPO.parent / "shared"))
FIXTURE_HOSTS = SHARED / "fixtures" / "hosts"
EXAMPLES = REPO / "examples"
