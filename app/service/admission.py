"""Admission: the one place that decides whether work may start, and the one place 429s come from.

Like text-embeddings-inference's `Infer`, which holds the permits in front of its queue, the service
takes a permit before it holds a request's memory or CPU:

- a build permit for every task create / shot addition, running or waiting (uploads waiting to be built
  hold memory, so their number is bounded by `max_pending_builds`);
- classify permits counted in images, from admission until the answer is computed (decode, encode,
  cache math), bounded by `queue_size`.

Past either bound the request gets `Busy` with a Retry-After estimate; nothing else in the service
raises it (the encoder queue admits whatever it is given).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

from app.errors import Busy

from . import metrics

BUILD_RETRY_AFTER = 5.0  # seconds: a small build takes a few


class Permit:
    """Held while admitted work runs; `release` (or leaving the `with`) gives it back, once."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()


class Admission:
    def __init__(self, *, max_builds: int, max_classify_images: int, images_per_second: Callable[[], float]) -> None:
        self.max_builds = max_builds
        self.max_classify_images = max_classify_images
        self._images_per_second = images_per_second
        self._lock = threading.Lock()
        self._builds = 0
        self._images = 0

    @property
    def pending_builds(self) -> int:
        return self._builds

    @property
    def pending_images(self) -> int:
        return self._images

    def build(self) -> Permit:
        """A permit for one task build; Busy when `max_builds` are running or waiting."""
        with self._lock:
            if self._builds >= self.max_builds:
                raise Busy(
                    f"{self._builds} task builds are already running or waiting (limit {self.max_builds}); "
                    "retry shortly",
                    retry_after=BUILD_RETRY_AFTER,
                )
            self._builds += 1
            metrics.BUILDS_PENDING.set(self._builds)
        return Permit(self._end_build)

    def _end_build(self) -> None:
        with self._lock:
            self._builds -= 1
            metrics.BUILDS_PENDING.set(self._builds)

    def classify(self, images: int) -> Permit:
        """A permit for classifying `images` images; Busy when the admitted images would exceed the bound."""
        with self._lock:
            if self._images + images > self.max_classify_images:
                retry = max(1.0, round(self._images / max(self._images_per_second(), 1e-3), 1))
                metrics.QUEUE_REJECTED.inc()
                raise Busy(
                    f"the encoder queue is full ({self._images} images waiting, capacity "
                    f"{self.max_classify_images}); retry in about {retry:.0f} s",
                    retry_after=retry,
                )
            self._images += images
            metrics.QUEUE_IMAGES.set(self._images)
        return Permit(lambda: self._end_classify(images))

    def _end_classify(self, images: int) -> None:
        with self._lock:
            self._images -= images
            metrics.QUEUE_IMAGES.set(self._images)
