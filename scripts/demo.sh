#!/usr/bin/env bash
# The main job on an embedded default: set up, then show what a policy means on the bundled
# real-host snapshots, a refused and an accepted migration, and enforcement on a (simulated)
# QEMU over QMP.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HVCPOLICY_POLICY_DIR="$PWD/examples/policies"
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$*"; "$@" || echo "(exit $?)"; }

run hvcpolicy validate examples/policies examples/domains examples/hosts
run hvcpolicy explain --policy fleet-2026 --host examples/hosts/neoverse-n1_linux-6.18.json
run hvcpolicy explain --policy fleet-2026 --host examples/hosts/neoverse-n1_linux-5.10.json
run hvcpolicy baseline examples/hosts/*.json
run hvcpolicy check-migration --domain-xml examples/domains/web1-applied-6.18.xml \
    --to examples/hosts/neoverse-n1_linux-6.1.json
run hvcpolicy check-migration --domain-xml examples/domains/web1-applied-6.1.xml \
    --to examples/hosts/neoverse-n1_linux-6.18.json
run hvcpolicy matrix --policy fleet-2026 examples/hosts/*.json examples/fleet/*.json

if [ -f scripts/demo-apply.sh ]; then
    bash scripts/demo-apply.sh
fi
