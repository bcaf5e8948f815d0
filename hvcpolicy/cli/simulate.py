"""``hvcpolicy simulate``: serve SPEC.md section 8's QMP interface for a simulated host."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from typing import Any

from hvcpolicy.catalogue import (
    SMCCC_ARCH_WORKAROUND_1,
    SMCCC_ARCH_WORKAROUND_2,
    SMCCC_ARCH_WORKAROUND_3,
)
from hvcpolicy.errors import InvalidInput, UsageError

MAX_VCPUS = 512


def register(sub: Any, parent: argparse.ArgumentParser) -> None:
    from hvcpolicy.simulator.faults import KINDS
    from hvcpolicy.simulator.profiles import PROFILE_NAMES
    from hvcpolicy.simulator.server import RUNSTATES

    faults = "\n".join(f"  {k.name}: {k.help}" for k in KINDS.values())
    p = sub.add_parser(
        "simulate",
        parents=[parent],
        help="serve the firmware-register QMP interface for a simulated arm64 KVM host",
        description=(
            "Serve QEMU's QMP, with the kvm-firmware-registers vCPU property, on a unix socket\n"
            "for a simulated arm64 KVM host. The socket appears once it accepts connections;\n"
            "the server exits after quit, SIGTERM or SIGINT.\n\n"
            f"faults (--fault NAME[@COMMAND[#N]][=VALUE], repeatable):\n{faults}"
        ),
        epilog="example: hvcpolicy simulate --socket /tmp/web1.qmp --kernel 6.18 --vcpus 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="unix socket to serve")
    p.add_argument(
        "--kernel",
        required=True,
        metavar="VERSION",
        help=f"host kernel release, e.g. {', '.join(PROFILE_NAMES)} or 6.1.0-18-arm64",
    )
    p.add_argument("--vcpus", type=int, default=None, metavar="N", help="vCPUs (default 1)")
    p.add_argument(
        "--runstate",
        choices=RUNSTATES,
        default=None,
        help="prelaunch (default); running/paused: the VM has run; restored: reports paused, "
        "has not run; inmigrate: has not run, cont completes the migration",
    )
    p.add_argument(
        "--has-run",
        choices=("yes", "no"),
        default=None,
        help="whether the VM starts out as having run (default: from the runstate; with "
        "--upstream, yes unless QEMU is in prelaunch or inmigrate)",
    )
    p.add_argument(
        "--fault", action="append", default=[], metavar="F", help="inject a fault (repeatable)"
    )
    p.add_argument("--upstream", metavar="SOCK", help="layer over this real QEMU's QMP socket")
    p.add_argument(
        "--no-psci-0-2",
        action="store_true",
        help="vCPUs without the PSCI 0.2 feature (PSCI_VERSION reads and accepts only 0.1)",
    )
    p.add_argument(
        "--protected",
        action="store_true",
        help="a protected (pKVM) VM: PSCI versions below 1.1 are refused",
    )
    p.add_argument(
        "--wa-levels",
        metavar="WA1,WA2,WA3",
        default=None,
        help="host mitigation levels (default 2,0,1, as on the fixture hosts)",
    )
    p.set_defaults(func=run)


def _wa_levels(text: str | None) -> dict[int, int] | None:
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 3 or not all(x.strip().isdigit() for x in parts):
        raise InvalidInput(f"--wa-levels {text!r}: expected three levels such as 2,0,1")
    ids = (SMCCC_ARCH_WORKAROUND_1, SMCCC_ARCH_WORKAROUND_2, SMCCC_ARCH_WORKAROUND_3)
    return {rid: int(x) for rid, x in zip(ids, parts, strict=True)}


def run(args: argparse.Namespace) -> int:
    import asyncio  # here, not at the top: building the CLI parser must not load asyncio

    from hvcpolicy.simulator.faults import Faults
    from hvcpolicy.simulator.profiles import profile_for
    from hvcpolicy.simulator.server import QMPServer, SimBackend, UpstreamBackend
    from hvcpolicy.simulator.vm import SimVM

    profile = profile_for(args.kernel, _wa_levels(args.wa_levels))
    faults = Faults.parse(args.fault)
    psci_0_2 = not args.no_psci_0_2
    protected = bool(args.protected)
    has_run = None if args.has_run is None else args.has_run == "yes"
    if args.vcpus is not None and not 1 <= args.vcpus <= MAX_VCPUS:
        raise UsageError(f"--vcpus {args.vcpus}: expected 1..{MAX_VCPUS}")
    if args.upstream and (args.vcpus is not None or args.runstate is not None):
        raise UsageError("--vcpus and --runstate come from the real QEMU with --upstream")

    async def main() -> int:
        backend: SimBackend | UpstreamBackend
        if args.upstream:

            def make_vm(vcpus: int) -> SimVM:
                return SimVM(profile, vcpus, psci_0_2=psci_0_2, protected=protected)

            backend = UpstreamBackend(args.upstream, make_vm, faults, has_run)
        else:
            vm = SimVM(profile, args.vcpus or 1, psci_0_2=psci_0_2, protected=protected)
            backend = SimBackend(vm, args.runstate or "prelaunch", faults, has_run)
        server = QMPServer(backend, faults)
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()

        def on_signal() -> None:
            stopping.set()
            server.request_stop(0)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            if isinstance(backend, UpstreamBackend):
                # A signal during the (bounded) connect ends the process at once, with 0.
                connect = loop.create_task(backend.connect())
                stop = loop.create_task(stopping.wait())
                await asyncio.wait({connect, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not connect.done():
                    connect.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await connect
                    return 0
                connect.result()
            code = await server.serve(args.socket)
        finally:
            await backend.close()
        if code and server.note:
            sys.stderr.write(f"hvcpolicy: simulate: {server.note}\n")
        return code

    return asyncio.run(main())
