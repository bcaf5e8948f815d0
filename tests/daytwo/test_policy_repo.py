"""examples/policy-repo as an operator uses it: pre-commit installs this repository's
``hvcpolicy-validate`` hook (pip, from PyPI and this checkout) and refuses a broken policy; the
CI script passes on the example and fails when a snapshot change affects a policy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLES, REPO

EXAMPLE = EXAMPLES / "policy-repo"
UPSTREAM = "https://github.com/hvcpolicy/hvcpolicy"
INSTALL_TIMEOUT = 400  # the first run builds the hook's environment with pip


@dataclass
class PolicyRepo:
    path: Path
    env: dict[str, str]

    def run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(cmd), capture_output=True, text=True, cwd=self.path, env=self.env, timeout=timeout
        )

    def git(self, *args: str) -> subprocess.CompletedProcess[str]:
        r = self.run("git", *args)
        assert r.returncode == 0, r.stderr
        return r

    def pre_commit(self, *args: str) -> subprocess.CompletedProcess[str]:
        # without PYTHONPATH: the hook must run the hvcpolicy pre-commit installed, not this tree
        env = {k: v for k, v in self.env.items() if k != "PYTHONPATH"}
        return subprocess.run(
            [sys.executable, "-m", "pre_commit", *args],
            capture_output=True,
            text=True,
            cwd=self.path,
            env=env,
            timeout=INSTALL_TIMEOUT,
        )


def _copy(dest: Path, env: dict[str, str]) -> PolicyRepo:
    shutil.copytree(EXAMPLE, dest)
    repo = PolicyRepo(dest, env)
    repo.git("init", "-q", "-b", "main")
    return repo


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("pre-commit-home")
    ident = {"GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.org"}
    ident |= {"GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.org"}
    return {
        **os.environ,
        **ident,
        "PRE_COMMIT_HOME": str(home),
        "PRE_COMMIT_COLOR": "never",
        "HVCPOLICY": f"{sys.executable} -m hvcpolicy",
        "PYTHONPATH": str(REPO),
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Iterator[PolicyRepo]:
    """The example as a git repository whose pre-commit config points at this checkout's HEAD
    (the published config names the upstream repository and a release tag)."""
    r = _copy(tmp_path_factory.mktemp("policy-repo") / "repo", env)
    config = r.path / ".pre-commit-config.yaml"
    text = config.read_text()
    assert text.count(f"repo: {UPSTREAM}") == 1
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    doc = yaml.safe_load(text)
    doc["repos"][0]["repo"] = str(REPO)
    doc["repos"][0]["rev"] = head
    config.write_text(yaml.safe_dump(doc))
    r.git("add", "-A")
    r.git("commit", "-q", "-m", "policies")
    yield r


def test_the_example_config_uses_this_repositorys_hook() -> None:
    hooks = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert [h["id"] for h in hooks] == ["hvcpolicy-validate"]
    assert hooks[0]["entry"] == "hvcpolicy validate"
    config = yaml.safe_load((EXAMPLE / ".pre-commit-config.yaml").read_text())
    assert config["repos"][0]["repo"] == UPSTREAM
    assert [h["id"] for h in config["repos"][0]["hooks"]] == ["hvcpolicy-validate"]


def test_pre_commit_passes_the_example(repo: PolicyRepo) -> None:
    r = repo.pre_commit("run", "--all-files")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "hvcpolicy validate" in r.stdout and "Passed" in r.stdout


def test_pre_commit_rejects_a_broken_policy_naming_file_and_field(repo: PolicyRepo) -> None:
    broken = repo.path / "policies" / "unknown-feature.yaml"
    shutil.copy(EXAMPLES / "broken" / "unknown-feature.yaml", broken)
    repo.git("add", "policies/unknown-feature.yaml")
    try:
        r = repo.pre_commit("run")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "Failed" in r.stdout
        assert "policies/unknown-feature.yaml: spec.features.trgn: unknown feature" in r.stdout
        # the same through git: the installed hook refuses the commit
        assert repo.pre_commit("install").returncode == 0
        before = repo.git("rev-parse", "HEAD").stdout
        env = {k: v for k, v in repo.env.items() if k != "PYTHONPATH"}
        c = subprocess.run(
            ["git", "commit", "-q", "-m", "typo"],
            capture_output=True,
            text=True,
            cwd=repo.path,
            env=env,
            timeout=INSTALL_TIMEOUT,
        )
        assert c.returncode != 0, c.stdout + c.stderr
        assert "spec.features.trgn" in c.stdout + c.stderr
        assert repo.git("rev-parse", "HEAD").stdout == before
    finally:
        repo.run("git", "rm", "-q", "--cached", "policies/unknown-feature.yaml")
        broken.unlink()
        repo.run(sys.executable, "-m", "pre_commit", "uninstall")


def test_pre_commit_skips_files_outside_the_layout(repo: PolicyRepo) -> None:
    notes = repo.path / "ci" / "notes.json"
    notes.write_text("{}")
    try:
        r = repo.pre_commit("run", "--files", "ci/notes.json")
        assert r.returncode == 0, r.stdout
        assert "(no files to check)Skipped" in r.stdout
    finally:
        notes.unlink()


def test_ci_script_passes_on_the_example(repo: PolicyRepo) -> None:
    r = repo.run("sh", "ci/check.sh", "HEAD")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().endswith("ok")


def test_ci_script_fails_on_a_stale_baseline_and_on_an_affecting_upgrade(
    tmp_path: Path, env: dict[str, str]
) -> None:
    r = _copy(tmp_path / "repo", env)
    r.git("add", "-A")
    r.git("commit", "-q", "-m", "fleet on 6.1")
    # one host class upgraded from 6.1 to 6.18, its snapshot replaced
    snap = r.path / "snapshots" / "node-6-1-qemu-11.1.json"
    doc = json.loads((EXAMPLES / "fleet" / "node-6-18.json").read_text())
    doc["host"] = "node-6-1-qemu-11.1"
    snap.write_text(json.dumps(doc, indent=2) + "\n")
    upgraded = r.run("sh", "ci/check.sh", "HEAD")
    # the baseline still has the other 6.1 class, but the unpinned default policy now shows
    # PSCI 1.3 there and cannot migrate back: diff exits 3, and so does the check
    assert upgraded.returncode == 3, upgraded.stdout + upgraded.stderr
    assert "== snapshots changed since HEAD" in upgraded.stdout
    assert "PSCI default 1.1 -> 1.3 (up)" in upgraded.stdout
    assert "default: AFFECTED" in upgraded.stdout
    assert "fleet-2026: unaffected" in upgraded.stdout
    # retiring the QEMU 7.2 class changes the baseline: stale until regenerated
    (r.path / "snapshots" / "node-6-1-qemu-7.2.json").unlink()
    stale = r.run("sh", "ci/check.sh")
    assert stale.returncode == 1
    assert "baseline.json is stale" in stale.stderr
    assert '-  "qemu": "7.2.19",' in stale.stdout
    files = sorted(str(p.relative_to(r.path)) for p in (r.path / "snapshots").iterdir())
    b = r.run(*env["HVCPOLICY"].split(), "baseline", *files, "-o", "baseline.json")
    assert b.returncode == 0, b.stderr
    assert r.run("sh", "ci/check.sh").returncode == 0
