#!/bin/sh
# What this policy repository's CI runs on every change (after `pre-commit run --all-files`).
#   ci/check.sh [BASE_REV]
# With BASE_REV (the target branch), every snapshot changed since then is diffed against its old
# version: a kernel or QEMU upgrade that affects a policy fails the check until someone has read
# what changed (and, say, pinned PSCI or denied a new service in the policy).
set -eu
HVCPOLICY=${HVCPOLICY:-hvcpolicy}
cd "$(dirname "$0")/.."

echo "== validate: policies, snapshots, baseline"
$HVCPOLICY validate policies snapshots baseline.json

echo "== baseline.json is the least-common snapshot of snapshots/"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$HVCPOLICY baseline snapshots/*.json -o "$tmp/baseline.json"
if ! cmp -s baseline.json "$tmp/baseline.json"; then
    diff -u baseline.json "$tmp/baseline.json" || true
    echo "baseline.json is stale: run  hvcpolicy baseline snapshots/*.json -o baseline.json" >&2
    exit 1
fi

echo "== every policy starts on the baseline (so on every host of the fleet)"
for policy in policies/*.yaml policies/*.yml policies/*.json; do
    [ -e "$policy" ] || continue
    $HVCPOLICY explain --policy "$policy" --host baseline.json >"$tmp/explain.txt" || {
        cat "$tmp/explain.txt"
        echo "$policy: refused on the fleet baseline" >&2
        exit 1
    }
    $HVCPOLICY matrix --policy "$policy" snapshots/*.json
done

if [ $# -ge 1 ]; then
    echo "== snapshots changed since $1"
    for snap in $(git diff --name-only --relative "$1" -- snapshots/); do
        [ -e "$snap" ] || continue
        if git cat-file -e "$1:./$snap" 2>/dev/null; then
            git show "$1:./$snap" >"$tmp/old.json"
            $HVCPOLICY diff "$tmp/old.json" "$snap" --policy-dir policies
        fi
    done
fi
echo "ok"
