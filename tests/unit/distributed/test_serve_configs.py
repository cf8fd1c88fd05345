"""Static checks of the Serve config (cluster/serve.yaml) and the KubeRay RayService manifest."""
from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path

import pytest
import yaml

if os.environ.get("CI"):
    import ray.serve  # noqa: F401 - CI must have ray[serve]
else:
    pytest.importorskip("ray.serve", reason="needs ray[serve]")

CLUSTER = Path(__file__).resolve().parents[3] / "cluster"
SERVE = CLUSTER / "serve.yaml"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _serve_configs() -> list[dict]:
    return [_load(SERVE), yaml.safe_load(_load(RAYSERVICE)["spec"]["serveConfigV2"])]


def test_serve_configs_validate_against_serve_schema():
    from ray.serve.schema import ServeDeploySchema
    for config in _serve_configs():
        schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
            else ServeDeploySchema.parse_obj(config)
        (app,) = schema.applications
        assert app.name == "mvtec-ray" and app.route_prefix == "/"
        assert config["http_options"]["port"] == 8000


def test_import_path_builds_the_application_from_the_args(monkeypatch):
    from ray.serve import Application

    from mvtec_ray.deploy.api import TOKEN_ENV
    from mvtec_ray.distributed.serve import ScoringDeployment, ServeArgs
    monkeypatch.setenv(TOKEN_ENV, "a token from the nodes' environment")
    for config in _serve_configs():
        app = config["applications"][0]
        module, _, name = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), name)
        ServeArgs(**app["args"])  # every key is a known argument with a valid value
        built = builder(copy.deepcopy(app["args"]))
        assert isinstance(built, Application)
        assert built._bound_deployment.name == ScoringDeployment.name  # noqa: SLF001
        options = built._bound_deployment._deployment_config  # noqa: SLF001
        assert options.autoscaling_config.max_replicas == app["args"]["max_replicas"]
        assert built._bound_deployment.ray_actor_options["num_cpus"] == app["args"]["num_cpus"]  # noqa: SLF001
        assert not any("token" in k.lower() for k in app["args"]), "tokens come from the environment"
        assert not any("token" in k.lower() for k in app["runtime_env"].get("env_vars", {}))


def test_serve_yaml_and_rayservice_serve_the_same_application():
    plain, kuberay = _serve_configs()
    assert plain["applications"] == kuberay["applications"]
    assert plain["http_options"]["host"] == kuberay["http_options"]["host"] == "0.0.0.0"


def test_rayservice_cluster_is_the_rayclusters_plus_serve_port_and_token():
    service = _load(RAYSERVICE)
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    spec = copy.deepcopy(service["spec"]["rayClusterConfig"])
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 8000, "name": "serve"} in head["ports"]
    head["ports"].remove({"containerPort": 8000, "name": "serve"})
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            token = {"secretRef": {"name": "mvtec-ray-token", "optional": True}}
            assert token in container["envFrom"], container["name"]
            container["envFrom"].remove(token)
    assert spec == _load(RAYCLUSTER)["spec"]


def test_without_token_the_configs_refuse_to_deploy_unless_anonymous_is_explicit(monkeypatch):
    """Both configs bind 0.0.0.0: without MVTEC_RAY_TOKEN they must not build an open API."""
    from mvtec_ray.deploy.api import TOKEN_ENV
    from mvtec_ray.errors import UserError
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    for config in _serve_configs():
        app = config["applications"][0]
        assert config["http_options"]["host"] == "0.0.0.0"
        assert not app["args"].get("allow_anonymous"), "anonymous access is never the shipped default"
        module, _, name = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), name)
        with pytest.raises(UserError, match=f"without a bearer token.*{TOKEN_ENV}"):
            builder(copy.deepcopy(app["args"]))
        builder({**copy.deepcopy(app["args"]), "allow_anonymous": True})  # explicit: builds


def test_the_configs_document_the_token_rule():
    for path in (SERVE, RAYSERVICE):
        text = path.read_text()
        assert "allow_anonymous: true" in text and "refuses" in text, path.name
