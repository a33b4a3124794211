#!/usr/bin/env bash
# Set up if needed, then run the main job: the tiny DeepSeek-V3 trained with GRPO (CPU defaults, ~3 min).
# Extra arguments go to `python -m r1kernels.train`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
python -m r1kernels.train "$@"
