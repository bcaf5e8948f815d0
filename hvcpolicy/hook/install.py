"""What ``hvcpolicy install-hook`` puts on a host: the hook script (``hooks/qemu``, rendered for
this Python and this package), the hook's config, the validated policy cache; then libvirtd is
told (SIGHUP) so it finds the hook."""

from __future__ import annotations

import os

from hvcpolicy.errors import Unavailable

HOOK_NAME = "hvcpolicy"
# Where the hook script's template is found: next to the package (a checkout), or where the
# Debian and RPM packages put it.
HOOK_TEMPLATES = ("{pkgparent}/hooks/qemu", "/usr/share/hvcpolicy/hooks/qemu")


def package_parent() -> str:
    """The directory that holds the ``hvcpolicy`` package: what the hook puts on sys.path."""
    import hvcpolicy

    return os.path.dirname(os.path.dirname(os.path.abspath(hvcpolicy.__file__)))


def _template(pkgparent: str) -> str:
    for pattern in HOOK_TEMPLATES:
        path = pattern.format(pkgparent=pkgparent)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    raise Unavailable(
        "the hook script is not installed (looked in "
        + ", ".join(p.format(pkgparent=pkgparent) for p in HOOK_TEMPLATES)
        + ")"
    )


def _sh_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def render_hook(
    template: str, python: str, pkgparent: str, policy_dir: str, run_dir: str = "/run/hvcpolicy"
) -> str:
    import re

    settings = {
        "HVC_PYTHON": python,
        "HVC_PKGDIR": pkgparent,
        "HVC_POLICY_DIR": policy_dir,
        "HVC_RUN_DIR": run_dir,
    }
    out = template
    for key, value in settings.items():
        out, n = re.subn(rf"^{key}=.*$", f"{key}={_sh_quote(value)}", out, count=1, flags=re.M)
        if n != 1:
            raise Unavailable(f"hook template has no {key}= line")
    return out


def write_config(path: str, updates: dict[str, str | None]) -> dict[str, str]:
    """Update (or create) the hook config with ``updates``; -> every value it now holds."""
    from hvcpolicy.files import write_atomic
    from hvcpolicy.hook.config import DEFAULTS, parse_config

    current: dict[str, str] = dict(DEFAULTS)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            current = parse_config(f.read(), path)
    for key, value in updates.items():
        if value is not None:
            current[key] = value
    lines = ["# hvcpolicy libvirt hook configuration (written by `hvcpolicy install-hook`)"]
    lines += [f"{k} = {current[k]}" for k in DEFAULTS]
    write_atomic(path, "\n".join(lines) + "\n", 0o644)
    return current


def refresh_policy_cache(policy_dir: str, cache_dir: str) -> list[str]:
    """Validate every policy in the directory into the hook's cache; -> the names cached."""
    from hvcpolicy import policystore
    from hvcpolicy.policy import EXTENSIONS, load_policy_file

    names: list[str] = []
    if not os.path.isdir(policy_dir):
        return names
    for entry in sorted(os.listdir(policy_dir)):
        if entry.endswith(EXTENSIONS):
            policy = load_policy_file(os.path.join(policy_dir, entry))
            policystore.store(policy, policy_dir, cache_dir)
            names.append(policy.name)
    return names


def reload_libvirtd(pid_file: str) -> str:
    """SIGHUP the libvirtd of ``pid_file`` (checked to be libvirtd), so it finds the hook."""
    try:
        with open(pid_file, encoding="ascii") as f:
            pid = int(f.read().strip() or "0")
    except (OSError, ValueError):
        return f"no libvirtd pid in {pid_file}: start (or restart) libvirtd to load the hook"
    try:
        with open(f"/proc/{pid}/comm", encoding="ascii") as f:
            comm = f.read().strip()
    except OSError:
        return f"libvirtd ({pid_file}: {pid}) is not running: it finds the hook when it starts"
    if comm not in ("libvirtd", "virtqemud"):
        return f"{pid_file} names pid {pid} ({comm}), not libvirtd: not signalled"
    import signal

    os.kill(pid, signal.SIGHUP)
    return f"{comm} (pid {pid}) reloaded"


def install_hook(
    hooks_dir: str,
    conf_path: str,
    python: str,
    updates: dict[str, str | None],
    reload_pid_file: str | None,
) -> list[str]:
    """Write the config (``updates`` over what it holds), refresh the policy cache, install the
    hook script, reload libvirtd (unless ``reload_pid_file`` is None); -> what was done."""
    from hvcpolicy.files import write_atomic
    from hvcpolicy.hook.config import load_config

    pkgparent = package_parent()
    values = write_config(conf_path, updates)
    load_config(conf_path)  # what the hook will read must parse and be trusted
    os.makedirs(values["cache_dir"], mode=0o755, exist_ok=True)
    cached = refresh_policy_cache(values["policy_dir"], values["cache_dir"])
    script = render_hook(
        _template(pkgparent), python, pkgparent, values["policy_dir"], values["run_dir"]
    )
    target = os.path.join(hooks_dir, "qemu.d", HOOK_NAME)
    write_atomic(target, script, 0o755)
    out = [f"installed {target} (python {python}, package {pkgparent})", f"config {conf_path}"]
    if cached:
        out.append(f"policy cache {values['cache_dir']}: {', '.join(cached)}")
    if reload_pid_file is not None:
        out.append(reload_libvirtd(reload_pid_file))
    return out
