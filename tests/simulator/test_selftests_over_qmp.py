"""The reference's kernel-selftest assertions, reproduced over QMP for every kernel profile.

Driven with qemu.qmp's async QMPClient against an in-process simulator: the vCPU paths come from
query-cpus-fast, registers through the kvm-firmware-registers property, "the VM ran" through cont.
"""

from __future__ import annotations

from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from hvcpolicy.simulator.harness import simulator, simulator_process
from hvcpolicy.simulator.profiles import BITMAPS, PROFILE_NAMES, profile_for
from tests.simulator.conftest import arun

PROP = "kvm-firmware-registers"


class Guest:
    def __init__(self, client: QMPClient, paths: list[str]) -> None:
        self.client = client
        self.paths = paths

    @classmethod
    async def connect(cls, sock: str) -> Guest:
        client = QMPClient("selftest")
        await client.connect(sock)
        cpus: Any = await client.execute("query-cpus-fast")
        return cls(client, [c["qom-path"] for c in cpus])

    async def read(self, vcpu: int = 0) -> dict[int, int]:
        regs: Any = await self.client.execute(
            "qom-get", {"path": self.paths[vcpu], "property": PROP}
        )
        return {int(k, 16): v for k, v in regs.items()}

    async def write(self, values: dict[int, int], vcpu: int = 0) -> str | None:
        """None on success, else the error desc."""
        value = {f"0x{rid:016x}": v for rid, v in values.items()}
        try:
            await self.client.execute(
                "qom-set", {"path": self.paths[vcpu], "property": PROP, "value": value}
            )
        except ExecuteError as err:
            assert err.error_class == "GenericError"
            return str(err)
        return None

    async def run(self) -> None:
        await self.client.execute("cont")
        await self.client.execute("stop")
        status: Any = await self.client.execute("query-status")
        assert status["status"] == "paused"

    async def close(self) -> None:
        await self.client.disconnect()


def refused(desc: str | None, rid: int, value: int, errno: str) -> bool:
    return desc == f"{PROP}: KVM_SET_ONE_REG 0x{rid:016x}=0x{value:x} failed: {errno}"


async def selftests(sock: str, kernel: str) -> None:
    """The reference's selftest assertions against the simulator serving ``sock``."""
    profile = profile_for(kernel)
    bitmaps = [r for r in profile.registers if r in BITMAPS]
    g = await Guest.connect(sock)
    fresh = await g.read()
    # Every listed register, and only those, reads.
    assert sorted(fresh) == list(profile.registers)
    assert fresh == profile.fresh_values()
    # Every listed register accepts a write of its own current value before the run.
    for rid, value in fresh.items():
        assert await g.write({rid: value}) is None, hex(rid)
    written: dict[int, int] = {}
    for rid in bitmaps:
        reset, mask = BITMAPS[rid]
        # The first GET of each bitmap equals its reset value.
        assert (await g.read())[rid] == reset
        # Writing 0 (or the full mask where the reset is 0) succeeds and reads back,
        # through every vCPU: the bitmaps are per VM.
        target = mask if reset == 0 else 0
        assert await g.write({rid: target}) is None
        assert (await g.read(0))[rid] == target
        assert (await g.read(1))[rid] == target
        written[rid] = target
        # The bit just above the mask: EINVAL.
        above = 1 << mask.bit_length()
        assert refused(await g.write({rid: above}), rid, above, "EINVAL")
    await g.run()
    assert (await g.client.execute("query-status"))["status"] == "paused"  # type: ignore[index]
    after = await g.read(1)
    for rid in bitmaps:
        reset, mask = BITMAPS[rid]
        # After a vCPU ran: GET returns the last written value ...
        assert after[rid] == written[rid]
        # ... writing a different value fails EBUSY, the same value succeeds,
        other = mask if written[rid] != mask else 0
        assert refused(await g.write({rid: other}), rid, other, "EBUSY")
        assert await g.write({rid: written[rid]}) is None
        # ... and bits outside the mask are still EINVAL.
        above = 1 << mask.bit_length()
        assert refused(await g.write({rid: above}), rid, above, "EINVAL")
    # A fresh PSCI-0.2 vCPU on a current kernel reads PSCI_VERSION >= 1.3.
    if profile.version >= (6, 13):
        assert fresh[0x6030000000140000] >= 0x10003
    else:
        assert fresh[0x6030000000140000] < 0x10003
    await g.close()


@pytest.mark.parametrize("kernel", PROFILE_NAMES)
def test_selftest_vectors(kernel: str, sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, kernel, vcpus=2) as server:
            await selftests(sock, kernel)
            assert server.vm.has_run

    arun(body())


@pytest.mark.parametrize("kernel", ["5.10", "6.18.30-61.116.amzn2023.aarch64"])
def test_selftest_vectors_against_the_cli_process(kernel: str, sock: str) -> None:
    with simulator_process(sock, kernel, "--vcpus", "2"):
        arun(selftests(sock, kernel))


def test_write_stops_at_first_refusal(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.18") as server:
            g = await Guest.connect(sock)
            desc = await g.write(
                {0x6030000000160002: 0x1, 0x6030000000160003: 0x4, 0x6030000000160000: 0x0}
            )
            assert desc == f"{PROP}: KVM_SET_ONE_REG 0x6030000000160003=0x4 failed: EINVAL"
            regs = await g.read()
            assert regs[0x6030000000160002] == 0x1  # written before the refusal
            assert regs[0x6030000000160000] == 0x1  # after it: untouched
            assert server.vm.get(0x6030000000160002) == 0x1
            await g.close()

    arun(body())


def test_unlisted_register_is_enoent_over_qmp(sock: str) -> None:
    async def body() -> None:
        async with simulator(sock, "6.1"):
            g = await Guest.connect(sock)
            desc = await g.write({0x6030000000160003: 0})
            assert refused(desc, 0x6030000000160003, 0, "ENOENT")
            desc = await g.write({0x6030000000140004: 0})
            assert refused(desc, 0x6030000000140004, 0, "ENOENT")
            await g.close()

    arun(body())
