"""``hvcpolicy image show`` and ``check-migration --image``, run as the command a user runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvcpolicy.stream import parse_stream
from tests.conftest import EXAMPLES, REPO
from tests.stream.streamlib import KERNEL_618, PSCI, VENDOR2, save_header, with_firmware

HOSTS = EXAMPLES / "hosts"
N1_618 = str(HOSTS / "neoverse-n1_linux-6.18.json")
N1_61 = str(HOSTS / "neoverse-n1_linux-6.1.json")


def hvc(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "hvcpolicy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )


@pytest.fixture()
def fw_image(fw_stream: bytes, tmp_path: Path) -> Path:
    path = tmp_path / "web1.save"
    path.write_bytes(save_header(fw_stream, fmt=6))
    return path


def test_image_show_text(fw_image: Path) -> None:
    done = hvc("image", "show", str(fw_image))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"{fw_image}: libvirt save image (sparse, version 2, was running: no)" in out
    assert "2 vCPU(s)" in out
    assert "vCPU 0      vCPU 1" in out
    assert "PSCI_VERSION        0x6030000000140000       0x10003     0x10003" in out
    assert "VENDOR_HYP_BMAP_2   0x6030000000160003           0x0         0x0" in out
    # the feature table is explain's (without the policy and host columns)
    assert "FEATURE                 REGISTER            BIT  GUEST SEES" in out
    assert "ptp                     VENDOR_HYP_BMAP       1  yes" in out
    assert "discover-impl-ver       VENDOR_HYP_BMAP_2     0  no" in out
    assert "PSCI: the guest sees 1.3" in out
    assert "smccc-arch-workaround-1: guest level 2 (not-required)" in out


def test_image_show_json(fw_image: Path) -> None:
    done = hvc("image", "show", str(fw_image), "--format", "json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["kind"] == "libvirt-sparse" and doc["save"]["format"] == "sparse"
    assert [v["instance_id"] for v in doc["vcpus"]] == [0, 1]
    want = {f"0x{r:016x}": f"0x{v:x}" for r, v in KERNEL_618.items()}
    assert all(v["registers"] == want for v in doc["vcpus"])
    assert doc["vcpus"][0]["names"]["0x6030000000140000"] == "PSCI_VERSION"
    seen = {f["feature"]: f["guest_sees"] for f in doc["features"]}
    assert seen["ptp"] is True and seen["discover-impl-cpus"] is False


def test_image_show_tcg_stream(real_stream: bytes, tmp_path: Path) -> None:
    path = tmp_path / "tcg.bin"
    path.write_bytes(real_stream)
    done = hvc("image", "show", str(path))
    assert done.returncode == 0, done.stderr
    assert "QEMU migration stream, 2 vCPU(s)" in done.stdout
    assert "no firmware registers" in done.stdout


def test_check_migration_image(fw_stream: bytes, tmp_path: Path) -> None:
    path = tmp_path / "web1.save"
    path.write_bytes(save_header(fw_stream))
    ok = hvc("check-migration", "--image", str(path), "--to", N1_618)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ACCEPT") and "the registers the saved guest carries" in ok.stdout
    # 6.1 lacks VENDOR_HYP_BMAP_2 and implements PSCI up to 1.1: every reason is listed
    no = hvc("check-migration", "--image", str(path), "--to", N1_61)
    assert no.returncode == 3
    reasons = [line for line in no.stdout.splitlines() if line.startswith("  reason:")]
    assert any("VENDOR_HYP_BMAP_2" in r for r in reasons), no.stdout
    assert any("PSCI_VERSION" in r for r in reasons), no.stdout
    doc = json.loads(
        hvc(
            "check-migration", "--image", str(path), "--to",
            N1_61, "--format", "json",
        ).stdout
    )  # fmt: skip
    assert doc["ok"] is False and doc["basis"] == "image" and len(doc["reasons"]) == len(reasons)
    # a saved guest already pinned to what 6.1 offers restores there
    s = parse_stream(fw_stream, "fw")
    from hvcpolicy.stream import apply

    pinned = apply(fw_stream, s.edits({PSCI: 0x10001}))
    fewer = {r: v for r, v in parse_stream(pinned, "p").firmware().items() if r != VENDOR2}
    base = parse_stream(pinned, "p")
    # drop VENDOR_HYP_BMAP_2 from both lists, as a guest saved on 6.1 would have them
    from hvcpolicy.stream import replace_lists

    old = replace_lists(
        pinned,
        [{r: v for r, v in c.registers.items() if r != VENDOR2} for c in base.vcpus],
    )
    assert parse_stream(old, "o").firmware() == fewer
    path.write_bytes(save_header(old))
    fine = hvc("check-migration", "--image", str(path), "--to", N1_61)
    assert fine.returncode == 0, fine.stdout


def bad_images(real_stream: bytes, fw_stream: bytes) -> dict[str, bytes]:
    good = save_header(fw_stream)
    s = parse_stream(fw_stream, "x")
    corrupt = bytearray(good)
    corrupt[92 + 65536 + s.vcpus[1].ids_offset - 2] ^= 0x40
    return {
        "corrupted": bytes(corrupt),
        "truncated": good[: len(good) - 4000],
        "compressed": save_header(fw_stream, fmt=3),
        "partial": save_header(fw_stream, magic=b"LibvirtQemudPart"),
        "empty": b"",
        "text": b"hello\n",
        "no-vmdesc": real_stream[: parse_stream(real_stream, "r").vmdesc_offset],
        "disagree": with_firmware(real_stream, [KERNEL_618, {**KERNEL_618, PSCI: 0x10001}]),
    }


@pytest.mark.parametrize(
    "kind",
    ["corrupted", "truncated", "compressed", "partial", "empty", "text", "no-vmdesc", "disagree"],
)
def test_bad_image_exit_4_one_line(
    kind: str, real_stream: bytes, fw_stream: bytes, tmp_path: Path
) -> None:
    path = tmp_path / f"{kind}.save"
    path.write_bytes(bad_images(real_stream, fw_stream)[kind])
    for args in (
        ("image", "show", str(path)),
        (
            "check-migration",
            "--image",
            str(path),
            "--to",
            N1_61,
        ),
    ):
        done = hvc(*args)
        assert done.returncode == 4, (kind, done.stdout, done.stderr)
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"hvcpolicy: {path}: ")
        assert "Traceback" not in done.stderr
    if kind == "compressed":
        assert "save_image_format" in done.stderr


def test_missing_file_and_usage(tmp_path: Path) -> None:
    done = hvc("image", "show", str(tmp_path / "nope"))
    assert done.returncode == 4 and "nope: cannot open" in done.stderr
    assert hvc("image").returncode == 2
    assert hvc("check-migration", "--image", "x", "--policy", "y", "--to", "z").returncode == 2


def test_image_show_is_fast_on_a_large_sparse_image(fw_stream: bytes, tmp_path: Path) -> None:
    """16 GiB of holes before the device sections, as a sparse (mapped-ram) image has: the
    command reads the header, the XML and the tail only."""
    path = tmp_path / "big.save"
    head = save_header(b"", fmt=6)
    with path.open("wb") as f:
        f.write(head + fw_stream[:8])
        f.seek(16 << 30)
        f.write(fw_stream[-100_000:])
    t = time.monotonic()
    done = hvc("image", "show", str(path))
    took = time.monotonic() - t
    assert done.returncode == 0, done.stderr
    assert took < 5, took
