"""POST /v1/tasks/{id}/classify with one image as the raw body (Content-Type image/*, options as query
parameters): the same answer as the multipart form, the same checks, JSON errors."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from .conftest import BASE_CLASSES, Shot, assert_error, cifar_images, classify, create_task, running_app

MAX_FILE_BYTES = int(0.05 * 2**20)


@pytest.fixture(scope="module")
def probes() -> list[Shot]:
    return cifar_images("test", BASE_CLASSES, 1)


def raw_classify(client: TestClient, task_id: str, data: bytes, content_type: str, **params: Any) -> Any:
    return client.post(
        f"/v1/tasks/{task_id}/classify", content=data, headers={"Content-Type": content_type}, params=params
    )


@pytest.mark.parametrize(
    "options",
    [{}, {"top_k": 2, "method": "zero-shot"}, {"abstain": True, "evidence": 3}],
    ids=["defaults", "top_k+method", "abstain+evidence"],
)
def test_raw_body_answers_as_the_multipart_form(
    api_client: TestClient, base_task: dict[str, Any], probes: list[Shot], options: dict[str, Any]
) -> None:
    for path, _ in probes:
        form = classify(api_client, base_task["id"], [path], **options)
        response = raw_classify(api_client, base_task["id"], path.read_bytes(), "image/jpeg", **options)
        assert response.status_code == 200, response.text
        raw = response.json()
        assert raw["results"][0].pop("filename") is None
        assert form["results"][0].pop("filename") == path.name
        assert raw == form


def test_content_type_parameters_and_case_are_ignored(
    api_client: TestClient, base_task: dict[str, Any], probes: list[Shot]
) -> None:
    data = probes[0][0].read_bytes()
    response = raw_classify(api_client, base_task["id"], data, "Image/JPEG; charset=binary", top_k=1)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"][0]["top_k"]) == 1


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/octet-stream", "image/svg+xml", "application/json"]
)
def test_a_non_image_content_type_is_415(
    api_client: TestClient, base_task: dict[str, Any], probes: list[Shot], content_type: str
) -> None:
    response = raw_classify(api_client, base_task["id"], probes[0][0].read_bytes(), content_type)
    assert_error(response, 415, "unsupported_format", content_type, "multipart/form-data", "image/jpeg")


def test_no_body_and_no_content_type_is_415(api_client: TestClient, base_task: dict[str, Any]) -> None:
    assert_error(api_client.post(f"/v1/tasks/{base_task['id']}/classify"), 415, "unsupported_format", "(none)")


def test_bytes_that_are_not_the_image_format_are_checked_by_the_service(
    api_client: TestClient, base_task: dict[str, Any]
) -> None:
    response = raw_classify(api_client, base_task["id"], b"%PDF-1.4 not an image", "image/png")
    assert_error(response, 415, "unsupported_format")
    assert_error(raw_classify(api_client, base_task["id"], b"", "image/webp"), 422, "empty_file")


def test_bad_options_are_checked_as_for_the_form(
    api_client: TestClient, base_task: dict[str, Any], probes: list[Shot]
) -> None:
    data = probes[0][0].read_bytes()
    form = api_client.post(
        f"/v1/tasks/{base_task['id']}/classify",
        files=[("images", ("x.jpg", data, "image/jpeg"))],
        data={"method": "no-such-method"},
    )
    raw = raw_classify(api_client, base_task["id"], data, "image/jpeg", method="no-such-method")
    assert raw.status_code == form.status_code
    assert raw.json() == form.json()
    assert_error(raw_classify(api_client, base_task["id"], data, "image/jpeg", top_k="many"), 422)


@pytest.mark.parametrize(("name", "value"), [("top_k", "many"), ("abstain", "maybe"), ("evidence", "1.5")])
def test_an_unparseable_option_is_422_naming_it(
    api_client: TestClient, base_task: dict[str, Any], probes: list[Shot], name: str, value: str
) -> None:
    data = probes[0][0].read_bytes()
    response = raw_classify(api_client, base_task["id"], data, "image/jpeg", **{name: value})
    message = assert_error(response, 422, "invalid_request", name)["message"]
    assert message.startswith(f"{name}: "), message  # as FastAPI words a query parameter's error


def test_options_parse_as_query_parameters_do(
    api_client: TestClient, base_task: dict[str, Any], probes: list[Shot]
) -> None:
    data = probes[0][0].read_bytes()
    for truthy in ("true", "1", "yes", "on"):
        response = raw_classify(api_client, base_task["id"], data, "image/jpeg", abstain=truthy, top_k="2")
        assert response.status_code == 200, response.text
        assert len(response.json()["results"][0]["top_k"]) == 2
    unknown = raw_classify(api_client, base_task["id"], data, "image/jpeg", colour="blue")
    assert unknown.status_code == 200, unknown.text  # an unknown parameter is ignored, as FastAPI ignores it


def test_other_methods_on_the_path_are_405(api_client: TestClient, base_task: dict[str, Any]) -> None:
    for method in ("GET", "PUT"):
        response = api_client.request(
            method, f"/v1/tasks/{base_task['id']}/classify", headers={"Content-Type": "image/jpeg"}
        )
        assert_error(response, 405, "method_not_allowed")
        assert response.headers["allow"] == "POST"


def _classify_count(client: TestClient) -> float:
    pattern = (
        r'^shotcache_http_requests_total\{method="POST",route="/v1/tasks/\{task_id\}/classify",status="200"\} (\S+)$'
    )
    match = re.search(pattern, client.get("/metrics").text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_label_the_raw_body_by_the_route_template(
    api_client: TestClient, base_task: dict[str, Any], probes: list[Shot]
) -> None:
    before = _classify_count(api_client)
    response = raw_classify(api_client, base_task["id"], probes[0][0].read_bytes(), "image/jpeg")
    assert response.status_code == 200, response.text
    assert _classify_count(api_client) == before + 1
    assert base_task["id"] not in api_client.get("/metrics").text


def test_unknown_task_is_404(api_client: TestClient, probes: list[Shot]) -> None:
    assert_error(raw_classify(api_client, "no-such-task", probes[0][0].read_bytes(), "image/jpeg"), 404)


@pytest.fixture(scope="module")
def small_limits(make_settings: Callable[..., Any]) -> Iterator[TestClient]:
    with running_app(make_settings(max_file_mb=0.05, max_request_mb=0.1)) as client:
        yield client


def test_a_body_over_the_per_file_limit_is_413(small_limits: TestClient) -> None:
    shots = cifar_images("train", BASE_CLASSES[:2], 2)
    task = create_task(small_limits, shots)
    big = b"\xff\xd8\xff" + bytes(MAX_FILE_BYTES)  # over the per-file limit, under the request limit
    assert_error(raw_classify(small_limits, task["id"], big, "image/jpeg"), 413, "file_too_large", str(MAX_FILE_BYTES))

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused while streaming
        yield big[: len(big) // 2]
        yield big[len(big) // 2 :]

    response = small_limits.post(
        f"/v1/tasks/{task['id']}/classify", content=chunks(), headers={"Content-Type": "image/jpeg"}
    )
    assert_error(response, 413, "file_too_large")


def test_openapi_documents_both_bodies_on_one_operation(api_client: TestClient) -> None:
    operation = api_client.get("/openapi.json").json()["paths"]["/v1/tasks/{task_id}/classify"]["post"]
    content = operation["requestBody"]["content"]
    assert {"multipart/form-data", "image/jpeg", "image/png", "image/webp"} <= set(content)
    query = {p["name"] for p in operation["parameters"] if p["in"] == "query"}
    assert query == {"top_k", "method", "abstain", "evidence"}
    assert "415" in operation["responses"]
    assert "413" in operation["responses"]
