"""arm64 KVM from Python: /dev/kvm ioctls through ctypes (stdlib only).

Enough of the KVM API to snapshot a host's firmware pseudo-registers without QEMU (``host probe``)
and to drive a real kernel through every write rule hvcpolicy models (the lab's conformance run):
a scratch VM, vCPUs with or without PSCI 0.2, KVM_GET_REG_LIST, KVM_GET/SET_ONE_REG, and a real
KVM_RUN of a three-instruction guest that stops on an MMIO store.

Every file descriptor and mapping is closed by the context managers, also on errors.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Self

from hvcpolicy import catalogue as cat
from hvcpolicy.errors import KVMUnavailable

DEV_KVM = "/dev/kvm"

# ioctl numbers (arm64): _IO/_IOR/_IOW/_IOWR(KVMIO=0xAE, nr, size).
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_GET_ONE_REG = 0x4010AEAB
KVM_SET_ONE_REG = 0x4010AEAC
KVM_ARM_VCPU_INIT = 0x4020AEAE
KVM_ARM_PREFERRED_TARGET = 0x8020AEAF
KVM_GET_REG_LIST = 0xC008AEB0

KVM_ARM_VCPU_PSCI_0_2 = 2
KVM_ARM_VCPU_PMU_V3 = 3
KVM_EXIT_MMIO = 6

# The guest run by run_once(): x1 = 0x10000000 (no memslot there); str x0, [x1]; b .
GUEST_CODE = struct.pack("<3I", 0xD2A20001, 0xF9000020, 0x14000000)
GUEST_MEM_SIZE = 0x10000
GUEST_MMIO_ADDR = 0x10000000


class KVMError(OSError):
    """An ioctl failed; ``errno`` is the kernel's answer and ``name`` its symbolic name."""

    def __init__(self, err: int, what: str) -> None:
        super().__init__(err, f"{what}: {errno.errorcode.get(err, str(err))}")
        self.name = errno.errorcode.get(err, str(err))


class _InitStruct(ctypes.Structure):
    _fields_ = (("target", ctypes.c_uint32), ("features", ctypes.c_uint32 * 7))


class _OneReg(ctypes.Structure):
    _fields_ = (("id", ctypes.c_uint64), ("addr", ctypes.c_uint64))


class _MemRegion(ctypes.Structure):
    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    )


_libc: ctypes.CDLL | None = None


def _ioctl(fd: int, request: int, arg: int | ctypes.c_void_p | None, what: str) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
        _libc.ioctl.restype = ctypes.c_int
    ret: int = _libc.ioctl(fd, request, arg)
    if ret < 0:
        raise KVMError(ctypes.get_errno(), what)
    return ret


def _addr(obj: ctypes.Structure | ctypes.Array[ctypes.c_uint64] | ctypes.c_uint64) -> int:
    return ctypes.addressof(obj)


def check_host() -> None:
    """Raise KVMUnavailable, with the reason, unless this is an arm64 host with /dev/kvm."""
    machine = platform.machine()
    if machine not in ("aarch64", "arm64"):
        raise KVMUnavailable(
            f"no arm64 KVM on this host: it is {machine or 'an unknown machine'}, and the firmware"
            " registers exist only on arm64 KVM hosts (run host probe on each arm64 host)"
        )
    if not os.path.exists(DEV_KVM):
        raise KVMUnavailable(f"no arm64 KVM on this host: {DEV_KVM} does not exist (kvm disabled?)")


class Vcpu:
    def __init__(self, vm: VM, fd: int, index: int) -> None:
        self.vm = vm
        self.fd = fd
        self.index = index
        self.initialized = False
        self.psci_0_2 = False

    def init(self, psci_0_2: bool = True, features: int = 0) -> None:
        """KVM_ARM_VCPU_INIT with the preferred target; ``features``: more bits of word 0."""
        init = _InitStruct()
        _ioctl(self.vm.fd, KVM_ARM_PREFERRED_TARGET, _addr(init), "KVM_ARM_PREFERRED_TARGET")
        for i in range(7):
            init.features[i] = 0
        init.features[0] = features
        if psci_0_2:
            init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2
        _ioctl(self.fd, KVM_ARM_VCPU_INIT, _addr(init), "KVM_ARM_VCPU_INIT")
        self.initialized = True
        self.psci_0_2 = psci_0_2

    def reg_list(self) -> list[int]:
        n = ctypes.c_uint64(0)
        try:
            _ioctl(self.fd, KVM_GET_REG_LIST, _addr(n), "KVM_GET_REG_LIST")
        except KVMError as err:
            if err.errno != errno.E2BIG:
                raise
        count = n.value
        buf = (ctypes.c_uint64 * (count + 1))()
        buf[0] = count
        _ioctl(self.fd, KVM_GET_REG_LIST, _addr(buf), "KVM_GET_REG_LIST")
        return [buf[i + 1] for i in range(buf[0])]

    def get(self, rid: int) -> int:
        value = ctypes.c_uint64(0)
        one = _OneReg(rid, _addr(value))
        _ioctl(self.fd, KVM_GET_ONE_REG, _addr(one), f"KVM_GET_ONE_REG {cat.fmt_id(rid)}")
        return value.value

    def set(self, rid: int, value: int) -> None:
        val = ctypes.c_uint64(value)
        one = _OneReg(rid, _addr(val))
        what = f"KVM_SET_ONE_REG {cat.fmt_id(rid)}={cat.fmt_value(value)}"
        _ioctl(self.fd, KVM_SET_ONE_REG, _addr(one), what)

    def run_once(self) -> int:
        """One real KVM_RUN of GUEST_CODE; returns the exit reason (KVM_EXIT_MMIO expected)."""
        self.vm.load_guest()
        size = _ioctl(self.vm.kvm_fd, KVM_GET_VCPU_MMAP_SIZE, None, "KVM_GET_VCPU_MMAP_SIZE")
        with mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as run:
            _ioctl(self.fd, KVM_RUN, None, "KVM_RUN")
            reason: int = struct.unpack_from("<I", run, 8)[0]
        self.vm.has_run = True
        return reason


class _Closing:
    """A context manager that calls ``close()`` on the way out."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class VM(_Closing):
    """A scratch VM. Use as a context manager: closes every vCPU fd, the VM fd and guest memory."""

    def __init__(self, kvm_fd: int) -> None:
        self.kvm_fd = kvm_fd
        self.fd = _ioctl(kvm_fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        self.vcpus: list[Vcpu] = []
        self.has_run = False
        self._mem: mmap.mmap | None = None
        self._mem_buf: ctypes.Array[ctypes.c_char] | None = None

    def vcpu(self, init: bool = True, psci_0_2: bool = True, features: int = 0) -> Vcpu:
        index = len(self.vcpus)
        fd = _ioctl(self.fd, KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        vcpu = Vcpu(self, fd, index)
        self.vcpus.append(vcpu)
        if init:
            vcpu.init(psci_0_2, features)
        return vcpu

    def load_guest(self) -> None:
        if self._mem is not None:
            return
        mem = mmap.mmap(-1, GUEST_MEM_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mem[: len(GUEST_CODE)] = GUEST_CODE
        buf = (ctypes.c_char * GUEST_MEM_SIZE).from_buffer(mem)
        self._mem, self._mem_buf = mem, buf
        region = _MemRegion(0, 0, 0, GUEST_MEM_SIZE, ctypes.addressof(buf))
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, _addr(region), "KVM_SET_USER_MEMORY_REGION")

    def close(self) -> None:
        for vcpu in self.vcpus:
            if vcpu.fd >= 0:
                os.close(vcpu.fd)
                vcpu.fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        # The memslot goes with the VM fd; only then may the memory go.
        self._mem_buf = None
        if self._mem is not None:
            self._mem.close()
            self._mem = None


class KVM(_Closing):
    """/dev/kvm. ``with KVM() as kvm, kvm.vm() as vm: vm.vcpu().get(...)``."""

    def __init__(self, path: str = DEV_KVM) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise KVMUnavailable(f"no arm64 KVM on this host: cannot open {path}: {err}") from err

    def api_version(self) -> int:
        return _ioctl(self.fd, KVM_GET_API_VERSION, None, "KVM_GET_API_VERSION")

    def vm(self) -> VM:
        return VM(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@contextmanager
def scratch_vcpu(psci_0_2: bool = True) -> Iterator[Vcpu]:
    """A fresh VM with one initialized vCPU, closed (every fd) on exit."""
    check_host()
    with KVM() as kvm, kvm.vm() as vm:
        yield vm.vcpu(psci_0_2=psci_0_2)


def firmware_registers(vcpu: Vcpu) -> dict[int, int]:
    """Every coproc 0x14/0x16 register the vCPU lists, with its value."""
    return {rid: vcpu.get(rid) for rid in sorted(vcpu.reg_list()) if cat.is_firmware_reg(rid)}


def probe() -> dict[int, int]:
    """The host's firmware registers as a fresh PSCI-0.2 vCPU of a scratch VM reads them."""
    check_host()
    try:
        with scratch_vcpu(psci_0_2=True) as vcpu:
            return firmware_registers(vcpu)
    except KVMError as err:
        raise KVMUnavailable(f"no usable arm64 KVM on this host: {err.strerror}") from err
