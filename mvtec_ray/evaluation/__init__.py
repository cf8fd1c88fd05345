"""Stage 4, evaluation: thresholds chosen without test labels, image and pixel metrics, the pixel protocol and the summary table."""
