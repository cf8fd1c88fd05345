"""Stage 4, fitting: fit and evaluate one (category, detector) cell, and the hyper-parameter search on validation (pure; no Ray)."""
