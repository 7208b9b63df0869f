"""The exported text tower is open only around builds: closed after warm-up and after `text_tower_idle_s`
without a call, opened again by the next one, with the same features (backends/on_demand.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from app.encoder.backends.base import FloatArray, TokenArray
from app.encoder.backends.on_demand import OnDemandTextTower
from app.encoder.choice import FIDELITY_MIN_COSINE, fidelity_bound
from app.encoder.factory import create_encoder
from app.settings import Settings
from benchmarks.server_process import link_model
from tests.api.conftest import cifar_images, create_task

PROMPTS = ["a photo of a cat.", "a photo of a dog.", "a photo of a ship."]


class CountingTower:
    """A text tower whose output depends on its input only; counts sessions and calls."""

    name = "fake"
    sessions = 0

    def __init__(self) -> None:
        CountingTower.sessions += 1
        self.calls = 0

    def __call__(self, tokens: TokenArray) -> FloatArray:
        self.calls += 1
        return tokens.astype(np.float32) * 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_it_closes_only_after_the_idle_time_and_the_next_call_opens_a_new_session() -> None:
    CountingTower.sessions = 0
    clock = Clock()
    tower = OnDemandTextTower(CountingTower, idle_s=3600, clock=clock)
    tokens = np.arange(6, dtype=np.int64).reshape(2, 3)
    first = tower(tokens)
    assert tower.is_open
    assert CountingTower.sessions == 1
    assert tower.opens == 1
    clock.now += 3599
    assert not tower.close_if_idle()  # used 3599 s ago: still open
    assert tower.is_open
    clock.now += 1
    assert tower.close_if_idle()
    assert not tower.is_open
    assert CountingTower.sessions == 1
    np.testing.assert_array_equal(tower(tokens), first)
    assert tower.is_open
    assert CountingTower.sessions == 2
    assert tower.opens == 2
    assert tower.close()
    assert not tower.close()


def test_its_timer_closes_an_idle_session() -> None:
    tower = OnDemandTextTower(CountingTower, idle_s=0.05)
    tower(np.ones((1, 3), dtype=np.int64))
    deadline = time.monotonic() + 10
    while tower.is_open and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not tower.is_open
    tower(np.ones((1, 3), dtype=np.int64))
    assert tower.is_open
    assert tower.opens == 2
    tower.close()


def test_calls_racing_its_timer_always_get_their_own_answer() -> None:
    tower = OnDemandTextTower(CountingTower, idle_s=0.0005)  # the timer fires between and during calls
    failures: list[str] = []

    def caller(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(300):
            tokens = rng.integers(0, 1000, (2, 4), dtype=np.int64)
            if not np.array_equal(tower(tokens), tokens.astype(np.float32) * 2.0):
                failures.append(f"caller {seed}: wrong rows")
            if rng.uniform() < 0.1:
                time.sleep(0.002)

    threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert tower.opens > 1  # it did close and open again while being called
    tower.close()


def test_auto_holds_it_to_its_sessions_precision() -> None:
    class Int8Tower(CountingTower):
        precision = "int8"

    assert fidelity_bound(OnDemandTextTower(Int8Tower, idle_s=60)) == FIDELITY_MIN_COSINE["int8"]
    assert fidelity_bound(OnDemandTextTower(CountingTower, idle_s=60)) == FIDELITY_MIN_COSINE["fp32"]


def test_it_refuses_an_idle_time_that_would_never_keep_it_open() -> None:
    with pytest.raises(ValueError, match="idle_s must be > 0"):
        OnDemandTextTower(CountingTower, idle_s=0)


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_an_exported_text_tower_is_closed_after_warm_up_and_gives_the_same_features_reopened(
    backend: str, model_data_dir: Path, tmp_path: Path
) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino")
    data_dir = tmp_path / "data"
    link_model(data_dir, model_data_dir)
    settings = Settings(model="offline", data_dir=data_dir, backend=backend, threads=2)
    on_demand, _ = create_encoder(settings.model_copy(update={"text_tower_idle_s": 3600}))
    kept, _ = create_encoder(settings.model_copy(update={"text_tower_idle_s": 0}))
    assert on_demand.backend == kept.backend == backend
    assert on_demand.text_tower_state == {"open": False, "idle_close_s": 3600, "opens": 1}  # warm-up closed it
    assert kept.text_tower_state == {"open": True, "idle_close_s": None, "opens": 1}
    reference = kept.encode_texts(PROMPTS)
    np.testing.assert_array_equal(on_demand.encode_texts(PROMPTS), reference)
    assert on_demand.text_tower_state["open"]
    assert on_demand.text_tower_state["opens"] == 2
    assert on_demand.close_text_tower()
    np.testing.assert_array_equal(on_demand.encode_texts(PROMPTS), reference)
    assert not kept.close_text_tower()  # a tower kept open is not closed by anyone


def test_a_build_opens_the_closed_text_tower_and_info_shows_it(model_data_dir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    link_model(data_dir, model_data_dir)
    settings = Settings(model="offline", data_dir=data_dir, backend="onnx", threads=2, text_tower_idle_s=3600)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/info").json()["model"]["text_tower"] == {
            "open": False,
            "idle_close_s": 3600,
            "opens": 1,
        }
        shots = cifar_images("train", ("cat", "dog"), 2)
        task = create_task(client, shots)
        assert sorted(c if isinstance(c, str) else c["name"] for c in task["classes"]) == ["cat", "dog"]
        assert client.get("/v1/info").json()["model"]["text_tower"] == {
            "open": True,
            "idle_close_s": 3600,
            "opens": 2,
        }
