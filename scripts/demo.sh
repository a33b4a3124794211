#!/usr/bin/env bash
# Set up if needed, then run the main demo (CPU defaults). Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
python -m r1kernels.demo "$@"
