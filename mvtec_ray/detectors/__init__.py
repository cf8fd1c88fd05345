"""Stage 3, detectors: every detector behind one interface (fit on normal features; score, higher = more anomalous; save/load), found by name in :mod:`mvtec_ray.detectors.registry`."""
