#!/usr/bin/env bash
# Create (or reuse) ./.venv with nemojax and its test extra installed. Idempotent; re-installs when
# pyproject.toml changes. Python: $PYTHON, else python3 (3.11 has the local CPU torch wheel).
# NEMOJAX_NO_TORCH=1 installs without the torch/transformers reference (torch-free tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.nemojax-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)-${NEMOJAX_NO_TORCH:-0}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "setting up $VENV with $($PY --version 2>&1) ..." >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >&2
if [ "${NEMOJAX_NO_TORCH:-0}" = 1 ]; then
  "$VENV/bin/python" -m pip install -q -e . pytest pytest-xdist >&2
else
  # torch first, pinned: takes the local CPU build instead of pulling a CUDA build through transformers
  "$VENV/bin/python" -m pip install -q torch==2.13.0 >&2
  "$VENV/bin/python" -m pip install -q -e ".[test]" >&2
fi
echo "$want" > "$stamp"
