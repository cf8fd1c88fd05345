#!/usr/bin/env bash
# Install, generate the built-in sample dataset and run the whole pipeline on an embedded local Ray
# with the offline ImageNet-pretrained EfficientNet-Lite0; prints the results table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
DATA=${DATA:-runs/sample-data-hard}
OUT=${OUT:-runs/demo}
# the hard set: small faint defects and varied normals, so the table separates the detectors
[ -d "$DATA" ] || .venv/bin/mvtec-ray sample-data "$DATA" --difficulty hard
exec .venv/bin/mvtec-ray run --data "$DATA" --out "$OUT" --backbone efficientnet_lite0 "$@"
