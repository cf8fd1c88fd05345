"""Score new images with fitted models: a streaming Ray Data job, incremental by (file version, model).

images -> decode tasks -> scoring actors (backbone + every model loaded once per actor)
-> Parquet shards ``OUT/scores/part-*.parquet`` (one row per image and detector) and
``OUT/errors/part-*.parquet`` (unreadable inputs, images of categories without a model).

Driver memory does not grow with the number of images, except for two compact parts, both
O(N) by nature of an incremental job and small per image:

* the index of what is already scored: one 8-byte hash per (uri, version, detector, model
  version) read from earlier shards with column-only reads (10 million images x 2 detectors =
  160 MB), and one per error row that is still its file's latest outcome;
* one object reference per block of :data:`BLOCK_ROWS` listed files (the listing itself goes to
  Ray's object store in chunks, a few hundred bytes per file, spillable).

Listing walks the input folder by folder, so its peak is the largest single folder. Results
never come back to the driver: the writers return per-batch counts only.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from mvtec_ray.config import ExtractConfig, RunConfig
from mvtec_ray.deploy.listing import iter_listing
from mvtec_ray.deploy.loaded_models import plan_models
from mvtec_ray.deploy.model_files import list_models
from mvtec_ray.deploy.score_index import ScoreIndex, read_index
from mvtec_ray.deploy.scorer import Scorer, prepare_or_reject, write_score_shards
from mvtec_ray.distributed.cluster import (
    WRITER_CPUS,
    cluster_plan,
    connect,
    resolved,
    use_ray_data,
)
from mvtec_ray.distributed.stream import Stage, apply_stages, model_stage
from mvtec_ray.errors import UserError
from mvtec_ray.storage import Storage

log = logging.getLogger(__name__)
#: listed files per Ray Data input block (a decode task's share)
BLOCK_ROWS = 64


@dataclass
class ScoringSummary:
    out: str
    listed: int = 0
    already_scored: int = 0
    scored_images: int = 0
    score_rows: int = 0
    errors: int = 0
    #: listed files of model categories left out by ``categories`` (neither scored nor errors)
    not_selected: int = 0
    #: errors of this run already recorded as their file's latest outcome (not written again)
    known_errors: int = 0
    seconds: float = 0.0
    #: new images scored per category
    by_category: dict = field(default_factory=dict)

    def describe(self) -> str:
        cats = ", ".join(f"{c}: {n}" for c, n in sorted(self.by_category.items()))
        return (f"scored {self.scored_images} new images ({self.score_rows} rows) into {self.out}/scores; "
                f"{self.errors} errors into {self.out}/errors" +
                (f" ({self.known_errors} recorded before)" if self.known_errors else "") +
                f"; {self.already_scored} of {self.listed} listed "
                f"were already scored; " + (f"{self.not_selected} of other categories left out; "
                                             if self.not_selected else "") +
                f"{self.seconds:.1f}s" + (f" [{cats}]" if cats else ""))


# -- listing (driver, streamed in chunks) --------------------------------------


# -- the actors ------------------------------------------------------------------


class ScoringActor(Scorer):
    """:class:`Scorer` in a Ray actor: the weights arrive as an object reference."""

    def __init__(self, weights, **kwargs):
        super().__init__(weights=resolved(weights), **kwargs)


class ScoringWorker:
    """Decode, score and write in one long-lived actor: the CPU path (see extract.ExtractionWorker)."""

    def __init__(self, config: ExtractConfig, storage: Storage, out_uri: str, recorded_errors=None,
                 **scorer_kwargs):
        self.config, self.storage, self.out_uri = config, storage, out_uri
        self.recorded_errors = resolved(recorded_errors)
        self.scorer = ScoringActor(storage=storage, **scorer_kwargs)

    def __call__(self, listing: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = prepare_or_reject(listing, self.config, self.storage)
        return write_score_shards(self.scorer(prepared), self.out_uri, self.storage, self.recorded_errors)


def _write_shards(batch: dict[str, np.ndarray], out_uri: str, storage: Storage, recorded_errors=None):
    """The staged path's writer: :func:`write_score_shards` with the recorded errors resolved."""
    return write_score_shards(batch, out_uri, storage, resolved(recorded_errors))


# -- the job -------------------------------------------------------------------------
def run_scoring(config: RunConfig, models_uri: str, images_uri: str, category: str | None = None,
                rescore: bool = False, detectors: list[str] | None = None) -> ScoringSummary:
    """Score every image under ``images_uri`` with each planned model it has no score of yet.

    An image is done for a model when ``OUT/scores`` holds its (uri, version, detector, model
    version); only the missing detectors of an image are scored (``ModelSet.score`` per-image
    lists). Error rows never count as done: they are retried on every run, and an error still the
    latest outcome of its (uri, version) is not written again.

    ``category`` applies to every image; without it the category comes from each path.
    ``config.categories`` (``--categories``) keeps only those categories' models, and leaves the
    files of other model categories out of the job (counted in the summary, not recorded as errors,
    so a later job for those categories still scores them). ``rescore``
    scores everything again; an image then has rows from several runs: the latest ``scored_at`` wins.
    Models are checked before any work (:func:`~mvtec_ray.deploy.loaded_models.plan_models`) and refused with
    :class:`ModelMismatch`.
    """
    import ray

    started = time.perf_counter()
    scored_at = time.time()
    storage = Storage(config.s3)
    out_uri = config.out
    # every category with a model names files in the listing; only the selected ones are scored
    categories = sorted({c for c, _ in list_models(storage, models_uri)})
    if category and categories and category not in categories:
        raise UserError(f"no model for category {category!r}; models exist for {', '.join(categories)}")
    if category and config.categories and category not in config.categories:
        raise UserError(f"--category {category!r} is not among --categories {', '.join(config.categories)}")
    plan = plan_models(config, storage, models_uri, detectors, categories=config.categories)
    weights, extract_cfg, selected = plan.weights, plan.extract, plan.categories

    summary = ScoringSummary(out_uri)
    index = ScoreIndex() if rescore else read_index(storage, out_uri)
    # the models each category's images are scored by, with the versions planned before any work
    models = {c: [(d, plan.versions[f"{c}/{d}"]) for cc, d in plan.pairs if cc == c] for c in selected}
    connect(config.ray)
    blocks = []
    others = set(categories) - set(selected)
    for chunk in iter_listing(storage, images_uri, categories, category,
                              max_file_bytes=extract_cfg.max_file_bytes):
        summary.listed += len(chunk)
        if others:
            left_out = chunk["category"].isin(others).to_numpy()
            summary.not_selected += int(left_out.sum())
            chunk = chunk[~left_out].reset_index(drop=True)
        chunk, already = index.plan_chunk(chunk, models)
        summary.already_scored += already
        for i in range(0, len(chunk), BLOCK_ROWS):
            blocks.append(ray.put(chunk.iloc[i:i + BLOCK_ROWS].reset_index(drop=True)))
    recorded_errors = ray.put(index.errors)
    del index
    if not blocks:
        summary.seconds = time.perf_counter() - started
        return summary

    resources = cluster_plan(extract_cfg)
    # an actor per block at most: one that could get no input only costs its start (and Ray Data warns)
    actors = max(1, min(resources["actors"], len(blocks)))
    scorer_kwargs = {"selection": plan.selection, "weights": ray.put(weights.state_dict),
                     "map_size": config.evaluation.pixel_eval_size, "threads": resources["threads"],
                     "device": resources["device"], "scored_at": scored_at}
    use_ray_data()
    if resources["fused"]:
        worker = {"config": extract_cfg, "storage": storage, "out_uri": out_uri, "recorded_errors": recorded_errors,
                  **scorer_kwargs}
        stages = [model_stage(ScoringWorker, extract_cfg.batch_size, worker, resources, actors)]
    else:
        stages = [Stage(prepare_or_reject, 8, extract_cfg.cpus_per_reader, {"config": extract_cfg, "storage": storage}),
                  model_stage(ScoringActor, extract_cfg.batch_size, {"storage": storage, **scorer_kwargs},
                              resources, actors),
                  Stage(_write_shards, None, WRITER_CPUS, {"out_uri": out_uri, "storage": storage,
                                                           "recorded_errors": recorded_errors})]
    ds = apply_stages(ray.data.from_pandas_refs(blocks), stages)
    for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for c, images, rows, errors, known in zip(part["category"], part["images"], part["rows"], part["errors"],
                                                  part["known_errors"]):
            summary.scored_images += int(images)
            summary.score_rows += int(rows)
            summary.errors += int(errors)
            summary.known_errors += int(known)
            if images:
                summary.by_category[str(c)] = summary.by_category.get(str(c), 0) + int(images)
    summary.seconds = time.perf_counter() - started
    return summary


