"""The incremental scoring index: what an output folder has scored already, and which errors it holds.

An image is done for one model when ``OUT/scores`` holds a row with its (uri, version, detector,
model version): a second detector, a refitted model or a changed file (a new version, see
:meth:`~mvtec_ray.storage.Storage.version_of`) is scored again, nothing else is. Error rows never
make an image done: they are tried again on every run (cheap: a listing problem costs no decode),
and an error that is still the latest outcome of its (uri, version) is not written a second time.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mvtec_ray.storage import Storage, join


def input_key(uri: str, version: str) -> str:
    return f"{uri}@{version}"


def _hashes(texts: Iterable[str]) -> np.ndarray:
    return np.fromiter((int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
                        for t in texts), dtype=np.uint64)


def input_hashes(uris, versions) -> np.ndarray:
    """64-bit hashes of (uri, version): 8 bytes per image instead of a Python string."""
    return _hashes(input_key(str(u), str(v)) for u, v in zip(uris, versions))


def model_hash(detector: str, model_version: str) -> np.uint64:
    return _hashes([f"model|{detector}@{model_version}"])[0]


def score_keys(uris, versions, detectors, model_versions) -> np.ndarray:
    """Keys of (uri, version, detector, model version): an input hash XOR a model hash (both
    blake2b), so a listing chunk needs one hash per image, not one per image and model.

    A collision (about 3e-6 for 10 million keys) would skip one image for one model as already scored.
    """
    return _with_models(input_hashes(uris, versions), detectors, model_versions)


def _with_models(inputs: np.ndarray, detectors, model_versions) -> np.ndarray:
    pairs = list(zip(map(str, detectors), map(str, model_versions)))
    models = {p: model_hash(*p) for p in set(pairs)}
    return inputs ^ np.fromiter((models[p] for p in pairs), dtype=np.uint64, count=len(pairs))


def error_keys(uris, versions, errors) -> np.ndarray:
    """Keys of (uri, version, error text): the same error of the same file is recorded once."""
    return input_hashes(uris, versions) ^ _hashes(f"error|{e}" for e in errors)


@dataclass
class ScoreIndex:
    #: sorted keys (:func:`score_keys`) of every score row
    scored: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    #: sorted keys (:func:`error_keys`) of error rows that are still their file's latest outcome
    errors: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    def missing(self, uris, versions, models: list[tuple[str, str]]) -> list[list[str]]:
        """Per image, the detectors of ``models`` ((detector, model version) pairs) it has no score of."""
        base = input_hashes(uris, versions)
        todo = [[] for _ in range(len(base))]
        for detector, version in models:
            done = np.isin(base ^ model_hash(detector, version), self.scored) if len(self.scored) else \
                np.zeros(len(base), bool)
            for i in np.flatnonzero(~done):
                todo[i].append(detector)
        return todo

    def plan_chunk(self, chunk: pd.DataFrame, models: dict[str, list[tuple[str, str]]]) -> tuple[pd.DataFrame, int]:
        """A listing chunk -> the rows to send (with a ``detectors`` column: the missing ones, comma
        separated) and the number of images already scored by every model of their category.

        Rows with a problem (an error row to be) always go: errors are retried on every run.
        """
        chunk = chunk.assign(detectors="")
        keep = np.ones(len(chunk), bool)
        scorable = (chunk["problem"] == "").to_numpy()
        for category in chunk.loc[scorable, "category"].unique():
            rows = np.flatnonzero(scorable & (chunk["category"] == category).to_numpy())
            todo = self.missing(chunk["uri"].iloc[rows], chunk["version"].iloc[rows], models[category])
            chunk.iloc[rows, chunk.columns.get_loc("detectors")] = [",".join(t) for t in todo]
            keep[rows] = [bool(t) for t in todo]
        return chunk[keep].reset_index(drop=True), int((~keep).sum())


def _shards(storage: Storage, out_uri: str, folder: str) -> list[str]:
    base = join(out_uri, folder)
    if not storage.exists(base):
        return []
    return [storage.uri_of(out_uri, i.path) for i in storage.iter_files(base) if i.base_name.endswith(".parquet")]


def _read_columns(storage: Storage, uris: list[str], columns: list[str], threads: int) -> list[pa.Table]:
    def read(uri: str) -> pa.Table:
        fs, path = storage.resolve(uri)

        def table() -> pa.Table:
            with fs.open_input_file(path) as handle:
                return pq.ParquetFile(handle).read(columns=columns)
        return storage.retry(f"cannot read {uri}", table)
    if not uris:
        return []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(read, uris))


def read_index(storage: Storage, out_uri: str, threads: int = 8) -> ScoreIndex:
    """The index of ``out_uri``'s earlier score and error shards.

    Reads only the key columns of each shard (ranged reads, in parallel threads) and keeps 8 bytes
    per (image, model) score row. An error row counts (as already recorded) only when it is the
    latest error row of its (uri, version) and no later score row of it supersedes it.
    """
    error_tables = _read_columns(storage, _shards(storage, out_uri, "errors"),
                                 ["input_uri", "input_version", "error", "scored_at"], threads)
    error_inputs = np.zeros(0, np.uint64)
    error_at = np.zeros(0)
    errors = np.zeros(0, np.uint64)
    if error_tables:
        table = pa.concat_tables(error_tables)
        uris, versions = table.column("input_uri").to_pylist(), table.column("input_version").to_pylist()
        error_inputs = input_hashes(uris, versions)
        error_at = np.asarray(table.column("scored_at").to_numpy(zero_copy_only=False), dtype=np.float64)
        errors = error_keys(uris, versions, table.column("error").to_pylist())
        # the latest error row of each (uri, version) only
        order = np.lexsort((error_at, error_inputs))
        last = order[np.r_[error_inputs[order][1:] != error_inputs[order][:-1], True]]
        error_inputs, error_at, errors = error_inputs[last], error_at[last], errors[last]

    def read_scores(uri: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        table = _read_columns(storage, [uri], ["input_uri", "input_version", "detector", "model_version",
                                               "scored_at"], 1)[0]
        uris, versions = table.column("input_uri").to_pylist(), table.column("input_version").to_pylist()
        inputs = input_hashes(uris, versions)
        keys = _with_models(inputs, table.column("detector").to_pylist(), table.column("model_version").to_pylist())
        hit = np.isin(inputs, error_inputs)  # few: only the errors' own inputs are kept
        at = np.asarray(table.column("scored_at").to_numpy(zero_copy_only=False), dtype=np.float64)
        return keys, inputs[hit], at[hit]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        parts = list(pool.map(read_scores, _shards(storage, out_uri, "scores")))
    scored = np.unique(np.concatenate([p[0] for p in parts])) if parts else np.zeros(0, np.uint64)
    latest_ok = np.full(len(error_inputs), -np.inf)
    for _, inputs, at in parts:
        for h, t in zip(inputs, at):
            np.maximum(latest_ok, np.where(error_inputs == h, t, -np.inf), out=latest_ok)
    return ScoreIndex(scored, np.unique(errors[error_at > latest_ok]))
