"""Stage 2, features: backbones and their weights, the extraction plan, the per-row preparation and the Parquet feature store."""
