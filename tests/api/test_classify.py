"""Create a task from real cifar10-mini shots and classify held-out images through HTTP."""

from __future__ import annotations

import math
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.service.build import fit_methods
from app.service.task import ENSEMBLE
from cache_models.selection import BLEND_FROM_SHOTS, cross_method_scores

from .conftest import BASE_CLASSES, BASE_SHOTS, Shot, accuracy, cifar_images, classify, create_task

METHODS = ("zero-shot", "tip-adapter", "tip-x", "ape", "gda", "proker")
OTHER_CLASSES = ("deer", "frog", "ship", "truck")  # not in the task: out-of-distribution for abstaining

# Measured with the offline stand-in on 4 classes x 6 shots, 10 held-out images per class: the default
# method (tip-adapter) got 0.725 on these 40 images. Chance is 0.25.
MIN_ACCURACY = 0.5


@pytest.fixture(scope="module")
def held_out() -> list[Shot]:
    return cifar_images("test", BASE_CLASSES, 10)


@pytest.fixture(scope="module")
def foreign() -> list[Shot]:
    return cifar_images("test", OTHER_CLASSES, 4)


@pytest.fixture(scope="module")
def plain_answer(
    api_client: TestClient, base_task: dict[str, Any], held_out: list[Shot], foreign: list[Shot]
) -> dict[str, Any]:
    """The held-out images then the foreign ones, classified with every class listed, no abstaining."""
    return classify(api_client, base_task["id"], held_out + foreign, top_k=10)


def assert_ranked(result: dict[str, Any], expected_len: int, classes: set[str]) -> None:
    top = result["top_k"]
    assert len(top) == expected_len
    assert all(set(entry) == {"label", "probability"} for entry in top)
    probabilities = [entry["probability"] for entry in top]
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(0.0 <= p <= 1.0 for p in probabilities)
    assert sum(probabilities) <= 1.0 + 1e-9
    assert {entry["label"] for entry in top} <= classes
    assert len({entry["label"] for entry in top}) == len(top)


def same_rankings(a: list[list[dict[str, Any]]], b: list[list[dict[str, Any]]], tol: float = 1e-5) -> bool:
    """Same labels in the same order with probabilities within `tol` (the encoder's batch size moves the
    last float bits, so answers to the same image in differently sized requests are not bit-identical)."""
    return all(
        [e["label"] for e in x] == [e["label"] for e in y]
        and all(abs(e["probability"] - f["probability"]) <= tol for e, f in zip(x, y, strict=True))
        for x, y in zip(a, b, strict=True)
    )


def test_create_reports_the_task(api_client: TestClient, base_task: dict[str, Any]) -> None:
    info = api_client.get("/v1/info").json()
    assert isinstance(base_task["id"], str)
    assert len(base_task["id"]) >= 16
    assert base_task["status"] == "ready"
    assert base_task["name"] == "base"
    assert base_task["version"] == 1
    assert [(c["name"], c["shots"]) for c in base_task["classes"]] == [(c, BASE_SHOTS) for c in BASE_CLASSES]
    assert base_task["model"] == info["model"]["model_id"]
    assert base_task["method_requested"] == "default"
    assert base_task["method"] == info["default_method"]
    assert base_task["hyperparams"]
    assert all(isinstance(v, int | float) for v in base_task["hyperparams"].values())
    assert 0.0 <= base_task["loo_accuracy"] <= 1.0
    assert set(base_task["methods"]) == set(METHODS)
    chosen = base_task["methods"][base_task["method"]]
    assert chosen["hyperparams"] == base_task["hyperparams"]
    assert chosen["loo_accuracy"] == base_task["loo_accuracy"]
    assert chosen["loo_scored_shots"] == BASE_SHOTS * len(BASE_CLASSES)
    # The same task comes back from GET.
    assert api_client.get(f"/v1/tasks/{base_task['id']}").json() == base_task


def test_classify_one_image(api_client: TestClient, base_task: dict[str, Any], held_out: list[Shot]) -> None:
    path, _ = held_out[0]
    answer = classify(api_client, base_task["id"], [path], top_k=2)
    assert answer["task_id"] == base_task["id"]
    assert answer["task_version"] == 1
    assert answer["model"] == base_task["model"]
    [result] = answer["results"]
    assert result["filename"] == path.name
    assert_ranked(result, 2, set(BASE_CLASSES))
    assert result["label"] == result["top_k"][0]["label"]
    assert result["method"] == base_task["method"]
    assert result["model"] == base_task["model"]
    assert result["reason"] is None


def test_top_k_is_honoured(api_client: TestClient, base_task: dict[str, Any], held_out: list[Shot]) -> None:
    images = [p for p, _ in held_out[:2]]
    for top_k, expected in ((1, 1), (3, 3), (4, 4), (100, 4)):  # never more entries than classes
        answer = classify(api_client, base_task["id"], images, top_k=top_k)
        for result in answer["results"]:
            assert_ranked(result, expected, set(BASE_CLASSES))
    # Default top_k is 5: all four classes.
    answer = classify(api_client, base_task["id"], images)
    assert all(len(r["top_k"]) == 4 for r in answer["results"])


def test_classify_many_images_beats_chance(
    plain_answer: dict[str, Any], held_out: list[Shot], base_task: dict[str, Any]
) -> None:
    results = plain_answer["results"]
    assert len(results) == len(held_out) + 16
    assert [r["filename"] for r in results[: len(held_out)]] == [p.name for p, _ in held_out]
    for result in results:
        assert_ranked(result, len(BASE_CLASSES), set(BASE_CLASSES))
        # Every class listed: calibrated probabilities over the task's classes sum to one.
        assert math.isclose(sum(e["probability"] for e in result["top_k"]), 1.0, abs_tol=1e-6)
        assert result["method"] == base_task["method"]
    assert accuracy({"results": results[: len(held_out)]}, held_out) >= MIN_ACCURACY


def test_method_override(
    api_client: TestClient, base_task: dict[str, Any], held_out: list[Shot], plain_answer: dict[str, Any]
) -> None:
    images = held_out[::5]  # 8 images, two per class
    default = [r["top_k"] for r in plain_answer["results"][: len(held_out)][::5]]
    differs = set()
    for method in METHODS:
        answer = classify(api_client, base_task["id"], images, top_k=10, method=method)
        assert {r["method"] for r in answer["results"]} == {method}
        for result in answer["results"]:
            assert_ranked(result, len(BASE_CLASSES), set(BASE_CLASSES))
        if not same_rankings([r["top_k"] for r in answer["results"]], default):
            differs.add(method)
    # Another method really computes something else (the task's own method gives the same answer).
    assert differs == set(METHODS) - {base_task["method"]}


def test_auto_blends_the_two_best_held_out_methods(
    api_client: TestClient, base_shots: list[Shot], held_out: list[Shot]
) -> None:
    """From BLEND_FROM_SHOTS shots per class `auto` serves the ENSEMBLE of the two methods with the lowest
    calibrated cross-entropy on shared shot folds; its answer is the mean of their calibrated answers."""
    assert BASE_SHOTS >= BLEND_FROM_SHOTS  # else this task would not blend and the test would check nothing
    task = create_task(api_client, base_shots, method="auto")
    assert task["method_requested"] == "auto"
    assert task["method"] == ENSEMBLE
    assert set(task["methods"]) == {*METHODS, ENSEMBLE}
    scores = {name: m for name, m in task["methods"].items() if m["loo_nll"] is not None}
    assert scores, "auto needs leave-one-out scores"
    for m in scores.values():
        assert 0.0 <= m["loo_accuracy"] <= 1.0
        assert m["loo_nll"] >= 0.0
        assert m["temperature"] > 0.0
    # auto compares the service's own fitted methods on shared shot folds (cache_models.selection)
    # (a loaded task keeps only its served methods fitted, so tune them again as the build did: deterministic)
    service = api_client.app.state.service
    built = service.registry.cached(("public", task["id"]))
    tuned = fit_methods(built.supports, scale=service.encoder.logit_scale)
    held_out_scores = cross_method_scores(tuned)
    ranked = sorted(held_out_scores, key=lambda name: held_out_scores[name][0])
    ensemble = task["methods"][ENSEMBLE]
    assert ensemble["members"] == ranked[:2]
    # ... and says so: the ranking it chose from, the same numbers, best first
    selection = task["selection"]
    assert selection["rule"] == "blend"
    assert [r["method"] for r in selection["ranking"]] == ranked
    for r in selection["ranking"]:
        assert (r["fold_nll"], r["fold_accuracy"]) == pytest.approx(held_out_scores[r["method"]])
    assert selection["scored_shots"] == len(base_shots)
    assert selection["compared_classes"] == len(BASE_CLASSES)
    assert api_client.get(f"/v1/tasks/{task['id']}").json()["selection"] == selection
    assert ensemble["hyperparams"] == {}
    assert ensemble["loo_scored_shots"] == len(base_shots)  # every shot scored once on the folds
    assert task["loo_accuracy"] == ensemble["loo_accuracy"]
    assert task["loo"]["method"] == ENSEMBLE
    assert sum(c["scored"] for c in task["loo"]["classes"]) == len(base_shots)
    everything = len(BASE_CLASSES)
    answer = classify(api_client, task["id"], held_out[:4], top_k=everything)
    assert {r["method"] for r in answer["results"]} == {ENSEMBLE}
    members = [classify(api_client, task["id"], held_out[:4], top_k=everything, method=m) for m in ranked[:2]]
    for i, result in enumerate(answer["results"]):
        per_member = [{e["label"]: e["probability"] for e in m["results"][i]["top_k"]} for m in members]
        for entry in result["top_k"]:
            mean = (per_member[0][entry["label"]] + per_member[1][entry["label"]]) / 2
            assert entry["probability"] == pytest.approx(mean, abs=1e-6)
    assert per_member[0] != per_member[1]  # the members disagree, so the mean is a real check


def test_abstain(
    api_client: TestClient,
    base_task: dict[str, Any],
    held_out: list[Shot],
    foreign: list[Shot],
    plain_answer: dict[str, Any],
) -> None:
    threshold = base_task["methods"][base_task["method"]]["abstain_threshold"]
    assert threshold is not None
    assert 0.0 < threshold < 1.0
    answer = classify(api_client, base_task["id"], held_out + foreign, top_k=10, abstain="true")
    abstained = []
    for plain, result in zip(plain_answer["results"], answer["results"], strict=True):
        # Abstaining changes the label only; the probabilities are the same.
        assert [e["label"] for e in result["top_k"]] == [e["label"] for e in plain["top_k"]]
        for a, b in zip(result["top_k"], plain["top_k"], strict=True):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-6)
        top = result["top_k"][0]["probability"]
        if result["label"] is None:
            assert isinstance(result["reason"], str)
            assert "threshold" in result["reason"]
            assert top < threshold
            abstained.append(result["filename"])
        else:
            assert result["label"] == result["top_k"][0]["label"]
            assert top >= threshold
            assert result["reason"] is None
    # The threshold keeps most in-distribution answers and is not a no-op on these images.
    in_dist = {p.name for p, _ in held_out}
    assert sum(name in in_dist for name in abstained) <= len(held_out) // 2
    assert abstained, "nothing abstained: the threshold never triggers"
    # Without abstain=true the label is never null.
    assert all(r["label"] is not None and r["reason"] is None for r in plain_answer["results"])
