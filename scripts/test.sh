#!/usr/bin/env bash
# Set up if needed, lint, then run the whole test suite (Triton kernels in the interpreter on a CPU
# machine, compiled on a GPU machine). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest python_tests -q "$@"
