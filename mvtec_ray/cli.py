"""``mvtec-ray`` command line: sample-data, run, extract, fit, score, serve, export, report.

User errors print one line and exit 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time

from mvtec_ray.errors import UserError

log = logging.getLogger("mvtec_ray")


def echo(text: object = "", file=None) -> None:
    """The one place the command line prints: file and category names come from the data, so the
    terminal controls they may hold (ESC sequences, bidi overrides, undecodable bytes) are shown
    as escapes (:func:`~mvtec_ray.storage.printable_text`), never acted on."""
    from mvtec_ray.storage import printable_text
    print(printable_text(str(text)), file=file or sys.stdout, flush=True)


class _PrintableFormatter(logging.Formatter):
    """Log lines go through the same escaping as :func:`echo` (warnings name files too)."""

    def format(self, record: logging.LogRecord) -> str:
        from mvtec_ray.storage import printable_text
        return printable_text(super().format(record))


def _common(parser: argparse.ArgumentParser, data: bool = True, out: bool = True, extraction: bool = True,
            detectors: bool = True) -> None:
    if data:
        parser.add_argument("--data", help="dataset root in the MVTec AD layout: a local folder or s3://bucket/prefix")
        parser.add_argument("--manifest", help="instead of --data: a CSV or Parquet table of images (local or s3://) "
                                               "with columns path, category, split, label[, defect_type, mask_path]")
    if out:
        parser.add_argument("--out", help="output folder (local or s3://)")
    parser.add_argument("--config", help="YAML config; command-line flags override it")
    parser.add_argument("--address", help="Ray address (default: an embedded local Ray; 'auto' = the running cluster)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the embedded local Ray (default: all)")
    parser.add_argument("--categories", help="comma-separated categories (default: all found)")
    if extraction:
        parser.add_argument("--backbone", help="resnet50 (default), wide_resnet50_2, resnet18, efficientnet_lite0, "
                                               "efficientnet_lite2")
        parser.add_argument("--weights", help="imagenet (default), /path/file.pth, s3://bucket/key.pth, or random "
                                              "(NOT pretrained; results are marked)")
        parser.add_argument("--image-size", type=int, help="input size in pixels (default 224)")
        parser.add_argument("--tile-size", type=int, help="embed tiles of this side and stitch the maps "
                                                          "(a divisor of --image-size, e.g. 224 with 448)")
        parser.add_argument("--batch-size", type=int, help="images per extractor batch (default 16)")
        parser.add_argument("--augment-copies", type=int, help="augmented copies per training image (default 0)")
        parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="extractor device (default auto)")
    if detectors:
        parser.add_argument("--detectors", help="comma-separated detector names (default: all)")
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL or AWS)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def _evaluation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--search", action="store_true", default=None,
                        help="tune each detector's hyper-parameters on the validation split (config 'search:')")
    parser.add_argument("--threshold-rule", help="f1 (default: F1-max on validation) or fpr:<rate>, e.g. fpr:0.01 "
                                                 "(flags at most that fraction of held-out normal images)")
    parser.add_argument("--pixel-threshold-rule", help="between:0.999 (default), f1 (F1-max on validation pixels) or "
                                                       "normal:<q> (a quantile of held-out normal pixels)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvtec-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sample-data", help="write a small generated dataset in the MVTec AD layout")
    p.add_argument("out", help="folder to create")
    p.add_argument("--categories", help="comma-separated subset of the built-in categories")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", choices=("standard", "hard"), default="standard",
                   help="hard: small faint defects, and normal images that vary more (lighting, pose, blur)")
    p.add_argument("--overwrite", action="store_true", help="replace existing category folders")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("run", help="the whole pipeline: extract, fit, evaluate, results table and report")
    _common(p)
    p.add_argument("--features", help="features folder (default OUT/features); reused when complete")
    _evaluation_flags(p)

    p = sub.add_parser("extract", help="stream images through the backbone into Parquet feature shards")
    _common(p, detectors=False)

    p = sub.add_parser("fit", help="fit and evaluate every detector on every category as Ray tasks")
    _common(p, data=False, extraction=False)
    p.add_argument("--features", required=True, help="features folder written by extract")
    _evaluation_flags(p)

    p = sub.add_parser("score", help="score new images with fitted models (streaming, incremental)")
    _common(p, data=False, extraction=False)
    p.add_argument("--models", required=True, help="models folder written by fit/run (OUT/models)")
    p.add_argument("--images", required=True, help="folder, file or s3:// prefix of images to score")
    p.add_argument("--category", help="category of all images (default: taken from each path)")
    p.add_argument("--rescore", action="store_true", help="score every image again, not only new ones")
    p.add_argument("--batch-size", type=int, help="images per scoring batch")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])

    p = sub.add_parser("serve", help="online scoring: an HTTP API and a web page on Ray Serve")
    _common(p, data=False, out=False, extraction=False)
    p.add_argument("--models", required=True, help="models folder written by fit/run (OUT/models)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", help="file holding a bearer token the API then requires "
                                        "(default: the MVTEC_RAY_TOKEN environment variable, else no token)")
    p.add_argument("--allow-anonymous", action="store_true",
                   help="serve without a token on a --host other than loopback (refused otherwise)")
    p.add_argument("--max-image-pixels", type=int, help="largest image decoded, pixels (413 over it; "
                                                        "default 16000000, or the config's lower limit)")
    p.add_argument("--max-batch-size", type=int, default=8, help="images per dynamic batch")
    p.add_argument("--max-replicas", type=int, default=1, help="autoscaling limit of the replicas")

    p = sub.add_parser("export", help="write one self-contained TorchScript/ONNX model (backbone + detector)")
    p.add_argument("--models", required=True, help="models folder written by fit/run (OUT/models)")
    p.add_argument("--category", required=True)
    p.add_argument("--detector", required=True)
    p.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    p.add_argument("--output", help="file to write (default: CATEGORY-DETECTOR.pt or .onnx here)")
    p.add_argument("--config", help="YAML config (S3 endpoint)")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("report", help="write OUT/report.html from a run's outputs")
    p.add_argument("out", help="a run's output folder (local or s3://)")
    p.add_argument("--config", help="YAML config (its s3: settings are used)")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--debug", action="store_true")
    return parser


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def config_from_args(args: argparse.Namespace):
    from mvtec_ray.config import load_config
    get = lambda name: getattr(args, name, None)  # noqa: E731
    overrides = {
        "data": get("data"), "out": get("out"), "categories": _split(get("categories")),
        "ray.address": get("address"), "ray.num_cpus": get("num_cpus"),
        "extract.backbone": get("backbone"), "extract.weights": get("weights"),
        "extract.image_size": get("image_size"), "extract.tile_size": get("tile_size"),
        "extract.batch_size": get("batch_size"),
        "extract.augment_copies": get("augment_copies"), "extract.device": get("device"),
        # score/serve's --detectors select fitted models (and may name the best_on_validation alias)
        "detectors.names": _split(get("detectors")) if get("command") in ("run", "fit") else None,
        "manifest": get("manifest"),
        "search.enabled": get("search"), "evaluation.threshold_rule": get("threshold_rule"),
        "evaluation.pixel_threshold_rule": get("pixel_threshold_rule"),
    }
    config = load_config(get("config"), overrides)
    if get("s3_endpoint"):
        config.s3.endpoint_url = args.s3_endpoint
    return config


def _require(config, *fields: str) -> None:
    if "data" in fields and config.manifest:
        fields = tuple(f for f in fields if f != "data")
    for name in fields:
        if not getattr(config, name):
            also = " (or --manifest)" if name == "data" else ""
            raise UserError(f"--{name}{also} is required (or set '{name}:' in the config)")


def cmd_sample_data(args) -> int:
    from mvtec_ray.data.sample_data import ALL_CATEGORIES, SampleSpec, generate_sample_dataset
    categories = _split(args.categories)
    unknown = sorted(set(categories or []) - set(ALL_CATEGORIES))
    if unknown:
        raise UserError(f"unknown sample categories {unknown}; known: {', '.join(ALL_CATEGORIES)}")
    try:
        summary = generate_sample_dataset(args.out, categories=categories, seed=args.seed,
                                          spec=SampleSpec(difficulty=args.difficulty), overwrite=args.overwrite)
    except FileExistsError as exc:
        raise UserError(f"{exc} (use --overwrite)") from None
    for category, counts in summary.items():
        echo(f"{category}: {counts['train']} train, {counts['test_good']} test/good, "
              f"{sum(counts['test_defect'].values())} test defects ({', '.join(counts['test_defect'])})")
    echo(f"wrote {args.out}")
    return 0


def _preflight(config):
    """Everything a person can get wrong, checked before the heavy imports and before Ray starts."""
    from mvtec_ray.data.manifest import dataset_catalog
    from mvtec_ray.storage import Storage
    storage = Storage(config.s3)
    catalog = dataset_catalog(config.data, config.manifest, storage, config.categories)
    from mvtec_ray.features.backbones import (
        resolve_weights,  # torch: only once the data is known to be there
    )
    weights = resolve_weights(config.extract.backbone, config.extract.weights, storage)
    return storage, catalog, weights


def cmd_run(args) -> int:
    from mvtec_ray.storage import Storage
    config = config_from_args(args)
    _require(config, "data", "out")
    _, catalog, weights = _preflight(config)
    from mvtec_ray.distributed.pipeline import run_pipeline
    from mvtec_ray.report.html import write_report
    from mvtec_ray.report.tables import format_results_table, format_tuning_table
    started = time.perf_counter()
    outputs = run_pipeline(config, features_uri=args.features, catalog=catalog, weights=weights)
    _print_extraction(outputs.extraction)
    echo(format_results_table(outputs.results))
    if config.search.enabled:
        echo(format_tuning_table(outputs.results))
    echo(f"report: {write_report(config.out, storage=Storage(config.s3))}")
    echo(f"outputs: {config.out} (results.md/csv/parquet, scores.parquet, models/, features/)  "
          f"total {time.perf_counter() - started:.1f}s: " +
          ", ".join(f"{k} {v:.1f}s" for k, v in outputs.seconds.items()))
    return 0


def _print_extraction(extraction) -> None:
    if extraction is None:
        return
    ok = int(extraction.counts.loc[extraction.counts["status"] == "ok", "rows"].sum())
    again = "".join(f", {n} {what}" for n, what in (
        (extraction.changed, "extracted again (file changed)"),
        (extraction.retried_errors, "errors retried"),
        (extraction.dropped, "no longer in the data (not read)")) if n)
    echo(f"features: {extraction.features_dir}: {ok} rows ok, {len(extraction.errors)} errors, "
          f"{extraction.skipped_existing} reused{again}, {extraction.seconds:.1f}s")
    for row in extraction.errors.head(20).itertuples():
        echo(f"  error: {row.source_uri}: {row.error}")


def cmd_extract(args) -> int:
    config = config_from_args(args)
    _require(config, "data", "out")
    storage, catalog, weights = _preflight(config)
    for warning in catalog.warnings[:20]:
        log.warning(warning)
    from mvtec_ray.distributed.cluster import connect
    from mvtec_ray.distributed.extraction import run_extraction
    connect(config.ray)
    result = run_extraction(catalog, config.out, config.extract, storage, weights)
    _print_extraction(result)
    echo(result.counts.pivot_table(index="category", columns="split", values="rows", aggfunc="sum",
                                    fill_value=0).to_string())
    return 0


def cmd_fit(args) -> int:
    from mvtec_ray.features.store import FeatureSet
    from mvtec_ray.storage import Storage
    config = config_from_args(args)
    _require(config, "out")
    storage = Storage(config.s3)
    features = FeatureSet.open(args.features, storage)
    from mvtec_ray.distributed.cluster import connect
    from mvtec_ray.distributed.pipeline import run_fit
    from mvtec_ray.report.html import write_report
    from mvtec_ray.report.outputs import write_outputs
    from mvtec_ray.report.tables import format_results_table, format_tuning_table
    connect(config.ray)
    results, scores = run_fit(features, config.out, config, storage)
    errors = features.error_rows().to_pandas()
    write_outputs(config.out, storage, config, results, scores, errors)
    echo(format_results_table(results))
    if config.search.enabled:
        echo(format_tuning_table(results))
    echo(f"report: {write_report(config.out, storage=storage)}")
    return 0


def cmd_score(args) -> int:
    from mvtec_ray.distributed.scoring import run_scoring
    config = config_from_args(args)
    _require(config, "out")
    summary = run_scoring(config, models_uri=args.models, images_uri=args.images, category=args.category,
                          rescore=args.rescore, detectors=_split(args.detectors))
    echo(summary.describe())
    return 0


def cmd_serve(args) -> int:
    from mvtec_ray.deploy.api import TOKEN_ENV, is_loopback, token_digest
    config = config_from_args(args)
    token = None
    if args.token_file:
        try:
            token = open(args.token_file, encoding="utf-8").read().strip()
        except OSError as exc:
            raise UserError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from None
        if not token:
            raise UserError(f"--token-file {args.token_file} is empty")
    elif os.environ.get(TOKEN_ENV, "").strip():
        token = os.environ[TOKEN_ENV].strip()
    # before Ray is imported or connected: an open API on a reachable address is never an accident
    loopback = is_loopback(args.host)
    if not token and not loopback and not args.allow_anonymous:
        raise UserError(f"refusing to serve on {args.host} without a token: anyone who reaches it could use "
                        f"the API; give --token-file or set {TOKEN_ENV}, or pass --allow-anonymous")
    if not token and not loopback:
        log.warning("serving on %s without a token (--allow-anonymous): anyone who reaches this address can "
                    "use the API", args.host)
    from mvtec_ray.distributed.serve import ServeArgs, run_service
    extra = {"max_image_pixels": args.max_image_pixels} if args.max_image_pixels else {}
    serve_args = ServeArgs(models=args.models, categories=config.categories, detectors=_split(args.detectors),
                           token_sha256=token_digest(token) if token else None, max_batch_size=args.max_batch_size,
                           max_replicas=args.max_replicas, allow_anonymous=not token, **extra)
    return run_service(serve_args, config, args.host, args.port)


def cmd_export(args) -> int:
    from mvtec_ray.deploy.export import export_model
    config = config_from_args(args)
    path = export_model(config, args.models, args.category, args.detector, args.format, args.output)
    echo(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from mvtec_ray.report.html import write_report
    from mvtec_ray.storage import Storage, is_s3
    config = config_from_args(args)
    if not is_s3(args.out) and not os.path.isdir(args.out):
        raise UserError(f"not a run folder: {args.out}")
    try:
        path = write_report(args.out, storage=Storage(config.s3))
    except FileNotFoundError:
        raise UserError(f"not a run folder: {args.out} (no results.parquet)") from None
    echo(f"report: {path}")
    return 0


COMMANDS = {"sample-data": cmd_sample_data, "run": cmd_run, "extract": cmd_extract, "fit": cmd_fit,
            "score": cmd_score, "serve": cmd_serve, "export": cmd_export, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    for noisy in ("ray", "filelock", "urllib3", "botocore", "matplotlib", "PIL", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from mvtec_ray.distributed import native_stderr
    native_stderr.request(not args.debug)  # Ray's C++ notices a user cannot act on
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        echo(f"mvtec-ray {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        user = find_user_error(exc)
        if user is None or args.debug:
            raise  # a bug (or --debug): the traceback is what helps
        echo(f"mvtec-ray {args.command}: error: {_one_line(user)}", file=sys.stderr)
        return 2
    finally:
        native_stderr.stop()


# how a UserError raised in a Ray task or Ray Data UDF survives: as a line of the remote traceback
_REMOTE_USER_ERROR = re.compile(r"^mvtec_ray\.errors\.(\w+): (.+)$", re.MULTILINE)


def find_user_error(exc: BaseException) -> UserError | None:
    """The UserError behind ``exc``: itself, one in its chain (``.cause``, ``__cause__``,
    ``__context__``), or one raised remotely, which Ray Data delivers only as traceback text
    inside a UserCodeException."""
    from mvtec_ray import errors
    found, seen, chain, todo = None, set(), [], [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen or len(seen) > 50:
            continue
        seen.add(id(current))
        chain.append(current)
        if isinstance(current, UserError) and not type(current).__module__.startswith("ray"):
            found = current  # the innermost one wins: its message is not a Ray traceback
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]
    if found is not None:
        return found
    for current in chain:
        for name, message in _REMOTE_USER_ERROR.findall(str(current)):
            cls = getattr(errors, name, None)
            if isinstance(cls, type) and issubclass(cls, UserError):
                found = cls(message.strip())
    return found


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def job_main(command: str, argv: list[str] | None = None) -> int:
    """Entry for ``pipelines/<job>.py``: inside a submitted Ray job (RAY_ADDRESS set) use that cluster."""
    argv = list(sys.argv[1:] if argv is None else argv)
    address = os.environ.get("RAY_ADDRESS", "")
    # an http:// RAY_ADDRESS is the job server's (for the `ray job` CLI), not one to join
    if address and "://" not in address and "--address" not in argv:
        argv += ["--address", "auto"]
    return main([command, *argv])


if __name__ == "__main__":
    sys.exit(main())
