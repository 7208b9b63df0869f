"""A typed Python client for the shotcache API (httpx, synchronous).

    from api.client import ShotcacheClient

    with ShotcacheClient("http://127.0.0.1:8000") as client:
        task = client.create_task(folder="photos/")            # one sub-folder per class
        answer = client.classify(task.id, ["query.jpg"], top_k=3)
        print(answer.results[0].label)

Answers are the API's own pydantic models (api/schemas.py). An error answer raises a `ShotcacheError`
subclass carrying the service's `code` and `message`; 429 and 503 are retried with exponential backoff,
waiting at least what `Retry-After` asks.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from app.evaluation.datasets import class_name, images_in

from .schemas import BuildOut, ClassifyOut, Info, TaskList, TaskOut

__all__ = [
    "BuildFailed",
    "Busy",
    "ClientConnectionError",
    "Conflict",
    "Forbidden",
    "ImageSource",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "Progress",
    "ServerError",
    "ShotcacheClient",
    "ShotcacheError",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMedia",
    "images_from_folder",
]

DEFAULT_URL = "http://127.0.0.1:8000"
# An image: a path, raw bytes, or (filename, bytes).
ImageSource = str | os.PathLike[str] | bytes | tuple[str, bytes]
# progress(stage, done, total): stage "upload" counts bytes sent, "build" counts shots encoded.
Progress = Callable[[str, int, int], None]
Model = TypeVar("Model", bound=BaseModel)
_CHUNK = 64 * 1024


class ShotcacheError(Exception):
    """An error answer of the service (or no answer: status 0)."""

    status = 0

    def __init__(self, code: str, message: str, *, status: int | None = None, retry_after: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        if status is not None:
            self.status = status
        self.retry_after = retry_after


class ClientConnectionError(ShotcacheError):
    """The service did not answer (refused, reset, timed out)."""


class InvalidRequest(ShotcacheError):  # noqa: N818 (named after the HTTP answer)
    """400 or 422: a malformed request, a corrupt image, labels that do not match the images, ..."""


class Unauthorized(ShotcacheError):  # noqa: N818 (named after the HTTP answer)
    status = 401


class Forbidden(ShotcacheError):  # noqa: N818 (named after the HTTP answer)
    status = 403


class NotFound(ShotcacheError):  # noqa: N818 (named after the HTTP answer)
    status = 404


class Conflict(ShotcacheError):  # noqa: N818 (named after the HTTP answer)
    """409: the task is still building, or was built with another model."""

    status = 409


class PayloadTooLarge(ShotcacheError):  # noqa: N818 (named after the HTTP answer)
    status = 413


class UnsupportedMedia(ShotcacheError):  # noqa: N818 (named after the HTTP answer)
    status = 415


class Busy(ShotcacheError):  # noqa: N818 (named after the HTTP answer)
    """429, after the retries ran out."""

    status = 429


class Unavailable(ShotcacheError):  # noqa: N818 (named after the HTTP answer)
    """503 (starting), after the retries ran out."""

    status = 503


class ServerError(ShotcacheError):
    status = 500


class BuildFailed(ShotcacheError):  # noqa: N818 (named after the HTTP answer)
    """A background build (`wait=False`) ended with this error; `status` is the one the service gave."""


_BY_STATUS: dict[int, type[ShotcacheError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMedia,
    422: InvalidRequest,
    429: Busy,
    503: Unavailable,
}
_RETRIED = frozenset({429, 503})


class Unset:
    """An argument not given (where None means something: `update_task(name=None)` clears the name)."""


UNSET = Unset()


def error_from(response: httpx.Response) -> ShotcacheError:
    """The typed exception for an error answer, with the service's code and message."""
    code, message = "http_error", f"HTTP {response.status_code}"
    try:
        body = response.json()
        code, message = str(body["error"]["code"]), str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}: {response.text[:200]}"
    cls = _BY_STATUS.get(response.status_code, ServerError if response.status_code >= 500 else ShotcacheError)
    return cls(code, message, status=response.status_code, retry_after=_retry_after(response))


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def images_from_folder(folder: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """`folder/<class>/<image>` -> {class: [images]}: one sub-folder per class, as `shotcache eval` reads."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    out = {class_name(sub.name): images_in(sub) for sub in sorted(root.iterdir()) if sub.is_dir()}
    out = {name: paths for name, paths in out.items() if paths}
    if not out:
        raise ValueError(f"{root} has no sub-folder with images (one sub-folder per class)")
    return out


def _part(image: ImageSource, index: int) -> tuple[str, tuple[str, bytes, str]]:
    if isinstance(image, bytes):
        return "images", (f"image-{index}", image, "application/octet-stream")
    if isinstance(image, tuple):
        name, data = image
        return "images", (name, data, "application/octet-stream")
    path = Path(image)
    return "images", (path.name, path.read_bytes(), "application/octet-stream")


class ShotcacheClient:
    """One connection pool to one service. `retries` extra attempts on 429/503, backing off from `backoff`
    seconds (doubling, at most `max_backoff`, at least the answer's Retry-After)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 300.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sleep: Callable[[float], None] = time.sleep

    # ---- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ShotcacheClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _send(
        self,
        method: str,
        path: str,
        *,
        files: list[tuple[str, tuple[str, bytes, str]]] | None = None,
        data: Mapping[str, Any] | None = None,
        json_body: Mapping[str, Any] | None = None,
        progress: Progress | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> httpx.Response:
        body: bytes | None = None
        headers: dict[str, str] = {}
        if files is not None:
            built = self._http.build_request(method, path, files=files, data=data)
            body = built.read()
            headers = {"content-type": built.headers["content-type"], "content-length": str(len(body))}
        elif json_body is not None:
            body = json.dumps(dict(json_body)).encode()
            headers = {"content-type": "application/json", "content-length": str(len(body))}
        for attempt in range(self.retries + 1):
            content = None if body is None else self._chunks(body, progress)
            try:
                response = self._http.request(method, path, content=content, headers=headers)
            except httpx.TransportError as exc:
                raise ClientConnectionError("connection_error", f"{method} {self._http.base_url}{path}: {exc}") from exc
            if response.status_code in ok:
                return response
            error = error_from(response)
            if response.status_code not in _RETRIED or attempt == self.retries:
                raise error
            wait = min(self.max_backoff, self.backoff * 2**attempt)
            self.sleep(max(wait, error.retry_after or 0.0))
        raise AssertionError("unreachable")

    @staticmethod
    def _chunks(body: bytes, progress: Progress | None) -> Iterator[bytes]:
        for start in range(0, len(body), _CHUNK):
            chunk = body[start : start + _CHUNK]
            yield chunk
            if progress is not None:
                progress("upload", start + len(chunk), len(body))

    def _get(self, path: str, model: type[Model]) -> Model:
        return model.model_validate(self._send("GET", path).json())

    # ---- the API -------------------------------------------------------------------------------
    def info(self) -> Info:
        return self._get("/v1/info", Info)

    def list_tasks(self) -> TaskList:
        return self._get("/v1/tasks", TaskList)

    def get_task(self, task_id: str) -> TaskOut | BuildOut:
        """The task, or its build's progress while it builds in the background; a failed build raises
        `BuildFailed` with its error."""
        response = self._send("GET", f"/v1/tasks/{task_id}", ok=(200, 202))
        if response.status_code == 202:
            return BuildOut.model_validate(response.json())
        return TaskOut.model_validate(response.json())

    def wait_ready(
        self, task_id: str, *, progress: Progress | None = None, poll: float = 0.5, timeout: float | None = None
    ) -> TaskOut:
        """Poll a background build until the task is ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                state = self.get_task(task_id)
            except ShotcacheError as exc:
                if exc.status in (404, 409, 401, 403) or isinstance(exc, ClientConnectionError):
                    raise
                raise BuildFailed(exc.code, exc.message, status=exc.status) from exc
            if isinstance(state, TaskOut):
                return state
            if progress is not None:
                progress("build", state.done, state.total)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} still building after {timeout} s ({state.done}/{state.total})")
            self.sleep(poll)

    def create_task(
        self,
        images_by_class: Mapping[str, Sequence[ImageSource]] | None = None,
        *,
        folder: str | os.PathLike[str] | None = None,
        name: str | None = None,
        method: str | None = None,
        views: int | None = None,
        prompts: Mapping[str, Sequence[str]] | None = None,
        templates: Sequence[str] | None = None,
        hyperparams: Mapping[str, float] | None = None,
        wait: bool = True,
        progress: Progress | None = None,
    ) -> TaskOut | BuildOut:
        """Create a task from {class: images} or a folder with one sub-folder per class.

        A task made from a folder is named after it unless `name` is given (`photos/` -> "photos").
        `wait=True` returns the ready task (with `progress`, the build runs in the background and its
        progress is reported while polling); `wait=False` returns the build's first status at once.
        """
        shots = self._shots(images_by_class, folder)
        if name is None and folder is not None:
            name = Path(folder).resolve().name
        background = not wait or progress is not None
        data: dict[str, Any] = {"labels": [label for label, _ in shots], "wait": "false" if background else "true"}
        optional = {"name": name, "method": method, "views": views}
        data.update({key: value for key, value in optional.items() if value is not None})
        if prompts:
            data["classes"] = json.dumps({label: list(texts) for label, texts in prompts.items()})
        if templates is not None:
            data["templates"] = json.dumps(list(templates))
        if hyperparams is not None:
            data["hyperparams"] = json.dumps(dict(hyperparams))
        files = [_part(image, i) for i, (_, image) in enumerate(shots)]
        response = self._send("POST", "/v1/tasks", files=files, data=data, progress=progress, ok=(201, 202))
        if response.status_code == 201:
            return TaskOut.model_validate(response.json())
        build = BuildOut.model_validate(response.json())
        if not wait:
            return build
        return self.wait_ready(build.id, progress=progress)

    def add_shots(
        self,
        task_id: str,
        images_by_class: Mapping[str, Sequence[ImageSource]] | None = None,
        *,
        folder: str | os.PathLike[str] | None = None,
        prompts: Mapping[str, Sequence[str]] | None = None,
        progress: Progress | None = None,
    ) -> TaskOut:
        """Add shots (and new classes); the task re-tunes and its version goes up."""
        shots = self._shots(images_by_class, folder)
        data: dict[str, Any] = {"labels": [label for label, _ in shots]}
        if prompts:
            data["classes"] = json.dumps({label: list(texts) for label, texts in prompts.items()})
        files = [_part(image, i) for i, (_, image) in enumerate(shots)]
        response = self._send("POST", f"/v1/tasks/{task_id}/shots", files=files, data=data, progress=progress)
        return TaskOut.model_validate(response.json())

    def update_task(self, task_id: str, *, method: str | None = None, name: str | Unset | None = UNSET) -> TaskOut:
        """Serve another method (a name or "auto", chosen again from the stored shots: nothing is uploaded or
        re-encoded) and/or rename the task (`name=None` clears the name); its version goes up."""
        body: dict[str, Any] = {} if method is None else {"method": method}
        if not isinstance(name, Unset):
            body["name"] = name
        response = self._send("PATCH", f"/v1/tasks/{task_id}", json_body=body)
        return TaskOut.model_validate(response.json())

    def classify(
        self,
        task_id: str,
        images: Sequence[ImageSource] | ImageSource,
        *,
        top_k: int = 5,
        method: str | None = None,
        abstain: bool = False,
        evidence: int | None = None,
        progress: Progress | None = None,
    ) -> ClassifyOut:
        """Classify one image or many; `evidence=k` also returns each image's k nearest shots."""
        batch: Sequence[ImageSource] = [images] if isinstance(images, str | bytes | tuple | os.PathLike) else images
        data: dict[str, Any] = {"top_k": str(top_k), "abstain": "true" if abstain else "false"}
        if method is not None:
            data["method"] = method
        if evidence is not None:
            data["evidence"] = str(evidence)
        files = [_part(image, i) for i, image in enumerate(batch)]
        response = self._send("POST", f"/v1/tasks/{task_id}/classify", files=files, data=data, progress=progress)
        return ClassifyOut.model_validate(response.json())

    def delete_task(self, task_id: str) -> None:
        self._send("DELETE", f"/v1/tasks/{task_id}", ok=(204,))

    def thumbnail(self, task_id: str, shot: int) -> bytes:
        """A stored shot's thumbnail (JPEG)."""
        return self._send("GET", f"/v1/tasks/{task_id}/shots/{shot}/thumbnail").content

    @staticmethod
    def _shots(
        images_by_class: Mapping[str, Sequence[ImageSource]] | None, folder: str | os.PathLike[str] | None
    ) -> list[tuple[str, ImageSource]]:
        if (images_by_class is None) == (folder is None):
            raise TypeError("give exactly one of images_by_class and folder")
        source: Mapping[str, Sequence[ImageSource]] = (
            images_by_class if images_by_class is not None else images_from_folder(folder)  # type: ignore[arg-type]
        )
        shots = [(label, image) for label, images in source.items() for image in images]
        if not shots:
            raise ValueError("no images given")
        return shots
