"""With an S3 --out the report and its figures go to S3 like every other output, and
`mvtec-ray report s3://...` (re)writes them there."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from mvtec_ray.cli import main
from tests.helpers.feature_store import write_store


def _keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="mvtec", Prefix=prefix)
    return {o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])}


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["aws_secret_access_key"])
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return ["--s3-endpoint", s3_server["endpoint"]]


def test_s3_out_gets_the_report_and_report_rewrites_it(ray_session, s3_server, s3_env, tmp_path, capsys):
    client = s3_server["client"]
    store = write_store(tmp_path / "features", patches=True)
    out = "s3://mvtec/report-run"
    assert main(["fit", "--features", store.root, "--out", out, "--detectors", "knn,patchcore", *s3_env]) == 0
    assert f"report: {out}/report.html" in capsys.readouterr().out
    keys = _keys(client, "report-run/")
    figures = sorted(k for k in keys if k.startswith("figures/") and k.endswith(".png"))
    # ROC + per category: histograms + examples (patchcore's maps are read back from S3)
    assert "report.html" in keys and len(figures) == 1 + 2 * 2, sorted(keys)
    assert any(k.startswith("maps/patchcore/") for k in keys)
    page = client.get_object(Bucket="mvtec", Key="report-run/report.html")["Body"].read().decode()
    assert "alpha" in page and "patchcore" in page and "report-run" in page
    for key in figures:
        Image.open(io.BytesIO(client.get_object(Bucket="mvtec", Key=f"report-run/{key}")["Body"].read())).verify()

    for key in ["report.html", *figures]:
        client.delete_object(Bucket="mvtec", Key=f"report-run/{key}")
    assert main(["report", out, *s3_env]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out}/report.html"
    assert {"report.html", *figures} <= _keys(client, "report-run/")

    assert main(["report", "s3://mvtec/no-run-here", *s3_env]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mvtec-ray report: error: not a run folder: s3://mvtec/no-run-here (no results.parquet)"


def test_report_of_an_s3_run_reads_its_s3_images(s3_server, s3_settings, tmp_path):
    from mvtec_ray.report.run_folder import RunFolder, load_rgb
    from mvtec_ray.storage import Storage
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, format="PNG")
    s3_server["client"].put_object(Bucket="mvtec", Key="images/red.png", Body=buffer.getvalue())
    storage = Storage(s3_settings)
    remote = RunFolder("s3://mvtec/some-run", storage)
    image = load_rgb(remote.source("s3://mvtec/images/red.png"))
    assert image is not None and image.shape == (30, 40, 3) and tuple(image[0, 0]) == (200, 10, 10)
    assert remote.source("s3://mvtec/images/missing.png") is None  # a placeholder, not a crash
    # a local run's report does not reach out to S3 for its images
    assert RunFolder(tmp_path, storage).source("s3://mvtec/images/red.png") is None
