"""Ray glue for fitting: each (category, detector) cell as a Ray task."""
from __future__ import annotations

from mvtec_ray.fit.cell import FitOutcome, fit_category_detector


def fit_task(*args, **kwargs) -> FitOutcome:
    """:func:`fit_category_detector` as a Ray task; the row records the node it ran on.

    Its own module: a Ray worker imports the task's module, and one that pulled in extraction
    (torchvision, Ray Data) cost about 2 CPU-seconds more per worker.
    """
    import ray
    outcome = fit_category_detector(*args, configure=use_ray_shards, **kwargs)
    outcome.row["node"] = ray.get_runtime_context().get_node_id()
    return outcome


def fit_cells_task(features, category: str, cells: list[tuple[str, dict]], evaluation, out_uri, storage,
                   threads: int, pooled, metadata) -> list[FitOutcome]:
    """Cells of one category, one after the other, as one Ray task (several for the cheap ones: a fit of
    a few milliseconds costs less than a task's own scheduling and result round trip). ``pooled``: the
    category's pooled features (None for patch detectors)."""
    return [fit_task(features, category, name, params, evaluation, out_uri, storage, threads, pooled, metadata)
            for name, params in cells]


def use_ray_shards(detector) -> None:
    """PatchCore with ``coreset_ray_tasks``: its coreset's shard greedies become Ray tasks."""
    params = getattr(detector, "params", {})
    if not params.get("coreset_ray_tasks"):
        return
    from mvtec_ray.distributed.coreset import RayShardRunner
    detector.shard_runner = RayShardRunner(num_gpus=float(params["coreset_task_gpus"]), use_gpu=params["use_gpu"])
