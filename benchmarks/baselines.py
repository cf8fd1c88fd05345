"""Bare single-process baselines: the library's own functions in a plain loop, no Ray."""
from __future__ import annotations

import json
import time


def bare_extract(catalog, config, weights, out_dir: str, storage, threads: int, on_batch=None) -> int:
    """What ``run_extraction`` does (plan, decode + variants, embed, write shards), in this process.

    ``on_batch(seconds since start, rows)`` is called after each written batch, like the Ray
    side's progress list. Returns the number of rows written.
    """
    from mvtec_ray.distributed.extraction import Extractor
    from mvtec_ray.features.backbones import probe_feature_shapes
    from mvtec_ray.features.plan import plan_work
    from mvtec_ray.features.prepare import prepare_batch
    from mvtec_ray.features.store import (
        EXTRACT_META,
        SUCCESS,
        extraction_metadata,
        write_shards,
    )
    from mvtec_ray.storage import join
    started = time.perf_counter()
    plan = plan_work(catalog.entries, config)
    metadata = extraction_metadata(config, weights, probe_feature_shapes(config, weights))
    storage.write_bytes(join(out_dir, EXTRACT_META), json.dumps(metadata).encode())
    extractor = Extractor(config.backbone, weights.state_dict, config.patch_dim, config.patch_maps != "none",
                          "cpu", threads)
    rows = 0
    for start in range(0, len(plan), 4):
        block = plan.iloc[start:start + 4]
        prepared = prepare_batch({c: block[c].to_numpy() for c in block.columns}, config, storage)
        for i in range(0, len(prepared["row_id"]), config.batch_size):
            part = {k: v[i:i + config.batch_size] for k, v in prepared.items()}
            write_shards(extractor(part), out_dir, storage, metadata)
            rows += len(part["row_id"])
            if on_batch is not None:
                on_batch(time.perf_counter() - started, len(part["row_id"]))
    storage.write_bytes(join(out_dir, SUCCESS), json.dumps({"rows": rows}).encode())
    return rows


def steady_rate(timeline: list[tuple[float, int]]) -> tuple[float, float]:
    """(seconds until the first batch was written, rows/s after it) of a ``(seconds, rows)`` list."""
    if len(timeline) < 2:
        return (timeline[0][0] if timeline else float("nan")), float("nan")
    first_s, first_rows = timeline[0]
    rows = sum(n for _, n in timeline) - first_rows
    return first_s, rows / max(1e-9, timeline[-1][0] - first_s)
