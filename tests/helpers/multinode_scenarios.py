"""Multi-node scenarios on one machine: several raylets via ``ray.cluster_utils.Cluster``.

    python tests/helpers/multinode_scenarios.py --data DATASET [--work DIR]

One process can be connected to one Ray cluster only, so tests/integration/test_multinode.py runs
this in its own process. The last stdout line is ``VERDICT {json}``; the assertions live in the
test. The cluster gets its own RAY_TMPDIR, so the default /tmp/ray (session_latest and
ray_current_cluster, which ``--address auto`` reads) of other clusters is left alone.

Cluster: head (1 CPU, runs the driver) + "gpu" (1 CPU, fake_gpu=1) + "cpu" (1 CPU).
1. extraction with 2 one-CPU extractor actors (so on 2 nodes); the worker node of one actor
   is SIGKILLed after some shards are written; a replacement node joins (as an autoscaler would)
2. fit, 2 categories x 3 detectors: the worker node running the most fit tasks is killed
   once one task has finished; no replacement until the fit is over
3. extraction with actor_resources={"fake_gpu": 1} and 2 actors asked: 1 actor, all rows
   extracted on the fake_gpu node
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

CATEGORIES = ["grid_gray", "washer"]
IMAGE_SIZE = 128  # scheduling is under test, not accuracy: small inputs keep it fast
CLUSTER: list = []
PROGRESS: dict[str, list] = {}  # features root -> progress, also for a run that timed out
FIT_DETECTORS = ["knn", "mahalanobis", "patchcore"]
T0 = time.perf_counter()
EVENTS: list[dict] = []


def event(what: str, **data) -> None:
    EVENTS.append({"t": round(time.perf_counter() - T0, 1), "what": what, **data})
    print(f"[{EVENTS[-1]['t']:6.1f}s] {what} {data if data else ''}", file=sys.stderr, flush=True)


# -- cluster --------------------------------------------------------------------
def start_cluster(head: dict, workers: dict[str, dict]):
    """A head plus named workers; the driver connects through the library's connect()."""
    from ray.cluster_utils import Cluster

    from mvtec_ray.config import RayConfig
    from mvtec_ray.distributed.cluster import connect
    # fast node-death detection (defaults take ~30 s); small object stores (shared 24 GiB host)
    system = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
              "health_check_timeout_ms": 2000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={
        **head, "include_dashboard": False, "object_store_memory": 200 * 2**20, "_system_config": system})
    nodes = {"head": cluster.head_node}
    for name, args in workers.items():
        nodes[name] = cluster.add_node(object_store_memory=200 * 2**20, **args)
    CLUSTER.append(cluster)
    cluster.wait_for_nodes()
    connect(RayConfig(address=cluster.address))
    event("cluster up", nodes={n: node.node_id[:8] for n, node in nodes.items()})
    return cluster, nodes


def running(node) -> list[str]:
    """Titles of the Ray workers of a node busy with a task or actor (ray::<name>, not IDLE)."""
    import psutil
    from ray._private import ray_constants
    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    titles = []
    try:
        children = psutil.Process(raylet).children(recursive=True)
    except psutil.Error:
        return titles
    for proc in children:
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and not title.startswith("ray::IDLE") and "Agent" not in title.split()[0]:
            titles.append(title.split()[0])
    return titles


def kill(cluster, nodes: dict, name: str, **info) -> dict:
    node = nodes.pop(name)
    record = {"node": name, "node_id": node.node_id, "running": running(node), **info}
    cluster.remove_node(node, allow_graceful=False)  # SIGKILL: a crashed machine, not a drain
    event("killed node", **{k: (v[:8] if k == "node_id" else v) for k, v in record.items()})
    return record


# -- pipeline pieces --------------------------------------------------------------
def extract_config(**overrides):
    from mvtec_ray.config import ExtractConfig
    return ExtractConfig(backbone="efficientnet_lite0", **overrides)


def run_extract(data: str, features_root: str, config, categories=None, split=None):
    import dataclasses

    from mvtec_ray.data.catalog import build_catalog
    from mvtec_ray.distributed.extraction import run_extraction
    from mvtec_ray.storage import Storage
    storage = Storage()
    catalog = build_catalog(data, storage, categories)
    if split:  # a smaller run where only placement matters
        catalog = dataclasses.replace(catalog, entries=catalog.entries[catalog.entries["split"] == split])
    progress = PROGRESS[features_root] = []  # (seconds since start, rows) per written batch
    result = run_extraction(catalog, features_root, config, storage, WEIGHTS, progress=progress)
    result.progress = [(round(t, 1), n) for t, n in progress]
    return result, catalog


def shard_counts(features_dir: str, expected: set[str]) -> dict:
    """Rows as written, counted on the raw shards: FeatureSet's readers drop duplicates, so counting
    through them could never see one."""
    from tests.helpers.shards import raw_shard_rows
    rows = raw_shard_rows(features_dir)
    return {"expected_rows": len(expected), "rows": int(len(rows)),
            "missing": len(expected - set(rows["row_id"])), "unexpected": len(set(rows["row_id"]) - expected),
            "duplicates": int(rows["row_id"].duplicated().sum()),
            "error_rows": int((rows["status"] != "ok").sum())}


def check_features(result, catalog, config) -> dict:
    """Every planned row in the shards exactly once, none in error."""
    from mvtec_ray.features.plan import expected_row_ids, plan_work
    expected = set(expected_row_ids(plan_work(catalog.entries, config)))
    return {**shard_counts(result.features_dir, expected),
            "images": int(catalog.entries["image_id"].nunique()),
            "nodes": result.nodes, "seconds": round(result.seconds, 1), "progress": result.progress}


def run_fit_on(features_dir: str, out: str, detectors=FIT_DETECTORS):
    from mvtec_ray.config import RunConfig
    from mvtec_ray.distributed.pipeline import run_fit
    from mvtec_ray.features.store import FeatureSet
    from mvtec_ray.storage import Storage
    config = RunConfig(out=out, extract=extract_config(), detectors={"names": detectors})
    results, scores = run_fit(FeatureSet.open(features_dir, Storage()), out, config, Storage())
    return results[results["category"] != "mean"]


def fit_summary(rows, seconds: float) -> dict:
    return {"pairs": sorted(f"{c}/{d}" for c, d in zip(rows["category"], rows["detector"])),
            "status": {f"{c}/{d}": (s if s == "ok" else f"{s}: {e}")
                       for c, d, s, e in zip(rows["category"], rows["detector"], rows["status"], rows["error"])},
            "nodes": sorted(set(rows["node"].dropna())) if "node" in rows else [],
            "seconds": round(seconds, 1)}


class Background:
    """Runs fn in a thread so the main thread can watch the run and kill a node."""

    def __init__(self, fn, *args, **kwargs):
        self.value, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, fn, args, kwargs):
        try:
            self.value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported in the verdict
            self.error = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"run did not finish within {timeout:.0f}s")
        return self.value


# -- the scenario -------------------------------------------------------------------
def multinode(data: str, work: Path) -> dict:
    """One cluster, three phases (a cluster start costs ~10 s per node on a busy machine)."""
    from mvtec_ray.data.catalog import build_catalog
    from mvtec_ray.distributed.cluster import cluster_plan
    from mvtec_ray.features.plan import expected_row_ids, plan_work
    from mvtec_ray.storage import Storage
    node_args = {"gpu": {"num_cpus": 1, "resources": {"fake_gpu": 1}}, "cpu": {"num_cpus": 1}}
    cluster, nodes = start_cluster({"num_cpus": 1}, node_args)
    verdict = {"node_ids": {name: node.node_id for name, node in nodes.items()}, "kills": []}

    def replace(name: str) -> None:  # what an autoscaler does for a lost node of a type
        nodes[name] = cluster.add_node(object_store_memory=200 * 2**20, **node_args[name])
        cluster.wait_for_nodes()
        n = sum(k.startswith(name + "_replacement") for k in verdict["node_ids"]) + 1
        verdict["node_ids"][f"{name}_replacement{n}"] = nodes[name].node_id
        event("replacement node up", node=name, node_id=nodes[name].node_id[:8])

    # 1. extraction with 2 one-CPU actors (so on 2 nodes); kill a worker node holding one
    #    after some shards are written; a replacement node joins
    config = extract_config(actors=2, batch_size=4, image_size=IMAGE_SIZE)
    features = work / "features"
    total = len(expected_row_ids(plan_work(build_catalog(data, Storage()).entries, config)))
    run = Background(run_extract, data, str(features), config)
    deadline = time.time() + 300  # ~40 s on a quiet 2-core machine
    while run.alive() and time.time() < deadline:
        shards = list(features.rglob("part-*.parquet"))
        if len(shards) >= 2:
            rows = sum(_parquet_rows(p) for p in shards)
            victim = next((n for n, node in nodes.items() if n != "head"
                           and any("MapWorker" in t for t in running(node))), None)
            if victim and rows < total:
                verdict["kills"].append(kill(cluster, nodes, victim, stage="extract", shards_written=len(shards),
                                             rows_written=rows, rows_total=total))
                replace(victim)
                break
        time.sleep(0.2)
    try:
        run.join(max(10.0, deadline - time.time()))
    except TimeoutError as exc:
        run.error = run.error or str(exc)
    verdict["extract_error"] = run.error
    if run.error:
        verdict["extract_progress"] = PROGRESS.get(str(features))
        return verdict
    result, catalog = run.value
    verdict["extract"] = check_features(result, catalog, config)
    event("extraction done", rows=verdict["extract"]["rows"], nodes=len(result.nodes))

    # 2. fit, 6 one-CPU tasks on 3 one-CPU nodes: kill the non-head node running the most of
    #    them once one has finished; no replacement until the fit is over
    models = work / "out" / "models"
    started = time.perf_counter()
    run = Background(run_fit_on, result.features_dir, str(work / "out"))
    deadline = time.time() + 200
    while run.alive() and time.time() < deadline:
        finished = len(list(models.glob("*/*/model.json"))) if models.exists() else 0
        if finished >= 1:
            busy = {n: sum(t.startswith("ray::fit_") for t in running(node))  # fit_cells_task, fit_task
                    for n, node in nodes.items() if n != "head"}
            victim = max(busy, key=busy.get)
            if busy[victim]:
                verdict["kills"].append(kill(cluster, nodes, victim, stage="fit", fit_tasks_finished=finished,
                                             fit_tasks_total=len(CATEGORIES) * len(FIT_DETECTORS),
                                             fit_tasks_running_there=busy[victim]))
                break
        time.sleep(0.1)
    try:
        run.join(max(10.0, deadline - time.time()))
    except TimeoutError as exc:
        run.error = run.error or str(exc)
    verdict["fit_error"] = run.error
    if run.error:
        return verdict
    verdict["fit"] = fit_summary(run.value, time.perf_counter() - started)
    event("fit done", nodes=len(verdict["fit"]["nodes"]))
    for name in node_args:
        if name not in nodes:
            replace(name)

    # 3. GPU stand-in: only the fake_gpu node may hold extractor actors; 2 asked, 1 fits
    config = extract_config(actors=2, batch_size=8, image_size=IMAGE_SIZE, actor_resources={"fake_gpu": 1})
    verdict["fake_gpu_node"] = nodes["gpu"].node_id
    verdict["fake_gpu_plan"] = cluster_plan(config)
    result, catalog = run_extract(data, str(work / "fake_gpu"), config, categories=["washer"], split="test")
    verdict["fake_gpu_extract"] = check_features(result, catalog, config)
    event("fake_gpu extraction done", nodes=[n[:8] for n in result.nodes])
    return verdict


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - a shard still being written
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset in the MVTec AD layout (the small generated one)")
    parser.add_argument("--work", help="output folder (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="multinode_"))
    work.mkdir(parents=True, exist_ok=True)
    global WEIGHTS
    from mvtec_ray.features.backbones import resolve_weights
    WEIGHTS = resolve_weights("efficientnet_lite0", "imagenet")
    verdict = {}
    try:
        verdict.update(multinode(args.data, work))
    except BaseException as exc:  # noqa: BLE001 - the verdict says what broke
        traceback.print_exc()
        verdict["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    verdict["events"] = EVENTS
    verdict["seconds"] = round(time.perf_counter() - T0, 1)
    print("VERDICT " + json.dumps(verdict, default=str), flush=True)
    try:
        import ray
        ray.shutdown()  # cluster_utils refuses to stop the node a driver is connected to
        if CLUSTER:
            CLUSTER[0].shutdown()
    except Exception:  # noqa: BLE001 - e.g. a run thread still alive after a timeout
        traceback.print_exc()
        os._exit(1)  # the Ray processes die with us (fate sharing); the test also kills leftovers
    failed = any(verdict.get(k) for k in ("error", "extract_error", "fit_error"))
    if failed:
        print(f"Ray logs kept in {os.environ['RAY_TMPDIR']}", file=sys.stderr)
    else:
        import shutil
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    # before ray is imported: a private temp dir (short: Unix socket paths live below it)
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rmn", dir="/tmp")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
