"""The run's result files: config, results (Parquet, CSV, Markdown), scores, errors, skipped inputs."""
from __future__ import annotations

import io

import pandas as pd

from mvtec_ray.config import RunConfig
from mvtec_ray.storage import Storage, join


def write_outputs(out_uri: str, storage: Storage, config: RunConfig, results: pd.DataFrame, scores: pd.DataFrame,
                  errors: pd.DataFrame | None = None, skipped: pd.DataFrame | None = None) -> None:
    from mvtec_ray.report.tables import results_markdown
    storage.write_bytes(join(out_uri, "config.yaml"), config.dump_yaml().encode())
    storage.write_bytes(join(out_uri, "results.parquet"), parquet_bytes(results))
    storage.write_bytes(join(out_uri, "results.csv"), results.to_csv(index=False).encode())
    storage.write_bytes(join(out_uri, "results.md"), results_markdown(results).encode())
    storage.write_bytes(join(out_uri, "scores.parquet"), parquet_bytes(scores))
    if errors is not None:
        storage.write_bytes(join(out_uri, "errors.parquet"), parquet_bytes(errors))
        storage.write_bytes(join(out_uri, "errors.csv"), errors.to_csv(index=False).encode())
    if skipped is not None:
        storage.write_bytes(join(out_uri, "skipped.csv"), skipped.to_csv(index=False).encode())


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.reset_index(drop=True).to_parquet(buffer, index=False)
    return buffer.getvalue()
