#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment in .venv with pinned torch / triton,
# then r1kernels installed in editable mode (builds r1kernels._C; CUDA sources too when nvcc is found).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# torch pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU build CI uses.
TORCH_SPEC=${R1K_TORCH_SPEC:-torch==2.13.0}
# shellcheck disable=SC2086  # R1K_TORCH_SPEC may carry pip options (an --extra-index-url for a CUDA build)
pip install -q --disable-pip-version-check $TORCH_SPEC triton==3.9.0 numpy pytest ruff \
  "pybind11>=2.12" "cmake>=3.26" ninja "setuptools>=68" wheel
# The extras, pinned: [hf] (the transformers / TRL drop-ins, and the outside references the MoE, MLA, model and
# integration tests compare against) and [bench] (the report's plots, Liger-Kernel as the GRPO loss's peer).
pip install -q --disable-pip-version-check transformers==5.24.0 trl==1.16.0 matplotlib
pip install -q --disable-pip-version-check --no-deps liger-kernel==0.8.5  # --no-deps: never swap the pinned torch
if ! python -c "import r1kernels._C" 2>/dev/null || [ "${R1K_REBUILD:-0}" = 1 ]; then
  pip install -q --disable-pip-version-check --no-build-isolation -e .
fi
