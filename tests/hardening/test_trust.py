"""The security boundary on disk: policy files and the QMP socket (hvcpolicy/trust.py).

Run as root (CI's containers are): files are chowned to nobody (65534) and chmod'ed g+w / o+w to
play the attacker. The tree the tests build lives under a root-owned 0755 directory (/run, else
/var/lib), because /tmp itself (1777) is exactly what StrictModes refuses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvcpolicy import trust
from hvcpolicy.errors import InvalidInput
from hvcpolicy.policy import load_policy_file, policy_path

NOBODY = 65534
POLICY = (Path(__file__).resolve().parents[2] / "examples/policies/fleet-2026.yaml").read_text()


def _trusted_base() -> str:
    for candidate in ("/run", "/var/lib", "/var/cache"):
        try:
            trust.check_tree(candidate, candidate)
        except InvalidInput:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    raise AssertionError("no root-owned, go-w directory to build the test tree in")


@pytest.fixture
def tree() -> Iterator[Path]:
    """<trusted base>/hvcpolicy-trust-XXXX/policies/fleet-2026.yaml, all root 0755/0644."""
    assert os.geteuid() == 0, "the permission suite plays root and nobody: run it as root"
    root = Path(tempfile.mkdtemp(prefix="hvcpolicy-trust-", dir=_trusted_base()))
    try:
        root.chmod(0o755)
        pol = root / "policies"
        pol.mkdir(mode=0o755)
        (pol / "fleet-2026.yaml").write_text(POLICY)
        (pol / "fleet-2026.yaml").chmod(0o644)
        yield pol
    finally:
        shutil.rmtree(root)


def test_a_root_owned_policy_is_trusted(tree: Path) -> None:
    path = policy_path("fleet-2026", str(tree))
    assert path is not None
    assert trust.check_policy_path(path, str(tree), as_root=True) == str(tree / "fleet-2026.yaml")
    assert load_policy_file(path).name == "fleet-2026"


@pytest.mark.parametrize("target", ["file", "policy_dir", "parent"])
def test_root_refuses_a_file_or_directory_owned_by_another_user(tree: Path, target: str) -> None:
    victim = {"file": tree / "fleet-2026.yaml", "policy_dir": tree, "parent": tree.parent}[target]
    os.chown(victim, NOBODY, -1)
    with pytest.raises(InvalidInput) as err:
        trust.check_policy_path(str(tree / "fleet-2026.yaml"), str(tree), as_root=True)
    assert f"{victim} is owned by" in str(err.value) and "not root" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode_bits", [0o020, 0o002, 0o022])
@pytest.mark.parametrize("target", ["file", "policy_dir", "parent"])
def test_root_refuses_group_or_other_writable(tree: Path, target: str, mode_bits: int) -> None:
    victim = {"file": tree / "fleet-2026.yaml", "policy_dir": tree, "parent": tree.parent}[target]
    victim.chmod(victim.stat().st_mode & 0o777 | mode_bits)
    with pytest.raises(InvalidInput) as err:
        trust.check_policy_path(str(tree / "fleet-2026.yaml"), str(tree), as_root=True)
    assert f"{victim} is writable by" in str(err.value) and "chmod go-w" in str(err.value)


def test_not_root_skips_ownership_but_not_containment(tree: Path) -> None:
    os.chown(tree / "fleet-2026.yaml", NOBODY, -1)
    (tree / "fleet-2026.yaml").chmod(0o666)
    trust.check_policy_path(str(tree / "fleet-2026.yaml"), str(tree), as_root=False)
    (tree / "escape.yaml").symlink_to("/etc/passwd")
    with pytest.raises(InvalidInput, match="outside the policy directory"):
        trust.check_policy_path(str(tree / "escape.yaml"), str(tree), as_root=False)


@pytest.mark.parametrize(
    "link",
    ["/etc/passwd", "../outside.yaml", "../policies-evil/fleet-2026.yaml", "/proc/self/environ"],
)
def test_a_policy_symlink_never_escapes_the_policy_dir(tree: Path, link: str) -> None:
    (tree.parent / "outside.yaml").write_text(POLICY)
    (tree.parent / "policies-evil").mkdir()
    (tree.parent / "policies-evil/fleet-2026.yaml").write_text(POLICY)
    (tree / "fleet-2026.yaml").unlink()
    (tree / "fleet-2026.yaml").symlink_to(link)
    with pytest.raises(InvalidInput, match="outside the policy directory"):
        trust.check_policy_path(str(tree / "fleet-2026.yaml"), str(tree), as_root=True)


def test_a_symlink_inside_the_policy_dir_is_followed_and_checked(tree: Path) -> None:
    (tree / "versions").mkdir(mode=0o755)
    (tree / "fleet-2026.yaml").rename(tree / "versions/fleet-2026.yaml")
    (tree / "fleet-2026.yaml").symlink_to("versions/fleet-2026.yaml")
    assert trust.check_policy_path(str(tree / "fleet-2026.yaml"), str(tree), as_root=True) == str(
        tree / "versions/fleet-2026.yaml"
    )
    os.chown(tree / "versions/fleet-2026.yaml", NOBODY, -1)
    with pytest.raises(InvalidInput, match="owned by"):
        trust.check_policy_path(str(tree / "fleet-2026.yaml"), str(tree), as_root=True)


def test_a_policy_that_is_not_a_regular_file_is_refused(tree: Path) -> None:
    (tree / "fleet-2026.yaml").unlink()
    os.mkfifo(tree / "fleet-2026.yaml", 0o644)  # a reader would block forever on a FIFO
    with pytest.raises(InvalidInput, match="not a regular file"):
        trust.check_policy_path(str(tree / "fleet-2026.yaml"), str(tree), as_root=True)


@pytest.mark.parametrize(
    "ref", ["../fleet-2026", "/etc/passwd", "a/b", "..", ".", "fleet-2026\n", "x" * 64, "Fleet"]
)
def test_a_ref_never_names_a_path(tree: Path, ref: str) -> None:
    """A domain's ref is a name ([a-z0-9-], at most 63), never a path."""
    with pytest.raises(InvalidInput):
        path = policy_path(ref, str(tree))
        # a name that passes must still resolve inside the directory
        assert path is not None
        trust.check_policy_path(path, str(tree), as_root=True)


def _sticky_site(tree: Path, mode: int, child_owner: int) -> Path:
    """<tree>/../shared (``mode``, e.g. 1777 like /tmp)/mine (0755, ``child_owner``)/p.yaml."""
    shared = tree.parent / "shared"
    shared.mkdir()
    shared.chmod(mode)
    mine = shared / "mine"
    mine.mkdir(mode=0o755)
    (mine / "p.yaml").write_text(POLICY)
    (mine / "p.yaml").chmod(0o644)
    os.chown(mine, child_owner, child_owner)
    return mine / "p.yaml"


def test_a_sticky_directory_above_a_root_owned_entry_is_trusted(tree: Path) -> None:
    """/tmp's case: others may write the sticky directory, but not rename, remove or replace
    root's entry in it."""
    path = _sticky_site(tree, 0o1777, 0)
    assert trust.check_policy_path(str(path), None, as_root=True) == str(path)
    # and the real /tmp, with a root-owned directory in it (CI's clone, pytest's tmp_path)
    if os.stat("/tmp").st_uid == 0:
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            (Path(tmp) / "p.yaml").write_text(POLICY)
            trust.check_policy_path(str(Path(tmp) / "p.yaml"), tmp, as_root=True)


def test_a_sticky_directory_above_an_entry_of_another_user_is_refused(tree: Path) -> None:
    path = _sticky_site(tree, 0o1777, NOBODY)
    with pytest.raises(InvalidInput, match="not trusted"):
        trust.check_policy_path(str(path), None, as_root=True)


def test_a_world_writable_directory_without_the_sticky_bit_is_refused(tree: Path) -> None:
    """Without the sticky bit anyone may rename root's entry away and put their own there."""
    path = _sticky_site(tree, 0o777, 0)
    with pytest.raises(InvalidInput, match="shared is writable by group and others"):
        trust.check_policy_path(str(path), None, as_root=True)


def test_the_file_itself_is_never_excused_by_a_sticky_bit(tree: Path) -> None:
    path = _sticky_site(tree, 0o1777, 0)
    path.chmod(0o1666)
    with pytest.raises(InvalidInput, match="writable by"):
        trust.check_policy_path(str(path), None, as_root=True)


def test_a_nul_in_a_path_is_refused() -> None:
    with pytest.raises(InvalidInput, match="NUL"):
        trust.check_policy_path("/etc/hvcpolicy/policies/x\0.yaml", None, as_root=True)


def test_check_is_cheap(tree: Path) -> None:
    """One stat per component: well under a millisecond on a hook's hot path."""
    import time

    path = str(tree / "fleet-2026.yaml")
    start = time.perf_counter()
    for _ in range(1000):
        trust.check_policy_path(path, str(tree), as_root=True)
    assert (time.perf_counter() - start) / 1000 < 0.002


# --- the QMP socket ---------------------------------------------------------------------------


@contextlib.contextmanager
def listening(path: Path) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def qmp_dir(tree: Path) -> Path:
    d = tree.parent / "qmp"
    d.mkdir(mode=0o750)
    os.chown(d, NOBODY, NOBODY)  # as QEMU's user owns /var/lib/libvirt/qemu/hvcpolicy
    return d


def test_a_socket_in_a_private_directory_is_trusted(qmp_dir: Path) -> None:
    with listening(qmp_dir / "web1.qmp"):
        trust.check_qmp_socket(str(qmp_dir / "web1.qmp"))
    qmp_dir.chmod(0o770)  # group-writable (QEMU's group) is fine; others are not
    with listening(qmp_dir / "web2.qmp"):
        trust.check_qmp_socket(str(qmp_dir / "web2.qmp"))


def test_a_symlink_to_a_socket_is_refused(qmp_dir: Path) -> None:
    with listening(qmp_dir / "real.qmp"):
        (qmp_dir / "web1.qmp").symlink_to(qmp_dir / "real.qmp")
        with pytest.raises(InvalidInput, match="symlink"):
            trust.check_qmp_socket(str(qmp_dir / "web1.qmp"))


@pytest.mark.parametrize("kind", ["file", "dir", "fifo"])
def test_something_other_than_a_socket_is_refused(qmp_dir: Path, kind: str) -> None:
    path = qmp_dir / "web1.qmp"
    if kind == "file":
        path.write_text("{}")
    elif kind == "dir":
        path.mkdir()
    else:
        os.mkfifo(path)
    with pytest.raises(InvalidInput, match="not a unix socket"):
        trust.check_qmp_socket(str(path))


def test_a_socket_in_a_directory_others_can_write_is_refused(qmp_dir: Path) -> None:
    qmp_dir.chmod(0o777)
    with listening(qmp_dir / "web1.qmp"), pytest.raises(InvalidInput, match="writable by others"):
        trust.check_qmp_socket(str(qmp_dir / "web1.qmp"))
    qmp_dir.chmod(0o1777)  # sticky does not help: others can still create the name first
    with listening(qmp_dir / "web2.qmp"), pytest.raises(InvalidInput, match="writable by others"):
        trust.check_qmp_socket(str(qmp_dir / "web2.qmp"))


def test_a_missing_socket_is_left_to_the_callers_bounded_retry(qmp_dir: Path) -> None:
    with pytest.raises(FileNotFoundError):
        trust.check_qmp_socket(str(qmp_dir / "not-yet.qmp"))


@pytest.mark.parametrize("path", ["relative.qmp", "", "/tmp/x\0y"])
def test_a_socket_path_must_be_absolute(path: str) -> None:
    with pytest.raises(InvalidInput, match="absolute"):
        trust.check_qmp_socket(path)


# --- wired into the hook (tracking: the lead wires trust into policy loading and the QMP
# connect; these strict xfails turn into failures once it is, and the markers go) -------------

HOOK_XML = (
    "<domain><name>d</name><uuid>6c1b7a1e-3f0c-4c52-9a51-1f6b0e1e0001</uuid><metadata>"
    "<hvc:policy xmlns:hvc='https://hvcpolicy.dev/xmlns/libvirt/1' ref='fleet-2026'>{qmp}"
    "</hvc:policy></metadata></domain>"
)


def _hook_conf(tree: Path) -> Path:
    shutil.copy(
        Path(__file__).resolve().parents[2] / "examples/hosts/neoverse-n1_linux-6.18.json",
        tree.parent / "host.json",
    )
    conf = tree.parent / "hook.conf"
    conf.write_text(f"policy_dir = {tree}\nhost_snapshot = {tree.parent}/host.json\n")
    conf.chmod(0o644)
    return conf


def test_the_hook_loads_a_trusted_policy(tree: Path) -> None:
    from tests.hardening.simthread import run_hook

    run = run_hook(
        str(_hook_conf(tree)), ["d", "prepare", "begin", "-"], HOOK_XML.format(qmp="").encode()
    )
    assert run.rc == 0, run.stderr


def test_the_hook_refuses_a_policy_root_cannot_trust(tree: Path) -> None:
    from tests.hardening.simthread import run_hook

    conf = _hook_conf(tree)
    (tree / "fleet-2026.yaml").chmod(0o666)
    run = run_hook(str(conf), ["d", "prepare", "begin", "-"], HOOK_XML.format(qmp="").encode())
    assert run.rc == 1 and "not trusted" in run.stderr, run.stderr


def test_the_hook_refuses_a_symlinked_qmp_socket(tree: Path) -> None:
    from tests.hardening.simthread import run_hook, simulators
    from tests.hardening.test_qmp_faults import domain_xml

    conf = _hook_conf(tree)
    (tree / "default.yaml").write_text(POLICY.replace("name: fleet-2026", "name: default"))
    with simulators(1) as [sim]:
        link = Path(sim.path).with_name("link.qmp")
        link.symlink_to(sim.path)
        # no metadata: the default policy applies and no recorder child is started
        run = run_hook(str(conf), ["d", "started", "begin", "-"], domain_xml("d", str(link)))
        assert run.rc == 1 and "symlink" in run.stderr, run.stderr
        assert sim.vm.get_all() == sim.fresh
