#!/usr/bin/env bash
# Create .venv and install the project with its test extras; a no-op when already up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.mvtec-ray-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (first time: a few minutes; torch comes from the local wheel cache)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -vE "is ignored|^\s*$|!!|WheelFile|wheel_obj|strategy|BuildBackendWarning|^\s+(\*|Please|name as|corresp)" >&2 || true
.venv/bin/python -c "import mvtec_ray, torch, ray, faiss" || { echo "install failed" >&2; exit 1; }
echo "$want" > "$stamp"
