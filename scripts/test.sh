#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up, lint, type-check, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check hvcpolicy tests bench lab scripts
python3 -m ruff format --check hvcpolicy tests bench lab scripts
python3 -m mypy
python3 -m pytest "$@"
