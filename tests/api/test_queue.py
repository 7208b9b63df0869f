"""The encoder queue waits for a batch only while a job is on its way (announced), never idly.

`max_wait_ms` is a minute here: a queue that waited when nobody was coming would not answer within the
10 s the tests allow, and one that did not wait for an announced job would encode it in a batch of its own.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from app.service.queue import EncoderQueue

MINUTE_MS = 60_000.0
DIM = 4


class RecordingEncoder:
    """Stands in for the encoder: returns each image's first pixel as its features, records batch sizes."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def encode_pixels(self, pixels: Any) -> Any:
        with self.lock:
            self.batches.append(int(pixels.shape[0]))
        return np.repeat(pixels[:, :1, 0, 0], DIM, axis=1).astype(np.float32)


def pixels(value: float, n: int = 1) -> Any:
    return np.full((n, 3, 2, 2), value, dtype=np.float32)


@pytest.fixture
def queue_and_encoder() -> Any:
    encoder = RecordingEncoder()
    queue = EncoderQueue(encoder, max_batch=2, max_wait_ms=MINUTE_MS)  # type: ignore[arg-type]
    queue.start()
    yield queue, encoder
    queue.stop()


def test_a_lone_job_is_encoded_without_waiting(queue_and_encoder: Any) -> None:
    queue, encoder = queue_and_encoder
    features = queue.submit(pixels(3.0)).result(timeout=10)
    np.testing.assert_array_equal(features, np.full((1, DIM), 3.0, dtype=np.float32))
    assert encoder.batches == [1]


def test_a_batch_waits_for_an_announced_job(queue_and_encoder: Any) -> None:
    queue, encoder = queue_and_encoder
    queue.announce()  # job B is being decoded
    first = queue.submit(pixels(1.0))  # job A: the worker takes it and waits for B
    second = queue.submit(pixels(2.0), announced=True)
    np.testing.assert_array_equal(first.result(timeout=10), np.full((1, DIM), 1.0, dtype=np.float32))
    np.testing.assert_array_equal(second.result(timeout=10), np.full((1, DIM), 2.0, dtype=np.float32))
    assert encoder.batches == [2]


def test_withdrawing_an_announced_job_releases_the_batch(queue_and_encoder: Any) -> None:
    queue, encoder = queue_and_encoder
    queue.announce()
    first = queue.submit(pixels(1.0))
    queue.withdraw()  # its decoding failed: nothing more is coming
    first.result(timeout=10)
    assert encoder.batches == [1]
    assert queue.submit(pixels(5.0)).result(timeout=10)[0, 0] == 5.0  # and the count went back to zero
    assert encoder.batches == [1, 1]
