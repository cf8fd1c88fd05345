"""The one Ray Data stream builder behind extraction and scoring: fused or staged.

Fused (CPU nodes): one long-lived actor per core decodes, runs the model and writes, so pixels and
maps never cross the object store. Staged (GPU nodes): CPU decoders -> model actors (GPU) -> writers.
A caller describes its stages; this module turns them into ``map_batches`` calls.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Stage:
    """One ``map_batches`` step. A class runs in an actor pool (``actors``: a size, or
    ``(min, max)`` for an autoscaling pool); a function runs as tasks (``actors`` None)."""

    fn: Callable | type
    batch_size: int | None
    num_cpus: float
    kwargs: dict = field(default_factory=dict)  # constructor kwargs of a class, call kwargs of a function
    actors: int | tuple[int, int] | None = None
    num_gpus: float = 0.0
    resources: dict | None = None


def apply_stages(ds: Any, stages: list[Stage]) -> Any:
    """``ds`` with every stage applied in order (numpy batches)."""
    import ray
    for stage in stages:
        options: dict[str, Any] = {"batch_size": stage.batch_size, "batch_format": "numpy",
                                   "num_cpus": stage.num_cpus}
        if stage.num_gpus:
            options["num_gpus"] = stage.num_gpus
        if stage.resources:
            options["resources"] = stage.resources
        if isinstance(stage.fn, type):
            size = stage.actors if stage.actors is not None else 1
            options["compute"] = (ray.data.ActorPoolStrategy(min_size=size[0], max_size=size[1])
                                  if isinstance(size, tuple) else ray.data.ActorPoolStrategy(size=size))
            options["fn_constructor_kwargs"] = stage.kwargs
        else:
            options["fn_kwargs"] = stage.kwargs
        ds = ds.map_batches(stage.fn, **options)
    return ds


def model_stage(fn: type, batch_size: int, kwargs: dict, resources: dict, actors: int) -> Stage:
    """The stage that runs the backbone: sized by :func:`~mvtec_ray.distributed.cluster.cluster_plan`."""
    return Stage(fn, batch_size, resources["num_cpus"], kwargs, actors, resources.get("num_gpus", 0.0),
                 resources.get("resources") or None)
