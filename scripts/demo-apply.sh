#!/usr/bin/env bash
# Enforcement over QMP, the main job: `hvcpolicy simulate` serves the firmware-register interface
# (SPEC.md section 8) of a simulated arm64 KVM host, alone or layered over a real QEMU; `hvcpolicy
# apply` plans from the guest's live registers, writes, reads back on every vCPU and resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
export HVCPOLICY_POLICY_DIR="${HVCPOLICY_POLICY_DIR:-$PWD/examples/policies}"
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$*"; "$@" || echo "(exit $?)"; }

dir=$(mktemp -d /tmp/hvcpolicy-demo.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT
background() {  # background SOCKET COMMAND...: start it, wait (bounded) for its socket
    local sock=$1; shift
    say "$* &"
    "$@" & pids+=($!)
    for _ in $(seq 200); do [ -S "$sock" ] && return 0; sleep 0.05; done
    echo "$sock did not appear" >&2; return 1
}

# A paused guest on a simulated 6.18 host with 2 vCPUs: plan, apply and resume, then verify.
background "$dir/web1.qmp" hvcpolicy simulate --socket "$dir/web1.qmp" --kernel 6.18 --vcpus 2
run hvcpolicy apply --qmp "$dir/web1.qmp" --policy fleet-2026 --dry-run
run hvcpolicy apply --qmp "$dir/web1.qmp" --policy fleet-2026 --resume
run hvcpolicy apply --qmp "$dir/web1.qmp" --policy fleet-2026   # running now: verify only

# A 4.14 host lacks VENDOR_HYP_BMAP, so kvm-features (require) cannot be met: exit 3, nothing
# written, the guest stays paused.
background "$dir/old.qmp" hvcpolicy simulate --socket "$dir/old.qmp" --kernel 4.14
run hvcpolicy apply --qmp "$dir/old.qmp" --policy fleet-2026 --resume

# Started without the policy (a plain `virsh start`): too late to write; exit 3 names the fix.
background "$dir/late.qmp" hvcpolicy simulate --socket "$dir/late.qmp" --kernel 6.18 \
    --runstate running
run hvcpolicy apply --qmp "$dir/late.qmp" --policy fleet-2026

# A real QEMU (TCG, paused with -S) has no firmware-register interface: exit 5 ...
background "$dir/qemu.qmp" qemu-system-aarch64 -machine virt -cpu max -accel tcg -S \
    -display none -nodefaults -m 64 -smp 2 -qmp "unix:$dir/qemu.qmp,server=on,wait=off"
run hvcpolicy apply --qmp "$dir/qemu.qmp" --policy fleet-2026
# ... so layer the simulated interface over it: runstate, vCPUs and cont are the real QEMU's.
background "$dir/layer.qmp" hvcpolicy simulate --socket "$dir/layer.qmp" --kernel 6.18 \
    --upstream "$dir/qemu.qmp"
run hvcpolicy apply --qmp "$dir/layer.qmp" --policy fleet-2026 --resume
run hvcpolicy apply --qmp "$dir/layer.qmp" --policy fleet-2026   # the real QEMU runs: verify only
