"""hvcpolicy.stream and hvcpolicy.imagefile on real QEMU streams (qemu-system-aarch64, TCG, two
vCPUs, never run) and on real streams given KVM's firmware registers.

A patch is proven by QEMU itself: the patched stream is loaded into a fresh QEMU and saved again,
and the new stream holds the patched values, each vCPU its own."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from hvcpolicy import catalogue as cat
from hvcpolicy.errors import InvalidInput
from hvcpolicy.imagefile import patch_image, read_image
from hvcpolicy.stream import Edit, apply, parse_stream, replace_lists
from tests.stream.qemulib import load_stream, save_stream
from tests.stream.streamlib import (
    KERNEL_618,
    PSCI,
    STD_HYP,
    TPIDR_EL0,
    VENDOR,
    VENDOR2,
    with_firmware,
)

CPREG_ARRAYS = ("cpreg_vmstate_indexes", "cpreg_vmstate_values")


def test_real_stream_has_every_vcpu_list(real_stream: bytes) -> None:
    s = parse_stream(real_stream, "real.bin")
    assert [c.instance_id for c in s.vcpus] == [0, 1]
    a, b = s.vcpus
    assert len(a.registers) > 100 and a.registers.keys() == b.registers.keys()
    assert list(a.registers) == sorted(a.registers)
    assert a.values_offset == a.ids_offset + 8 * len(a.registers) < b.ids_offset
    # the count QEMU wrote just before the ids, and the vmdesc's array_len, agree with the list
    assert struct.unpack_from(">i", real_stream, a.ids_offset - 4)[0] == len(a.registers)
    doc = json.loads(real_stream[s.vmdesc_offset + 5 :])
    cpus = [d for d in doc["devices"] if d["name"] == "cpu"]
    lens = [f["array_len"] for d in cpus for f in d["fields"] if f["name"] in CPREG_ARRAYS]
    assert lens == [len(a.registers)] * 4
    # TCG lists carry no firmware registers: a KVM guest's do
    assert s.firmware() == {} and TPIDR_EL0 in a.registers


def test_one_vcpu_and_a_larger_guest(stream_dir: Path) -> None:
    one = parse_stream(save_stream(stream_dir / "one.bin", smp=1).read_bytes(), "one.bin")
    assert len(one.vcpus) == 1
    four = save_stream(stream_dir / "four.bin", smp=4, mem="1024")
    assert [c.instance_id for c in read_image(str(four)).stream.vcpus] == [0, 1, 2, 3]


def test_patch_every_vcpu_and_qemu_loads_it(real_stream: bytes, stream_dir: Path) -> None:
    path = stream_dir / "patched.bin"
    path.write_bytes(real_stream)
    before = read_image(str(path))
    after = patch_image(str(path), {TPIDR_EL0: 0x1234ABCD}, expect=before, any_register=True)
    assert [c.registers[TPIDR_EL0] for c in after.stream.vcpus] == [0x1234ABCD] * 2
    data = path.read_bytes()
    assert len(data) == len(real_stream)
    changed = [i for i in range(len(data)) if data[i] != real_stream[i]]
    spots = [before.stream.vcpus[k].value_offset(TPIDR_EL0) for k in (0, 1)]
    assert all(any(o <= i < o + 8 for o in spots) for i in changed) and changed
    # QEMU loads it, and a save of the loaded guest carries the values on both vCPUs
    resaved = stream_dir / "patched-resaved.bin"
    assert load_stream(path, resave=resaved) == ""
    assert [c.registers[TPIDR_EL0] for c in read_image(str(resaved)).stream.vcpus] == [
        0x1234ABCD
    ] * 2


def test_each_vcpu_list_is_that_vcpus_own(real_stream: bytes, stream_dir: Path) -> None:
    """Different values in each list come back on the matching vCPU: the offsets are right."""
    s = parse_stream(real_stream, "real.bin")
    edits = [
        Edit(c.instance_id, TPIDR_EL0, c.value_offset(TPIDR_EL0), 0, 0x1111 * (c.instance_id + 1))
        for c in s.vcpus
    ]
    path = stream_dir / "per-vcpu.bin"
    path.write_bytes(apply(real_stream, edits))
    resaved = stream_dir / "per-vcpu-resaved.bin"
    assert load_stream(path, resave=resaved) == ""
    got = [c.registers[TPIDR_EL0] for c in read_image(str(resaved)).stream.vcpus]
    assert got == [0x1111, 0x2222]


def test_qemu_reads_the_ids_where_the_parser_found_them(
    real_stream: bytes, stream_dir: Path
) -> None:
    """An id QEMU does not know, in the middle of vCPU 1's list (QEMU <= 10 ignores unknown ids
    above its own largest), fails the load."""
    s = parse_stream(real_stream, "real.bin")
    cpu = s.vcpus[1]
    ids = list(cpu.registers)
    k = next(i for i in range(len(ids) // 2, len(ids) - 1) if ids[i] + 1 < ids[i + 1])
    bad = bytearray(real_stream)
    struct.pack_into(">Q", bad, cpu.ids_offset + 8 * k, ids[k] + 1)
    path = stream_dir / "bad-id.bin"
    path.write_bytes(bytes(bad))
    assert parse_stream(bytes(bad), "bad").vcpus[1].registers.keys() != cpu.registers.keys()
    assert load_stream(path) != ""


def test_replace_lists_same_lists_loads(real_stream: bytes, stream_dir: Path) -> None:
    s = parse_stream(real_stream, "real.bin")
    same = replace_lists(real_stream, [c.registers for c in s.vcpus])
    path = stream_dir / "same.bin"
    path.write_bytes(same)
    assert parse_stream(same, "same").vcpus == s.vcpus
    assert load_stream(path) == ""


# --- firmware registers (real streams given KVM's lists) ------------------------------------


def test_firmware_of_every_vcpu(fw_stream: bytes) -> None:
    s = parse_stream(fw_stream, "fw.bin")
    assert s.firmware() == KERNEL_618
    assert [c.firmware for c in s.vcpus] == [KERNEL_618] * 2


def test_edits_cover_every_vcpu_and_only_changes(fw_stream: bytes) -> None:
    s = parse_stream(fw_stream, "fw.bin")
    edits = s.edits({PSCI: 0x10001, STD_HYP: 0, VENDOR: KERNEL_618[VENDOR]})
    assert [(e.vcpu, e.register) for e in edits] == [
        (0, PSCI),
        (0, STD_HYP),
        (1, PSCI),
        (1, STD_HYP),
    ]
    out = apply(fw_stream, edits)
    assert len(out) == len(fw_stream)
    after = parse_stream(out, "fw.bin")
    want = {**KERNEL_618, PSCI: 0x10001, STD_HYP: 0}
    assert [c.firmware for c in after.vcpus] == [want] * 2
    # everything else is unchanged
    assert [
        {r: v for r, v in c.registers.items() if not cat.is_firmware_reg(r)} for c in after.vcpus
    ] == [{r: v for r, v in c.registers.items() if not cat.is_firmware_reg(r)} for c in s.vcpus]


def test_edits_refuse(fw_stream: bytes) -> None:
    s = parse_stream(fw_stream, "fw.bin")
    no_bmap2 = {r: v for r, v in KERNEL_618.items() if r != VENDOR2}
    lacking = parse_stream(with_firmware(s_without_fw(fw_stream), no_bmap2), "old.bin")
    with pytest.raises(
        InvalidInput, match=r"old.bin: vCPU 0's cpreg list has no VENDOR_HYP_BMAP_2"
    ):
        lacking.edits({VENDOR2: 0})
    with pytest.raises(InvalidInput, match="not a firmware register"):
        s.edits({TPIDR_EL0: 1})
    with pytest.raises(InvalidInput, match="not a u64"):
        s.edits({PSCI: 1 << 64})
    with pytest.raises(InvalidInput, match="the stream changed"):
        apply(fw_stream, [e.replace(old=e.old + 1) for e in s.edits({PSCI: 0x10001})])


def s_without_fw(data: bytes) -> bytes:
    s = parse_stream(data, "x")
    return replace_lists(
        data,
        [{r: v for r, v in c.registers.items() if not cat.is_firmware_reg(r)} for c in s.vcpus],
    )


def test_vcpus_that_disagree_are_refused(real_stream: bytes) -> None:
    other = {**KERNEL_618, PSCI: 0x10001}
    data = with_firmware(real_stream, [KERNEL_618, other])
    with pytest.raises(
        InvalidInput, match=r"d.bin: vCPUs disagree on PSCI_VERSION .*0x10003.*0x10001"
    ):
        parse_stream(data, "d.bin")
    fewer = {r: v for r, v in KERNEL_618.items() if r != VENDOR2}
    with pytest.raises(InvalidInput, match=r"disagree on VENDOR_HYP_BMAP_2.*absent"):
        parse_stream(with_firmware(real_stream, [KERNEL_618, fewer]), "d.bin")


def test_patch_image_firmware_in_place(fw_stream: bytes, tmp_path: Path) -> None:
    path = tmp_path / "fw.bin"
    path.write_bytes(fw_stream)
    image = read_image(str(path))
    after = patch_image(str(path), {PSCI: 0x10001, VENDOR: 0x1}, expect=image)
    assert [c.firmware[PSCI] for c in after.stream.vcpus] == [0x10001] * 2
    assert [c.firmware[VENDOR] for c in after.stream.vcpus] == [0x1] * 2
    assert path.stat().st_size == len(fw_stream)
    # the file changed since `image` was read: refused, nothing written
    now = path.read_bytes()
    with pytest.raises(InvalidInput, match="changed since it was read"):
        patch_image(str(path), {PSCI: 0x10000}, expect=image)
    assert path.read_bytes() == now
    # an id one vCPU lacks: refused before any write
    with pytest.raises(InvalidInput, match="has no"):
        patch_image(str(path), {PSCI: 0x10000, 0x6030000000160009: 0})
    assert path.read_bytes() == now


# --- refusals -------------------------------------------------------------------------------


def test_truncated_anywhere_is_refused(real_stream: bytes) -> None:
    s = parse_stream(real_stream, "real.bin")
    cuts = [8, 1000, s.vcpus[0].ids_offset, s.vcpus[1].values_offset + 3, s.vmdesc_offset]
    cuts += [s.vmdesc_offset + 3, len(real_stream) - 1, len(real_stream) - 5000]
    for cut in cuts:
        with pytest.raises(InvalidInput, match=r"^t.bin: "):
            parse_stream(real_stream[:cut], "t.bin")


def test_layout_faults_are_refused(real_stream: bytes) -> None:
    s = parse_stream(real_stream, "real.bin")
    a = s.vcpus[0]

    def refused(data: bytes | bytearray, match: str) -> None:
        with pytest.raises(InvalidInput, match=match):
            parse_stream(bytes(data), "f.bin")

    bad = bytearray(real_stream)
    struct.pack_into(">i", bad, a.ids_offset - 4, len(a.registers) - 1)
    refused(bad, "vCPU 0: the stream says .* cpregs, its vmdesc")
    bad = bytearray(real_stream)
    ids = list(a.registers)
    struct.pack_into(">QQ", bad, a.ids_offset + 8, ids[2], ids[1])
    refused(bad, "cpreg ids not sorted")
    bad = bytearray(real_stream)
    bad[s.vmdesc_offset] = 0x07
    refused(bad, "no vmdesc")
    bad = bytearray(real_stream)
    bad[s.vmdesc_offset - 1] = 0x01
    refused(bad, "no QEMU_VM_EOF")
    refused(b"QEVM\0\0\0\x02" + real_stream[8:], "version 2")
    refused(b"XEVM" + real_stream[4:], "no QEVM magic")
    # the vmdesc must describe the sections exactly: one byte more in a field, one device less
    doc = json.loads(real_stream[s.vmdesc_offset + 5 :])
    for change in ("size", "drop", "instance", "version", "name"):
        d = json.loads(json.dumps(doc))
        dev = d["devices"][3]
        if change == "size":
            dev["fields"][0]["size"] += 1
        elif change == "drop":
            del d["devices"][0]
            d["devices"].append(d["devices"][0])
        elif change == "instance":
            dev["instance_id"] += 7
        elif change == "version":
            dev["version"] += 1
        else:
            dev["name"] = dev["name"] + "x"
        text = json.dumps(d).encode()
        data = real_stream[: s.vmdesc_offset + 1] + struct.pack(">I", len(text)) + text
        refused(data, r"^f.bin: ")
    # a cpu section without a cpreg list: an unknown layout
    d = json.loads(json.dumps(doc))
    for dev in d["devices"]:
        if dev["name"] == "cpu":
            for f in dev["fields"]:
                f["name"] = f["name"].replace("cpreg", "xpreg")
    text = json.dumps(d).encode()
    refused(
        real_stream[: s.vmdesc_offset + 1] + struct.pack(">I", len(text)) + text,
        "no cpreg list",
    )


def test_not_a_regular_file_or_a_link(real_stream: bytes, tmp_path: Path) -> None:
    path = tmp_path / "s.bin"
    path.write_bytes(real_stream)
    link = tmp_path / "link.bin"
    link.symlink_to(path)
    with pytest.raises(InvalidInput, match=r"link\.bin: cannot open"):
        read_image(str(link))
    with pytest.raises(InvalidInput, match="not a regular file"):
        read_image(str(tmp_path))
    with pytest.raises(InvalidInput, match="cannot open"):
        read_image(str(tmp_path / "missing"))


def test_only_the_tail_is_read_and_a_sparse_file_stays_sparse(
    real_stream: bytes, tmp_path: Path
) -> None:
    """A 4 GiB hole before the device sections costs nothing: the parser reads the tail, and a
    patch writes 8-byte values only."""
    path = tmp_path / "sparse.bin"
    with path.open("wb") as f:
        f.write(real_stream[:8])
        f.seek(4 << 30)
        f.write(real_stream[-100_000:])
    blocks = path.stat().st_blocks
    assert blocks * 512 < 1 << 20
    image = read_image(str(path))
    assert len(image.stream.vcpus) == 2
    after = patch_image(str(path), {TPIDR_EL0: 7}, expect=image, any_register=True)
    assert [c.registers[TPIDR_EL0] for c in after.stream.vcpus] == [7, 7]
    assert path.stat().st_blocks == blocks
    assert path.stat().st_size == (4 << 30) + 100_000
