"""The Ray engine's remote-encoder backend, without a Ray cluster: a handle stand-in that answers with a
local encoder, so the seam (towers over a handle, the model description, tokenizing remotely) is checked
against the in-process encoder itself. The cluster test (tests/cluster/test_ray.py) runs the real thing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import dataset_dir

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the `ray` extra is not installed")


@dataclass
class _Answer:
    value: Any

    def result(self, timeout_s: float | None = None) -> Any:
        return self.value


@dataclass
class _Method:
    fn: Callable[..., Any]
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def remote(self, *args: Any) -> _Answer:
        self.calls.append(args)
        return _Answer(self.fn(*args))


class LocalHandle:
    """What a DeploymentHandle to the encoder deployment answers, computed by a local encoder."""

    def __init__(self, encoder: Any) -> None:
        self.image_features = _Method(lambda crops, _caller: encoder.encode_crops(crops))
        self.text_features = _Method(lambda tokens, _caller: encoder.encode_tokens(tokens))
        self.tokenize = _Method(encoder.tokenize)


def _description(encoder: Any) -> Any:
    from api.ray_encoder import ModelDescription

    model = encoder.loaded
    return ModelDescription(
        model.identity, model.preprocess, model.logit_scale, model.config_key, encoder.backend, None
    )


def test_the_remote_encoder_gives_the_local_encoders_features(encoder: Any, model_data_dir: Path) -> None:
    from api.ray_encoder import remote_encoders
    from app.encoder import ClassPrompts
    from app.settings import Settings

    handle = LocalHandle(encoder)
    remote, fallback = remote_encoders(handle, _description(encoder), "replica-1")(
        Settings(model="offline", data_dir=model_data_dir, max_batch=4)
    )
    assert fallback is None
    assert remote.backend == f"ray-encoder:{encoder.backend}"
    assert remote.identity == encoder.identity
    size = encoder.input_size
    crops = np.random.default_rng(0).integers(0, 256, (6, size, size, 3), dtype=np.uint8)
    np.testing.assert_allclose(remote.encode_crops(crops), encoder.encode_crops(crops), atol=1e-6)
    assert [args[0].shape[0] for args in handle.image_features.calls] == [4, 2]  # the replica's batch size
    assert {args[1] for args in handle.image_features.calls} == {"replica-1"}
    classes = [ClassPrompts("cat"), ClassPrompts("dog")]
    np.testing.assert_allclose(remote.class_text_weights(classes), encoder.class_text_weights(classes), atol=1e-6)
    assert handle.tokenize.calls
    assert handle.text_features.calls


def test_a_service_on_the_remote_encoder_creates_and_classifies(encoder: Any, service_settings: Any) -> None:
    from api.main import create_app
    from api.ray_encoder import remote_encoders

    handle = LocalHandle(encoder)
    app = create_app(service_settings, encoders=remote_encoders(handle, _description(encoder), "replica-1"))
    root = dataset_dir("cifar10-mini") / "train"
    shots = [p for name in ("cat", "ship") for p in sorted((root / name).glob("*.jpg"))[:3]]
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in shots]
    with TestClient(app) as client:
        assert client.get("/v1/info").json()["model"]["backend"] == f"ray-encoder:{encoder.backend}"
        created = client.post("/v1/tasks", files=files, data={"labels": [p.parent.name for p in shots]})
        assert created.status_code == 201, created.text
        answer = client.post(f"/v1/tasks/{created.json()['id']}/classify", files=files[:1])
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"][0]["label"] in ("cat", "ship")
    assert sum(args[0].shape[0] for args in handle.image_features.calls) >= len(shots) + 1


def test_batch_counts_tell_mixed_batches_and_rows_per_caller() -> None:
    from api.ray_encoder import BatchCounts

    counts = BatchCounts()
    counts.record(["a", "a"], [2, 3])
    counts.record(["a", "b"], [1, 4])
    assert counts.to_dict() == {
        "calls": 4,
        "batches": 2,
        "rows": 10,
        "mixed_batches": 1,
        "rows_by_caller": {"a": 6, "b": 4},
    }


@pytest.mark.parametrize("args", [{"max_batch_size": 0}, {"batch_wait_timeout_s": -1}, {"batch_wait_timeout_s": 5}])
def test_encoder_batching_out_of_range_is_refused(args: dict[str, Any]) -> None:
    from api.ray_encoder import EncoderBatching

    with pytest.raises(ValueError, match="encoder batching out of range"):
        EncoderBatching.from_args(args)
    assert EncoderBatching.from_args({"max_batch_size": 16}).max_batch_size == 16


def _serve_configs() -> list[dict[str, Any]]:
    import yaml

    repo = Path(__file__).resolve().parents[2]
    serve_config = yaml.safe_load((repo / "deploy/ray/serve-config.yaml").read_text())
    rayservice = yaml.safe_load((repo / "deploy/kuberay/rayservice.yaml").read_text())
    return [serve_config, yaml.safe_load(rayservice["spec"]["serveConfigV2"])]


@pytest.mark.parametrize(
    "config", _serve_configs() if importlib.util.find_spec("ray") else [], ids=["serve", "kuberay"]
)
def test_the_deploy_configs_build_the_three_deployments(config: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    from api.ray_encoder import ENCODER
    from api.ray_serve import INGRESS, REPLICA, app_builder

    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert {d["name"] for d in application["deployments"]} == {REPLICA, ENCODER}
    built = app_builder({**application["args"], "env": {"SHOTCACHE_STORE": "postgresql://db/shotcache"}})
    # The bound graph (Ray's Application -> its Deployment, whose init_args hold the bound arguments).
    ingress = built._bound_deployment
    replicas = ingress.init_args[0]._bound_deployment
    encoder = replicas.init_args[1]._bound_deployment
    assert [d.name for d in (ingress, replicas, encoder)] == [INGRESS, REPLICA, ENCODER]
    batching = encoder.init_args[1]
    assert batching.max_batch_size == application["args"]["encoder"]["max_batch_size"]
    assert encoder._deployment_config.autoscaling_config.max_replicas == 4
