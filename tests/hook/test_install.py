"""install-hook's rendering of the hook script: each setting reaches sh exactly as given, whatever
the path holds (quotes, spaces, backslashes, what a regex replacement would read as a group)."""

from __future__ import annotations

import subprocess

import pytest

from hvcpolicy.errors import Unavailable
from hvcpolicy.hook.install import _template, render_hook

ODD = ["/usr/bin/python3", r"/opt/a\1b c", "/etc/it's", '/srv/"$HOME"`id`;x']


def test_settings_reach_sh_verbatim() -> None:
    script = render_hook(_template(), *ODD)
    keys = ("HVC_PYTHON=", "HVC_PKGDIR=", "HVC_POLICY_DIR=", "HVC_RUN_DIR=")
    settings = "".join(line + "\n" for line in script.splitlines() if line.startswith(keys))
    assert settings.count("\n") == 4  # the template's four settings, each replaced once
    shown = subprocess.run(
        ["sh", "-c", settings + 'printf "%s\\n" "$HVC_PYTHON" "$HVC_PKGDIR" "$HVC_POLICY_DIR" '
         '"$HVC_RUN_DIR"'],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert shown.stdout.splitlines() == ODD


def test_a_template_without_a_setting_is_refused() -> None:
    with pytest.raises(Unavailable, match="HVC_RUN_DIR"):
        render_hook(_template().replace("HVC_RUN_DIR=", "X="), *ODD)
