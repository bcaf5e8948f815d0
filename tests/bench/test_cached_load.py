"""policystore.resolve: what load_policy answers, from the validated cache when it holds
the policy exactly as its file is now; never stale, never from an untrusted entry."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hvcpolicy.errors import InvalidInput
from hvcpolicy.policy import load_policy
from hvcpolicy.policystore import resolve as load_policy_cached
from hvcpolicy.policystore import store
from tests.conftest import EXAMPLES


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[str, str]:
    pdir = tmp_path / "policies"
    pdir.mkdir()
    shutil.copy(EXAMPLES / "policies" / "fleet-2026.yaml", pdir)
    return str(pdir), str(tmp_path / "cache")


def _validated(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each time a policy is parsed and validated the slow way."""
    import hvcpolicy.policy as policy_module

    seen: list[str] = []
    real = policy_module.load_policy_file

    def spy(path: str) -> object:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(policy_module, "load_policy_file", spy)
    return seen


def test_a_hit_skips_validation_and_equals_load_policy(
    dirs: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pdir, cdir = dirs
    want = load_policy("fleet-2026", pdir)
    assert store(want, pdir, cdir)
    slow = _validated(monkeypatch)
    assert load_policy_cached("fleet-2026", pdir, cdir) == want
    assert slow == []


def test_a_miss_an_edit_or_a_tampered_entry_validates_again(
    dirs: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pdir, cdir = dirs
    slow = _validated(monkeypatch)
    assert load_policy_cached("fleet-2026", pdir, cdir) == load_policy("fleet-2026", pdir)
    assert len(slow) == 2  # nothing cached yet: validated like load_policy
    store(load_policy("fleet-2026", pdir), pdir, cdir)
    path = Path(pdir) / "fleet-2026.yaml"
    path.write_text(path.read_text().replace("ptp: allow", "ptp: deny"))
    fresh = load_policy_cached("fleet-2026", pdir, cdir)
    assert fresh == load_policy("fleet-2026", pdir)  # the edit, not the cached policy
    store(fresh, pdir, cdir)
    entry = Path(cdir) / "fleet-2026.json"
    os.chmod(entry, 0o620)  # group-writable: not trusted
    del slow[:]
    assert load_policy_cached("fleet-2026", pdir, cdir) == fresh
    assert slow, "an untrusted cache entry was used"
    path.write_text(path.read_text().replace("ptp: deny", "ptp: bogus"))
    with pytest.raises(InvalidInput):
        load_policy_cached("fleet-2026", pdir, cdir)


def test_paths_and_unknown_names_are_load_policy(dirs: tuple[str, str]) -> None:
    pdir, cdir = dirs
    file = os.path.join(pdir, "fleet-2026.yaml")
    assert load_policy_cached(file, None, cdir) == load_policy(file)
    with pytest.raises(InvalidInput) as ours:
        load_policy_cached("nope", pdir, cdir)
    with pytest.raises(InvalidInput) as theirs:
        load_policy("nope", pdir)
    assert str(ours.value) == str(theirs.value)
    assert load_policy_cached("fleet-2026", pdir, None) == load_policy("fleet-2026", pdir)
