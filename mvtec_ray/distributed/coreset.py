"""Ray glue for the sharded PatchCore coreset: one Ray task per shard greedy.

The numerical core (shard plan, per-shard greedy, merge) is in
:mod:`mvtec_ray.detectors.coreset`; this module only ships each shard's projected
columns to a task and brings the selected indices back.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mvtec_ray.detectors.coreset import ShardJob, resolve_torch_device, run_shard_job


def _shard_task(zt_shard: np.ndarray, job: ShardJob, use_gpu: Any) -> tuple[np.ndarray, str]:
    import ray
    # a GPU node runs the distance updates on its GPU
    indices = run_shard_job(zt_shard, job, resolve_torch_device(use_gpu))
    return indices, ray.get_runtime_context().get_node_id()


class RayShardRunner:
    """A :data:`~mvtec_ray.detectors.coreset.ShardRunner` that runs every shard as a Ray task.

    ``nodes`` keeps the node id that ran each shard of the last call (for stats and tests).
    """

    def __init__(self, num_cpus: float = 1.0, num_gpus: float = 0.0, use_gpu: Any = "auto"):
        self.num_cpus, self.num_gpus, self.use_gpu = float(num_cpus), float(num_gpus), use_gpu
        self.nodes: list[str] = []

    def __call__(self, Zt: torch.Tensor, jobs: Sequence[ShardJob]) -> list[np.ndarray]:
        import ray
        task = ray.remote(_shard_task).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                               name="coreset_shard")
        refs = [task.remote(Zt[:, job.lo:job.hi].contiguous().cpu().numpy(), job, self.use_gpu)
                for job in jobs]  # each task gets its own contiguous copy of its columns
        results = ray.get(refs)
        self.nodes = [node for _, node in results]
        return [indices for indices, _ in results]
