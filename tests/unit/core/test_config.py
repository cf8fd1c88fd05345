"""Config: YAML in, CLI overrides on top, clear errors, no secrets in dumps."""
from __future__ import annotations

import pytest
import yaml

from mvtec_ray.config import RunConfig, S3Settings, load_config
from mvtec_ray.errors import UserError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("extract:\n  backbone: resnet18\n  batch_size: 8\ndetectors:\n  names: [knn, lof]\n")
    config = load_config(path, {"extract.batch_size": 4, "data": "/d"})
    assert config.extract.backbone == "resnet18" and config.extract.batch_size == 4
    assert config.detectors.names == ["knn", "lof"] and config.data == "/d"


@pytest.mark.parametrize("text,match", [
    ("extract: [unclosed", "invalid YAML"),
    ("- a list", "must be a mapping"),
    ("extract:\n  backbone: vgg99\n", "unknown backbone 'vgg99'"),
    ("detectors:\n  names: [knn, magic]\n", "unknown detector"),
    ("extract:\n  batch_size: 0\n", "extract.batch_size"),
    ("extrakt: {}\n", "extrakt"),
])
def test_bad_config_one_line_error(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=match) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_secrets_never_dumped(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret-value-123")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLANTED")
    config = load_config(None, {"data": "s3://b/p"})
    assert config.s3.secret_key.get_secret_value() == "planted-secret-value-123"
    dumped = config.dump_yaml()
    assert "planted-secret-value-123" not in dumped and "AKIAPLANTED" not in dumped
    assert "planted-secret-value-123" not in repr(config) and "planted-secret-value-123" not in str(config.s3)
    assert yaml.safe_load(dumped)["data"] == "s3://b/p"


def test_fingerprint_tracks_feature_settings_only():
    base = RunConfig().extract
    assert base.fingerprint() == base.model_copy(update={"batch_size": 64, "actors": 3}).fingerprint()
    assert base.fingerprint() != base.model_copy(update={"image_size": 256}).fingerprint()
    assert base.fingerprint() != base.model_copy(update={"backbone": "resnet18"}).fingerprint()


def test_s3_settings_from_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    s3 = S3Settings.from_env()
    assert s3.endpoint_url == "http://127.0.0.1:9" and s3.region == "eu-west-1"
