"""The hook's configuration: a file, not the environment (libvirt passes only PATH, HOME, LC_ALL).

``/etc/hvcpolicy/hook.conf``, or for a non-root (``qemu:///session``) daemon
``~/.config/hvcpolicy/hook.conf`` when that exists. ``key = value`` lines::

    policy_dir = /etc/hvcpolicy/policies
    host_snapshot = /var/lib/hvcpolicy/host.json
    cache_dir = /var/cache/hvcpolicy
    qmp_timeout = 5
    audit_file =                # optional: also append audit lines here (syslog always)
    run_dir = /run/hvcpolicy
    save_dir =                  # the stream backend's images (0700); empty: /var/lib/hvcpolicy/save
                                # for root, ~/.local/state/hvcpolicy/save for a session user
"""

from __future__ import annotations

import os

from hvcpolicy.errors import InvalidInput

TYPE_CHECKING = False  # typing costs more than the interpreter's start-up: checker-only names
if TYPE_CHECKING:
    from collections.abc import Mapping

SYSTEM_CONF = "/etc/hvcpolicy/hook.conf"
USER_CONF = ".config/hvcpolicy/hook.conf"  # under a session daemon user's home
DEFAULTS = {
    "policy_dir": "/etc/hvcpolicy/policies",
    "host_snapshot": "/var/lib/hvcpolicy/host.json",
    "cache_dir": "/var/cache/hvcpolicy",
    "qmp_timeout": "5",
    "audit_file": "",
    "run_dir": "/run/hvcpolicy",
    "save_dir": "",
}
MAX_CONF = 64 << 10


class Config:
    def __init__(self, values: Mapping[str, str], path: str) -> None:
        self.path = path
        self.policy_dir = values["policy_dir"]
        self.host_snapshot = values["host_snapshot"]
        self.cache_dir = values["cache_dir"]
        self.audit_file = values["audit_file"] or None
        self.run_dir = values["run_dir"]
        self.save_dir = values["save_dir"] or None
        try:
            self.qmp_timeout = float(values["qmp_timeout"])
        except ValueError:
            raise InvalidInput("qmp_timeout: not a number of seconds", path) from None
        if not 0 < self.qmp_timeout <= 300:
            raise InvalidInput("qmp_timeout: must be in (0, 300] seconds", path)


def config_path(uid: int | None = None) -> str:
    """The config this daemon's hook reads: the system one, or a session user's own."""
    uid = os.getuid() if uid is None else uid
    if uid != 0:
        import pwd

        try:
            home = pwd.getpwuid(uid).pw_dir
        except KeyError:
            return SYSTEM_CONF
        candidate = os.path.join(home, USER_CONF)
        if os.path.exists(candidate):
            return candidate
    return SYSTEM_CONF


def parse_config(text: str, path: str) -> dict[str, str]:
    values = dict(DEFAULTS)
    for number, raw in enumerate(text.splitlines(), 1):
        content = raw.split("#", 1)[0].strip()
        if not content:
            continue
        key, sep, value = content.partition("=")
        key = key.strip()
        if not sep or key not in DEFAULTS:
            raise InvalidInput(
                f"line {number}: expected one of {', '.join(DEFAULTS)} = VALUE", path
            )
        values[key] = value.strip()
    return values


def load_config(path: str | None = None) -> Config:
    """Read the hook config; a file others could have written is not trusted."""
    from hvcpolicy.trust import open_config

    path = path or config_path()
    fd = open_config(path)
    if fd is None:
        return Config(DEFAULTS, path)
    try:
        data = os.read(fd, MAX_CONF + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_CONF:
        raise InvalidInput(f"larger than {MAX_CONF} bytes", path)
    return Config(parse_config(data.decode("utf-8", "replace"), path), path)
