"""The validated-policy cache: hits only when the policy file is byte-for-byte what was
validated and the cache file is trustworthy; everything else is a miss."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from hvcpolicy.policy import load_policy
from hvcpolicy.policystore import load_cached, store
from tests.conftest import EXAMPLES


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[str, str]:
    pdir = tmp_path / "policies"
    pdir.mkdir()
    shutil.copy(EXAMPLES / "policies" / "fleet-2026.yaml", pdir)
    cdir = tmp_path / "cache"
    return str(pdir), str(cdir)


def test_hit_after_store(dirs: tuple[str, str]) -> None:
    pdir, cdir = dirs
    assert load_cached("fleet-2026", pdir, cdir) is None
    policy = load_policy("fleet-2026", pdir)
    assert store(policy, pdir, cdir)
    assert load_cached("fleet-2026", pdir, cdir) == policy
    assert oct(os.stat(Path(cdir) / "fleet-2026.json").st_mode & 0o777) == "0o600"


def test_an_edit_is_never_served_stale(dirs: tuple[str, str]) -> None:
    pdir, cdir = dirs
    store(load_policy("fleet-2026", pdir), pdir, cdir)
    path = Path(pdir) / "fleet-2026.yaml"
    st = path.stat()
    # Same size and mtime: only the content tells.
    text = path.read_text().replace("pv-time: deny", "pv-time: allw")
    assert len(text) == st.st_size
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert load_cached("fleet-2026", pdir, cdir) is None


def test_store_refuses_a_policy_that_no_longer_matches_the_file(dirs: tuple[str, str]) -> None:
    pdir, cdir = dirs
    policy = load_policy("fleet-2026", pdir)
    path = Path(pdir) / "fleet-2026.yaml"
    path.write_text(path.read_text().replace("ptp: allow", "ptp: deny"))
    assert not store(policy, pdir, cdir)
    assert load_cached("fleet-2026", pdir, cdir) is None


@pytest.mark.parametrize(
    "attack",
    ["group-writable", "dir-world-writable", "symlink", "owner", "garbage", "other-version"],
)
def test_untrusted_cache_is_a_miss(dirs: tuple[str, str], attack: str) -> None:
    pdir, cdir = dirs
    store(load_policy("fleet-2026", pdir), pdir, cdir)
    entry = Path(cdir) / "fleet-2026.json"
    if attack == "group-writable":
        entry.chmod(0o620)
    elif attack == "dir-world-writable":
        Path(cdir).chmod(0o777)
    elif attack == "symlink":
        real = Path(cdir) / "real.json"
        entry.rename(real)
        entry.symlink_to(real)
    elif attack == "owner":
        os.chown(entry, 65534, 65534)
    elif attack == "garbage":
        entry.write_text("{not json")
    elif attack == "other-version":
        doc = json.loads(entry.read_text())
        doc["tool"] = "0.0.0"
        entry.write_text(json.dumps(doc))
    assert load_cached("fleet-2026", pdir, cdir) is None


def test_no_cache_dir_and_bad_names_are_misses(dirs: tuple[str, str]) -> None:
    pdir, cdir = dirs
    assert load_cached("fleet-2026", pdir, None) is None
    assert load_cached("../etc/passwd", pdir, cdir) is None
    assert load_cached("absent", pdir, cdir) is None
