"""The cluster: connect, Ray Data's settings, and how many actors of what size a stage runs."""
from __future__ import annotations

import logging
import os

from mvtec_ray.config import ExtractConfig, RayConfig

log = logging.getLogger(__name__)


WRITER_CPUS = 0.25  # per shard-writer actor; cluster_plan keeps one such slot free beside the extractors


def _eligible_nodes(required: dict[str, float]) -> list[dict]:
    """Resources of the alive nodes that offer every resource in ``required``."""
    import ray
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")
            and all(n["Resources"].get(k, 0) >= v for k, v in required.items())]


def cluster_plan(config: ExtractConfig) -> dict:
    """Actor pool size, devices and threads from the cluster's resources.

    With ``actor_resources`` only the nodes offering them count, and the pool never asks for
    more actors than they can hold (a fixed-size pool waiting for an unplaceable actor hangs).
    """
    import ray
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    nodes = _eligible_nodes(config.actor_resources)
    cap = None
    if config.actor_resources:
        if nodes:
            cap = sum(min(int(n.get(k, 0) // v) for k, v in config.actor_resources.items()) for n in nodes)
            cpus = sum(float(n.get("CPU", 0)) for n in nodes) or cpus
        else:  # an autoscaler may still add such a node: start small and let it
            log.warning("no node offers actor_resources %s yet; the extractor actors wait for one",
                        config.actor_resources)
    node_cpus = max([float(n.get("CPU", 0)) for n in nodes] or [cpus]) or cpus
    use_gpu = config.device == "cuda" or (config.device == "auto" and gpus > 0)
    if use_gpu:
        actors = config.actors or max(1, int(gpus / config.gpus_per_actor))
        plan = {"device": "cuda", "actors": actors, "num_gpus": config.gpus_per_actor,
                "num_cpus": config.cpus_per_actor, "threads": config.torch_threads or 2}
    else:
        if config.actors:
            actors = config.actors
        elif node_cpus <= 4 and len(nodes) <= 1:
            # a small single node: one single-threaded actor per core. Decode and write tasks share
            # these cores, and a 2-thread forward pass stalls whenever one of its threads is preempted
            # (ResNet50 on 2 shared cores: ~0.065 CPU-s/img with 1 thread, ~0.14 with 2)
            actors = max(1, int(cpus))
        else:
            actors = max(1, int((cpus - config.cpus_per_reader) // max(config.cpus_per_actor, 2.0)))
        # threads per actor: its share of the CPUs, never more than one node has
        threads = config.torch_threads or max(1, int(min(cpus / actors, node_cpus)))
        plan = {"device": "cpu", "actors": actors, "num_gpus": 0, "num_cpus": config.cpus_per_actor,
                "threads": threads}
    if cap is not None and plan["actors"] > max(cap, 1):
        if config.actors:
            log.warning("actors=%d but the nodes with %s hold only %d; using %d", config.actors,
                        config.actor_resources, cap, max(cap, 1))
        plan["actors"] = max(cap, 1)
        if not config.torch_threads and plan["device"] == "cpu":
            plan["threads"] = max(1, int(min(cpus / plan["actors"], node_cpus)))
    plan["fused"] = plan["device"] == "cpu" if config.stages == "auto" else config.stages == "fused"
    plan["resources"] = dict(config.actor_resources)
    if plan["fused"]:
        # decode, embed and write in the same actors. Their CPU requests leave one CPU (half of a
        # small node) unreserved: Ray Data's own small tasks (block metadata) and the actors of a
        # next run in the same driver, while a failed run's are still being torn down, must fit
        # beside them, or they wait forever. Torch threads are set explicitly, not from num_cpus.
        share = (cpus - min(1.0, cpus / 2)) / plan["actors"]
        if plan["num_cpus"] > share:  # Ray takes whole numbers above 1 and at most 4 decimals below
            plan["num_cpus"] = float(int(share)) if share >= 1 else max(0.0001, int(share * 1e4) / 1e4)
        plan["readers"] = plan["writers"] = 0
        return plan
    # actors hold their CPUs for the whole run: together they must leave a reader and a writer slot
    # free, or the decode tasks feeding them are never scheduled (a silent hang, e.g. 2 GPU actors
    # on 2 CPUs), or the writer waits until every image is decoded (all patches pile up in memory)
    share = (cpus - config.cpus_per_reader - WRITER_CPUS) / plan["actors"]
    if plan["num_cpus"] > share:
        # Ray takes whole numbers above 1 and at most 4 decimals below
        plan["num_cpus"] = float(int(share)) if share >= 1 else max(0.0001, int(share * 1e4) / 1e4)
    # reader / writer actor pools grow up to what the CPUs left beside the extractors hold (a GPU
    # needs many decoders); writing costs about half of decoding per image
    free = cpus - plan["actors"] * plan["num_cpus"]
    plan["readers"] = max(1, int((free - WRITER_CPUS) / config.cpus_per_reader))
    plan["writers"] = max(1, plan["readers"] // 2)
    return plan


def connect(config: RayConfig) -> None:
    """The cluster at ``config.address``, else the one ``RAY_ADDRESS`` names, else a new embedded Ray."""
    import ray
    if ray.is_initialized():
        return
    # RAY_ADDRESS (set for `ray job submit` drivers, or exported) means "join that cluster"; an
    # http:// one is the job server's, for the `ray job` CLI only
    env_address = os.environ.get("RAY_ADDRESS", "")
    address = config.address or (env_address if env_address and "://" not in env_address else None)
    if address:
        if config.num_cpus and not config.address:
            log.warning("num_cpus=%d ignored: joining the cluster at RAY_ADDRESS=%s", config.num_cpus, address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        resources = ray.cluster_resources()
        log.info("joined the Ray cluster at %s: %d node(s), %g CPU(s), %g GPU(s)",
                 ray.get_runtime_context().gcs_address, len(nodes), resources.get("CPU", 0), resources.get("GPU", 0))
    else:
        # "local": always a new embedded Ray; plain ray.init() would join whatever cluster a
        # `ray start` recorded in /tmp/ray/ray_current_cluster (and reject num_cpus)
        ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=False,
                 logging_level=logging.WARNING, configure_logging=True)
    from mvtec_ray.distributed import native_stderr
    native_stderr.start_if_requested()  # after ray.init: Ray's daemons keep the real stderr


def use_ray_data():
    """Ray Data's settings for this driver, set by the stages that stream with it (extraction,
    scoring) right before they build a dataset: a driver that only fits never imports it."""
    from ray.data import (
        DataContext,  # its import configures Ray Data's loggers: quiet them after it
    )
    if not log.isEnabledFor(logging.DEBUG):
        # Ray Data's per-dataset INFO lines and its "progress bars disabled" notice: the project
        # shows its own progress line instead
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("MVTEC_RAY_PROGRESS", "0") == "1"
    ctx.print_on_execution_start = False
    return ctx


def resolved(value):
    """``value``, or the object it refers to when it is a Ray object reference (actor arguments)."""
    import ray
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value
