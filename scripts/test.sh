#!/usr/bin/env bash
# Install (project, test extras, and Debian's chromium for the report test), lint, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the report test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) >&2 \
    || echo "chromium could not be installed" >&2
fi
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
.venv/bin/ruff check --quiet . || { echo "ruff found problems (see above)" >&2; exit 1; }
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
