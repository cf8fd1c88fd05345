"""Raw feature-shard reading for tests: every row as written, without FeatureSet's de-duplication."""
from __future__ import annotations


def raw_shard_rows(features_dir, columns=("row_id", "status")):
    """Every row of every feature shard under ``features_dir``, read with plain pyarrow: without the
    de-duplication of FeatureSet's readers, so a duplicated row is seen (and counted) here."""
    from pathlib import Path

    import pandas as pd
    import pyarrow.parquet as pq
    paths = sorted(Path(features_dir).rglob("part-*.parquet"))
    if not paths:
        return pd.DataFrame(columns=list(columns))
    return pd.concat([pq.read_table(p, columns=list(columns)).to_pandas() for p in paths], ignore_index=True)
