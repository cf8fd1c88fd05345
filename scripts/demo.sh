#!/usr/bin/env bash
# Install, generate the built-in sample dataset and run the whole pipeline on an embedded local Ray
# with the offline ImageNet-pretrained EfficientNet-Lite0; prints the results table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
DATA=${DATA:-runs/sample-data}
OUT=${OUT:-runs/demo}
[ -d "$DATA" ] || .venv/bin/mvtec-ray sample-data "$DATA"
exec .venv/bin/mvtec-ray run --data "$DATA" --out "$OUT" --backbone efficientnet_lite0 "$@"
