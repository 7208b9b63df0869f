"""Every documented bad input answers its 4xx as `{"error": {"code", "message"}}` naming the problem.

Requests with default limits go to the shared app; the size limits get an app of their own with small
limits. Every client here fails the test on any 5xx (see conftest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.app import hostile_images
from tests.app.hostile_images import HostileFile

from .conftest import Files, assert_error, cifar_images, create_task, files_of, labels_of, raw_files, running_app

TWO = ("cat", "dog")


@pytest.fixture(scope="module")
def shots() -> list[Any]:
    return cifar_images("train", TWO, 2)


# (form fields replacing the defaults, status, code, words the message must contain)
CREATE_FORM_ERRORS = [
    pytest.param(
        {"labels": ["cat", "cat", "dog"]}, 422, "labels_mismatch", ["4 images", "3 labels"], id="fewer-labels"
    ),
    pytest.param(
        {"labels": ["cat", "cat", "dog", "dog", "dog"]}, 422, "labels_mismatch", ["5 labels"], id="more-labels"
    ),
    pytest.param({"labels": ["cat"] * 4}, 422, "too_few_classes", ["2 classes"], id="one-class"),
    pytest.param({"labels": ["cat", "cat", "dog", ""]}, 422, "empty_label", ["label 3", "empty"], id="empty-label"),
    pytest.param({"labels": ["cat", "  ", "dog", "dog"]}, 422, "empty_label", ["label 1", "empty"], id="blank-label"),
    pytest.param({"labels": ["cat", "cat", "dog", "d" * 101]}, 422, "label_too_long", ["label 3"], id="long-label"),
    pytest.param({"method": "magic"}, 422, "unknown_method", ["magic", "tip-adapter"], id="unknown-method"),
    pytest.param({"views": "0"}, 422, "invalid_views", ["views", "0"], id="views-0"),
    pytest.param({"views": "33"}, 422, "invalid_views", ["views", "33"], id="views-33"),
    pytest.param({"views": "many"}, 422, "invalid_request", ["views", "integer"], id="views-not-a-number"),
    pytest.param({"templates": "[not json"}, 422, "invalid_json", ["templates", "JSON"], id="templates-bad-json"),
    pytest.param({"templates": '{"a": 1}'}, 422, "invalid_templates", ["templates", "list"], id="templates-not-a-list"),
    pytest.param(
        {"templates": '["no placeholder"]'}, 422, "invalid_templates", ["no placeholder", "{}"], id="templates-no-slot"
    ),
    pytest.param({"classes": "{cat:"}, 422, "invalid_json", ["classes", "JSON"], id="classes-bad-json"),
    pytest.param({"classes": '["cat"]'}, 422, "invalid_classes", ["classes"], id="classes-not-an-object"),
    pytest.param({"classes": '{"cat": [1]}'}, 422, "invalid_classes", ["cat", "strings"], id="classes-bad-prompt"),
    pytest.param(
        {"classes": '{"horse": ["a horse"]}'}, 422, "unknown_class_in_classes", ["horse"], id="classes-unknown-class"
    ),
    pytest.param({"hyperparams": "{alpha"}, 422, "invalid_json", ["hyperparams", "JSON"], id="hyperparams-bad-json"),
    pytest.param(
        {"method": "tip-adapter", "hyperparams": '{"alpha": "x"}'},
        422,
        "invalid_hyperparams",
        ["numbers"],
        id="hyperparams-not-numbers",
    ),
    pytest.param(
        {"hyperparams": '{"alpha": 1}'}, 422, "hyperparams_without_method", ["method"], id="hyperparams-without-method"
    ),
    pytest.param(
        {"method": "tip-adapter", "hyperparams": '{"bogus": 1}'},
        422,
        "invalid_hyperparams",
        ["bogus", "alpha"],
        id="unknown-hyperparam",
    ),
    pytest.param(
        {"method": "zero-shot", "hyperparams": '{"alpha": 1}'},
        422,
        "invalid_hyperparams",
        ["alpha"],
        id="hyperparam-of-another-method",
    ),
    pytest.param(
        {"method": "tip-adapter", "hyperparams": '{"alpha": -1}'},
        422,
        "invalid_hyperparams",
        ["alpha", "negative"],
        id="negative-hyperparam",
    ),
    pytest.param({"name": "n" * 201}, 422, "name_too_long", ["name"], id="long-name"),
    pytest.param({"wait": "perhaps"}, 422, "invalid_request", ["wait"], id="wait-not-a-bool"),
]


@pytest.mark.parametrize(("form", "status", "code", "mentions"), CREATE_FORM_ERRORS)
def test_create_form_errors(
    api_client: TestClient, shots: list[Any], form: dict[str, Any], status: int, code: str, mentions: list[str]
) -> None:
    before = len(api_client.get("/v1/tasks").json()["tasks"])
    response = api_client.post("/v1/tasks", files=files_of(shots), data={"labels": labels_of(shots), **form})
    assert_error(response, status, code, *mentions)
    assert len(api_client.get("/v1/tasks").json()["tasks"]) == before  # nothing half-made is left


def test_create_form_errors_also_refused_before_an_async_build(api_client: TestClient, shots: list[Any]) -> None:
    response = api_client.post(
        "/v1/tasks", files=files_of(shots), data={"labels": labels_of(shots), "method": "magic", "wait": "false"}
    )
    assert_error(response, 422, "unknown_method", "magic")
    assert api_client.get("/v1/tasks").json()["building"] == []


def test_missing_parts(api_client: TestClient, shots: list[Any]) -> None:
    assert_error(api_client.post("/v1/tasks", files=files_of(shots)), 422, "invalid_request", "labels")
    assert_error(api_client.post("/v1/tasks", data={"labels": labels_of(shots)}), 422, "invalid_request", "images")
    assert_error(
        api_client.post("/v1/tasks", content=b"{}", headers={"content-type": "application/json"}),
        422,
        "invalid_request",
    )


REFUSED_FILES = [f for f in hostile_images.all_hostile_files() if f.expected_status != 200]


@pytest.mark.parametrize("bad", REFUSED_FILES, ids=[f.name for f in REFUSED_FILES])
def test_hostile_file_in_create(api_client: TestClient, shots: list[Any], bad: HostileFile) -> None:
    """Not an image (415), too big in pixels (413), too small or corrupt/truncated (422): named in the message."""
    files: Files = files_of(shots[:-1]) + raw_files((bad.name, bad.data))
    response = api_client.post("/v1/tasks", files=files, data={"labels": labels_of(shots)})
    assert_error(response, bad.expected_status, bad.expected_code, bad.name)


@pytest.mark.parametrize(
    "bad",
    [
        hostile_images.truncated_jpeg(),
        hostile_images.svg(),
        hostile_images.html(),
        hostile_images.tiny_1x1(),
        hostile_images.png_bomb(),
    ],
    ids=lambda f: f.name,
)
def test_hostile_file_in_classify(api_client: TestClient, base_task: dict[str, Any], bad: HostileFile) -> None:
    good = cifar_images("test", ("cat",), 1)
    response = api_client.post(
        f"/v1/tasks/{base_task['id']}/classify", files=files_of(good) + raw_files((bad.name, bad.data))
    )
    assert_error(response, bad.expected_status, bad.expected_code, bad.name)


def test_text_file_is_unsupported(api_client: TestClient, base_task: dict[str, Any]) -> None:
    response = api_client.post(
        f"/v1/tasks/{base_task['id']}/classify",
        files=[("images", ("notes.txt", b"just some words\n" * 10, "text/plain"))],
    )
    assert_error(response, 415, "unsupported_format", "notes.txt", "JPEG")


def test_hostile_files_that_are_images_classify(api_client: TestClient, base_task: dict[str, Any]) -> None:
    """Awkward but valid images (polyglot, CMYK, 16-bit, palette, animated, EXIF-rotated, ...) are answered."""
    ok = [f for f in hostile_images.all_hostile_files() if f.expected_status == 200 and len(f.data) < 1_000_000]
    response = api_client.post(
        f"/v1/tasks/{base_task['id']}/classify", files=raw_files(*((f.name, f.data) for f in ok))
    )
    assert response.status_code == 200, response.text
    assert [r["filename"] for r in response.json()["results"]] == [f.name for f in ok]
    assert all(r["label"] in {c["name"] for c in base_task["classes"]} for r in response.json()["results"])


@pytest.mark.parametrize(
    ("form", "status", "code", "mentions"),
    [
        pytest.param({"top_k": "0"}, 422, "invalid_top_k", ["top_k", "0"], id="top_k-0"),
        pytest.param({"top_k": "-3"}, 422, "invalid_top_k", ["top_k"], id="top_k-negative"),
        pytest.param({"top_k": "101"}, 422, "invalid_top_k", ["top_k", "100"], id="top_k-over-max"),
        pytest.param({"top_k": "five"}, 422, "invalid_request", ["top_k"], id="top_k-not-a-number"),
        pytest.param({"method": "magic"}, 422, "unknown_method", ["magic", "tip-adapter"], id="unknown-method"),
        pytest.param(
            {"method": "auto"}, 422, "unknown_method", ["auto", "created", "tip-adapter"], id="auto-is-for-create"
        ),
        pytest.param({"abstain": "perhaps"}, 422, "invalid_request", ["abstain"], id="abstain-not-a-bool"),
    ],
)
def test_classify_form_errors(
    api_client: TestClient, base_task: dict[str, Any], form: dict[str, Any], status: int, code: str, mentions: list[str]
) -> None:
    image = cifar_images("test", ("cat",), 1)
    response = api_client.post(f"/v1/tasks/{base_task['id']}/classify", files=files_of(image), data=form)
    assert_error(response, status, code, *mentions)


def test_classify_without_images(api_client: TestClient, base_task: dict[str, Any]) -> None:
    assert_error(
        api_client.post(f"/v1/tasks/{base_task['id']}/classify", data={"top_k": "1"}), 422, "invalid_request", "images"
    )


def test_add_shots_form_errors(api_client: TestClient, base_task: dict[str, Any]) -> None:
    url = f"/v1/tasks/{base_task['id']}/shots"
    image = files_of(cifar_images("train", ("cat",), 1, skip=20))
    assert_error(
        api_client.post(url, files=image, data={"labels": ["cat", "dog"]}),
        422,
        "labels_mismatch",
        "1 images",
        "2 labels",
    )
    assert_error(api_client.post(url, files=image, data={"labels": [" "]}), 422, "empty_label", "empty")
    assert_error(
        api_client.post(url, files=image, data={"labels": ["cat"], "classes": "{"}), 422, "invalid_json", "classes"
    )
    assert api_client.get(f"/v1/tasks/{base_task['id']}").json()["version"] == 1


def test_unknown_task(api_client: TestClient) -> None:
    image = files_of(cifar_images("test", ("cat",), 1))
    missing = "0123456789abcdef0123456789abcdef"
    assert_error(api_client.get(f"/v1/tasks/{missing}"), 404, "task_not_found", missing)
    assert_error(api_client.delete(f"/v1/tasks/{missing}"), 404, "task_not_found", missing)
    assert_error(api_client.post(f"/v1/tasks/{missing}/classify", files=image), 404, "task_not_found", missing)
    assert_error(
        api_client.post(f"/v1/tasks/{missing}/shots", files=image, data={"labels": ["cat"]}), 404, "task_not_found"
    )
    for odd in ("..%2F..%2Fetc%2Fpasswd", "a" * 300, "%00"):
        assert_error(api_client.get(f"/v1/tasks/{odd}"), 404)
    assert_error(api_client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(api_client.put("/v1/tasks"), 405, "method_not_allowed")


# ---- size limits: an app with small ones ------------------------------------------------------------------------

MAX_FILE_BYTES = int(0.05 * 2**20)  # 52,428 bytes per file
MAX_REQUEST_BYTES = int(0.1 * 2**20)  # 104,857 bytes per request


@pytest.fixture(scope="module")
def small_limits(make_settings: Callable[..., Any]) -> Iterator[TestClient]:
    settings = make_settings(max_file_mb=0.05, max_request_mb=0.1, max_create_files=6, max_classify_files=2)
    with running_app(settings) as client:
        yield client


@pytest.fixture(scope="module")
def small_task(small_limits: TestClient, shots: list[Any]) -> dict[str, Any]:
    return create_task(small_limits, shots)


def _big_jpeg() -> bytes:
    data = hostile_images.large_jpeg_4000x3000().data
    assert len(data) > MAX_FILE_BYTES
    return data[: MAX_FILE_BYTES + 1000]  # over the per-file limit, under the request limit


def test_file_over_the_per_file_limit(small_limits: TestClient, small_task: dict[str, Any], shots: list[Any]) -> None:
    files = files_of(shots[:-1]) + raw_files(("big.jpg", _big_jpeg()))
    assert_error(
        small_limits.post("/v1/tasks", files=files, data={"labels": labels_of(shots)}),
        413,
        "file_too_large",
        "big.jpg",
        str(MAX_FILE_BYTES),
    )
    response = small_limits.post(f"/v1/tasks/{small_task['id']}/classify", files=raw_files(("big.jpg", _big_jpeg())))
    assert_error(response, 413, "file_too_large", "big.jpg")


def test_body_over_the_request_limit(small_limits: TestClient, shots: list[Any]) -> None:
    filler = raw_files(*((f"f{i}.jpg", bytes([i]) * 40_000) for i in range(3)))  # 120 kB of parts under the file limit
    files = files_of(shots) + filler
    response = small_limits.post("/v1/tasks", files=files, data={"labels": labels_of(shots)})
    assert_error(response, 413, "request_too_large", "0.1 MB", str(MAX_REQUEST_BYTES))
    # The same body streamed without a Content-Length is cut off while it arrives.
    request = small_limits.build_request("POST", "/v1/tasks", files=files, data={"labels": labels_of(shots)})
    body = request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    response = small_limits.post("/v1/tasks", content=chunks(), headers=headers)
    assert_error(response, 413, "request_too_large", str(MAX_REQUEST_BYTES))
    assert small_limits.get("/readyz").status_code == 200


def test_too_many_files(small_limits: TestClient, small_task: dict[str, Any]) -> None:
    seven = cifar_images("train", TWO, 4)[:7]
    response = small_limits.post("/v1/tasks", files=files_of(seven), data={"labels": labels_of(seven)})
    assert_error(response, 413, "too_many_files", "7 images", "6")
    response = small_limits.post(
        f"/v1/tasks/{small_task['id']}/shots", files=files_of(seven), data={"labels": labels_of(seven)}
    )
    assert_error(response, 413, "too_many_files", "7 images", "6")
    response = small_limits.post(f"/v1/tasks/{small_task['id']}/classify", files=files_of(seven[:3]))
    assert_error(response, 413, "too_many_files", "3 images", "2")
    # At the limits the same requests succeed.
    assert small_limits.post(f"/v1/tasks/{small_task['id']}/classify", files=files_of(seven[:2])).status_code == 200
