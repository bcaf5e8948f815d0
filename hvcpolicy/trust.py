"""What hvcpolicy trusts on disk (docs/SECURITY.md): every such decision is made here.

- policy files (``check_policy_path``, ``check_tree``) and the QMP socket (``check_qmp_socket``);
- the hook's config (``open_config``): owned by root or the daemon's user, writable by no one else;
- hvcpolicy's own state (the validated policy cache, the start lock and its files):
  ``private``, ``private_dir``, ``own_dir``, ``open_private``, ``read_private``: owned by this
  user, writable by no one else, never reached through a symlink.

The hook runs as root inside libvirtd. A policy decides which firmware services a guest sees,
so as root a policy is only read from a file that root alone could have written: the file and
every directory above it, up to ``/``, owned by root and writable by neither group nor others
(sshd's StrictModes, sudo's sudoers checks). A policy named by a domain (``ref``) resolves, after
every symlink, inside the policy directory. The QMP socket the hook talks to must be a socket
(``lstat``: not a symlink to one) in a directory others cannot write, so a guest's user cannot
plant a fake QEMU there.

Stdlib only and cheap: one ``stat`` per path component; only the ``*_private`` helpers and
``open_config`` open the file they judge (and judge the open file, not the name).
"""

from __future__ import annotations

import os
import stat

from hvcpolicy.errors import InvalidInput, bounded

__all__ = [
    "check_policy_path",
    "check_qmp_socket",
    "check_tree",
    "open_config",
    "open_private",
    "own_dir",
    "private",
    "private_dir",
    "read_private",
]

_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def _who(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def check_tree(path: str, what: str, owner: int = 0) -> None:
    """``path`` (already resolved) and every directory above it: owned by ``owner`` (or root)
    and writable by no group and no other user. InvalidInput names the first that is not.

    One exception, for directories above ``path`` (never ``path`` itself): a sticky directory
    that others may write (``/tmp``, 1777) is accepted when the next component down is owned
    by root, since the sticky bit lets no one but root (and the entry's owner) rename, remove or
    replace root's entry there."""
    current = path
    below: os.stat_result | None = None  # the component under ``current``, once there is one
    below_path = path
    while True:
        try:
            st = os.stat(current)
        except OSError as err:
            raise InvalidInput(
                f"not trusted: cannot stat {bounded(current)}: {err.strerror}", what
            ) from None
        if st.st_uid not in (0, owner):
            raise InvalidInput(
                f"not trusted: {bounded(current)} is owned by {_who(st.st_uid)}, not root "
                f"(fix: chown root {bounded(current)})",
                what,
            )
        # a sticky directory above ``path``: others may write it, not replace root's entry
        sticky = below is not None and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
        rooted = below is not None and below.st_uid == 0
        if st.st_mode & _WRITABLE_BY_OTHERS and not (sticky and rooted):
            who = (
                "group and others"
                if st.st_mode & stat.S_IWOTH and st.st_mode & stat.S_IWGRP
                else ("others" if st.st_mode & stat.S_IWOTH else "its group")
            )
            if sticky:
                raise InvalidInput(
                    f"not trusted: {bounded(current)} is writable by {who} (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}) and {bounded(below_path)} in it is not "
                    f"root's (fix: chown root {bounded(below_path)})",
                    what,
                )
            raise InvalidInput(
                f"not trusted: {bounded(current)} is writable by {who} "
                f"(mode {stat.S_IMODE(st.st_mode):04o}; fix: chmod go-w {bounded(current)})",
                what,
            )
        parent = os.path.dirname(current)
        if parent == current:
            return
        below, below_path = st, current
        current = parent


def check_policy_path(path: str, policy_dir: str | None, as_root: bool) -> str:
    """Check a policy file before it is read; the resolved path to read.

    - ``policy_dir`` given (a policy named by ``ref`` or ``default``): the file, after every
      symlink, must lie inside the resolved policy directory.
    - ``as_root``: the resolved file and each directory above it up to ``/`` must be owned by
      root and not writable by group or others; the file must be a regular file.

    InvalidInput (exit 4) names the file and what to fix.
    """
    if "\0" in path:
        raise InvalidInput("not trusted: the path holds a NUL byte", bounded(path))
    real = os.path.realpath(path)
    if policy_dir is not None:
        real_dir = os.path.realpath(policy_dir)
        if not _inside(real, real_dir) or real == real_dir:
            raise InvalidInput(
                f"not trusted: resolves to {bounded(real)}, outside the policy directory "
                f"{bounded(real_dir)}",
                bounded(path),
            )
    if not as_root:
        return real
    try:
        st = os.stat(real)
    except OSError as err:
        raise InvalidInput(f"cannot read: {err.strerror}", bounded(path)) from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput("not trusted: not a regular file", bounded(path))
    check_tree(real, bounded(path))
    return real


def check_qmp_socket(path: str) -> None:
    """The QMP socket the hook or ``apply`` is about to connect to.

    Raises FileNotFoundError while the socket does not exist yet (QEMU may still be creating
    it: callers retry, bounded), InvalidInput when it is a symlink, not a socket, not absolute,
    or in a directory that others (``o+w``) can write.
    """
    where = f"QMP socket {bounded(path)}"
    if not path.startswith("/") or "\0" in path:
        raise InvalidInput("must be an absolute path", where)
    st = os.lstat(path)  # FileNotFoundError propagates: not there yet
    if stat.S_ISLNK(st.st_mode):
        raise InvalidInput("not trusted: a symlink (name the socket itself)", where)
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidInput("not trusted: not a unix socket", where)
    parent = os.path.dirname(path) or "/"
    try:
        pst = os.stat(parent)
    except OSError as err:
        raise InvalidInput(f"cannot stat its directory: {err.strerror}", where) from None
    if pst.st_mode & stat.S_IWOTH:
        raise InvalidInput(
            f"not trusted: its directory {bounded(parent)} is writable by others "
            f"(mode {stat.S_IMODE(pst.st_mode):04o}); use a directory only QEMU's user and root "
            "can write, e.g. /var/lib/libvirt/qemu/hvcpolicy",
            where,
        )


# --- the hook's config -----------------------------------------------------------------------


def open_config(path: str) -> int | None:
    """An fd on the hook's config; None when there is none. A file others could have written
    (owner not root nor this user, group- or world-writable) is refused: InvalidInput."""
    from hvcpolicy.errors import Unavailable

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise Unavailable(f"{path}: cannot read: {err.strerror}") from None
    st = os.fstat(fd)
    if st.st_uid not in (0, os.getuid()) or st.st_mode & _WRITABLE_BY_OTHERS:
        os.close(fd)
        raise InvalidInput(
            "not trusted: must be owned by root (or this daemon's user) and writable by "
            "no one else",
            path,
        )
    return fd


# --- hvcpolicy's own state: the policy cache, the start lock ---------------------------------


def private(st: os.stat_result) -> bool:
    """Owned by this (effective) user and writable by no one else."""
    return st.st_uid == os.geteuid() and not st.st_mode & _WRITABLE_BY_OTHERS


def private_dir(path: str, follow: bool = False) -> bool:
    """``path`` is a directory that is ``private`` (``follow``: through a symlink to it)."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and private(st)


def own_dir(path: str, mode: int) -> bool:
    """``path`` made (``mode``) when missing; whether it is a ``private`` directory."""
    try:
        os.makedirs(path, mode, exist_ok=True)
    except OSError:
        return False
    return private_dir(path)


def open_private(path: str, flags: int, kind: int) -> int | None:
    """An fd on ``path`` (never through a symlink) when it is a ``kind`` (``stat.S_IFREG``,
    ``S_IFIFO``) that is ``private``; else None."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        st = os.fstat(fd)
    except OSError:
        return None
    if stat.S_IFMT(st.st_mode) != kind or not private(st):
        os.close(fd)
        return None
    return fd


def read_private(path: str, limit: int) -> bytes | None:
    """At most ``limit`` bytes of a ``private`` regular file in a ``private`` directory (which
    may be a symlink); None for anything else, or a file that cannot be read."""
    fd = open_private(path, os.O_RDONLY, stat.S_IFREG)
    if fd is None:
        return None
    try:
        if not private_dir(os.path.dirname(path), follow=True):
            return None
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)
