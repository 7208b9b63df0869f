"""The encoder queue waits for a batch only while a job is on its way (announced), never idly.

`max_wait_ms` is a minute here: a queue that waited when nobody was coming would not answer within the
10 s the tests allow, and one that did not wait for an announced job would encode it in a batch of its own.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from app.service.queue import CONCURRENCY_WINDOW_S, FILL_WAIT_FRACTION, EncoderQueue

MINUTE_MS = 60_000.0
MINUTES_S = 600.0  # a fill wait bound no test outlives
DIM = 4


class RecordingEncoder:
    """Stands in for the encoder: returns each image's first pixel value as its features, records batch sizes."""

    input_size = 2  # the crops' side (the queue checks what it is given)

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def encode_crops(self, crops: Any) -> Any:
        with self.lock:
            self.batches.append(int(crops.shape[0]))
        return np.repeat(crops[:, 0, 0, :1], DIM, axis=1).astype(np.float32)


def pixels(value: int, n: int = 1) -> Any:
    """`n` uint8 crops of one value (2 x 2 RGB)."""
    return np.full((n, 2, 2, 3), value, dtype=np.uint8)


@pytest.fixture
def queue_and_encoder() -> Any:
    encoder = RecordingEncoder()
    queue = EncoderQueue(encoder, max_batch=2, max_wait_ms=MINUTE_MS)  # type: ignore[arg-type]
    queue.start()
    yield queue, encoder
    queue.stop()


def test_a_lone_job_is_encoded_without_waiting(queue_and_encoder: Any) -> None:
    queue, encoder = queue_and_encoder
    features = queue.submit(pixels(3)).result(timeout=10)
    np.testing.assert_array_equal(features, np.full((1, DIM), 3.0, dtype=np.float32))
    assert encoder.batches == [1]


def test_a_batch_waits_for_an_announced_job(queue_and_encoder: Any) -> None:
    queue, encoder = queue_and_encoder
    queue.announce()  # job B is being decoded
    first = queue.submit(pixels(1))  # job A: the worker takes it and waits for B
    second = queue.submit(pixels(2), announced=True)
    np.testing.assert_array_equal(first.result(timeout=10), np.full((1, DIM), 1.0, dtype=np.float32))
    np.testing.assert_array_equal(second.result(timeout=10), np.full((1, DIM), 2.0, dtype=np.float32))
    assert encoder.batches == [2]


def test_withdrawing_an_announced_job_releases_the_batch(queue_and_encoder: Any) -> None:
    queue, encoder = queue_and_encoder
    queue.announce()
    first = queue.submit(pixels(1))
    queue.withdraw()  # its decoding failed: nothing more is coming
    first.result(timeout=10)
    assert encoder.batches == [1]
    assert queue.submit(pixels(5)).result(timeout=10)[0, 0] == 5.0  # and the count went back to zero
    assert encoder.batches == [1, 1]


# ---- uint8 crops: a lone job's as they are, several jobs' in the worker's reused buffer ------------------
MEAN = (0.48, 0.46, 0.41)
STD = (0.27, 0.26, 0.28)


class CropsEncoder(RecordingEncoder):
    """Also keeps a copy of every batch of crops it was given (the queue reuses its buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    def encode_crops(self, crops: Any) -> Any:
        self.seen.append(np.array(crops, copy=True))
        return super().encode_crops(crops)


def preprocessor(size: int = 2) -> Any:
    from app.encoder.load import PreprocessConfig
    from app.encoder.preprocess import Preprocessor

    return Preprocessor(
        PreprocessConfig(size=size, mean=MEAN, std=STD, interpolation="bicubic", resize_mode="shortest")
    )


def crops(seed: int, n: int = 1, size: int = 2) -> Any:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def by_hand(batch: Any) -> Any:
    """torchvision's ToTensor + Normalize, written out: (x / 255 - mean) / std, channels first."""
    mean = np.asarray(MEAN, dtype=np.float64).reshape(1, 3, 1, 1)
    std = np.asarray(STD, dtype=np.float64).reshape(1, 3, 1, 1)
    return (batch.transpose(0, 3, 1, 2) / 255.0 - mean) / std


@pytest.fixture
def crops_queue() -> Any:
    encoder = CropsEncoder()
    queue = EncoderQueue(encoder, max_batch=4, max_wait_ms=MINUTE_MS)  # type: ignore[arg-type]
    queue.start()
    yield queue, encoder
    queue.stop()


def test_a_lone_jobs_crops_reach_the_encoder_as_they_are(crops_queue: Any) -> None:
    queue, encoder = crops_queue
    a = crops(1)
    features = queue.submit(a).result(timeout=10)
    np.testing.assert_array_equal(encoder.seen[0], a)
    np.testing.assert_array_equal(features[:, 0], a[:, 0, 0, 0])


def test_a_batch_of_jobs_gives_each_job_its_own_rows(crops_queue: Any) -> None:
    queue, encoder = crops_queue
    a, b = crops(2, n=2), crops(3)
    queue.announce()
    queue.announce()
    first = queue.submit(a)
    second = queue.submit(pixels(7), announced=True)
    third = queue.submit(b, announced=True)
    got = [f.result(timeout=10) for f in (first, second, third)]
    assert encoder.batches == [4]
    want = np.concatenate([a, pixels(7), b])
    np.testing.assert_array_equal(encoder.seen[0], want)
    assert [g.shape[0] for g in got] == [2, 1, 1]
    np.testing.assert_array_equal(got[0][:, 0], a[:, 0, 0, 0])
    np.testing.assert_array_equal(got[1], np.full((1, DIM), 7.0, dtype=np.float32))
    np.testing.assert_array_equal(got[2][:, 0], b[:, 0, 0, 0])
    # The buffer is reused: a later batch of two jobs sees only its own crops.
    c, d = crops(4), crops(5)
    queue.announce()
    first = queue.submit(c)
    queue.submit(d, announced=True).result(timeout=10)
    first.result(timeout=10)
    np.testing.assert_array_equal(encoder.seen[1], np.concatenate([c, d]))


def test_a_job_bigger_than_the_buffer_is_encoded_whole(crops_queue: Any) -> None:
    queue, encoder = crops_queue
    big = crops(5, n=6)  # max_batch is 4
    assert queue.submit(big).result(timeout=10).shape == (6, DIM)
    np.testing.assert_array_equal(encoder.seen[0], big)


def test_the_queue_refuses_what_is_not_uint8_crops(queue_and_encoder: Any) -> None:
    queue, _ = queue_and_encoder
    with pytest.raises(ValueError, match=r"crops must be uint8 \[n, 2, 2, 3\]"):
        queue.submit(np.zeros((1, 3, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="crops must be uint8"):
        queue.submit(np.zeros((1, 2, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"got uint8 \[1, 3, 3, 3\]"):  # another size: it would break a batch
        queue.submit(np.zeros((1, 3, 3, 3), dtype=np.uint8))


def test_normalised_input_gives_a_float_tower_torchvisions_pixels() -> None:
    from app.encoder.backends.crops import NormalisedInput

    seen: list[Any] = []

    class FloatTower:
        name = "float"

        def __call__(self, pixels: Any) -> Any:
            seen.append(np.array(pixels, copy=True))
            return pixels[:, :, 0, 0]

    tower = NormalisedInput(FloatTower(), preprocessor())
    big, small = crops(8, n=3), crops(9, n=1)
    tower(big)
    tower(small)  # into the same buffer, only its own rows
    np.testing.assert_allclose(seen[0], by_hand(big), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(seen[1], by_hand(small), rtol=1e-6, atol=1e-6)
    assert tower.name == "float"
    assert tower.precision == "fp32"


def test_eval_pixels_is_normalised_eval_crops() -> None:
    from PIL import Image

    image = Image.fromarray(crops(7, size=9)[0])
    prep = preprocessor(size=4)
    cropped = prep.eval_crops([image])
    assert cropped.dtype == np.uint8
    assert cropped.shape == (1, 4, 4, 3)
    np.testing.assert_array_equal(cropped[0], np.asarray(prep.eval_crop(image)))
    np.testing.assert_allclose(prep.eval_pixels([image]), by_hand(cropped), rtol=1e-6, atol=1e-6)


# ---- the concurrency-aware fill wait ------------------------------------------------------------
class SteppedClock:
    """Real monotonic time plus an offset the fake encoder moves: each encoder call 'takes' `call_s`
    on this clock, whatever it takes on the wall clock, so the fill wait's bound is known exactly."""

    def __init__(self, call_s: float) -> None:
        self.call_s = call_s
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


class GatedEncoder(RecordingEncoder):
    """Records batches; each call first waits for `gate` (when set up), then moves the clock on."""

    def __init__(self, clock: SteppedClock) -> None:
        super().__init__()
        self.clock = clock
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def encode_crops(self, crops: Any) -> Any:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(timeout=10)
        self.clock.offset += self.clock.call_s
        return super().encode_crops(crops)


def fill_queue(call_s: float, cap_s: float, max_batch: int = 8) -> tuple[EncoderQueue, GatedEncoder]:
    clock = SteppedClock(call_s)
    encoder = GatedEncoder(clock)
    queue = EncoderQueue(
        encoder,  # type: ignore[arg-type]
        max_batch=max_batch,
        max_wait_ms=0.0,
        fill_wait_cap_s=cap_s,
        clock=clock,
    )
    queue.start()
    return queue, encoder


def four_in_flight(queue: EncoderQueue, encoder: GatedEncoder) -> list[Any]:
    """One job in the (gated) encoder and three queued behind it: recent concurrency 4. Releases the gate
    once they are queued and returns the three queued jobs' futures."""
    encoder.gate = threading.Event()
    queue.submit(pixels(0.0))
    assert encoder.entered.wait(timeout=10)
    queued = [queue.submit(pixels(float(i))) for i in (1, 2, 3)]
    assert queue.recent_concurrency() == 4
    encoder.gate.set()
    return queued


def test_the_fill_wait_bound_is_a_capped_fraction_of_the_last_call() -> None:
    for call_s, cap_s, bound in ((0.01, 0.030, FILL_WAIT_FRACTION * 0.01), (5.0, 0.030, 0.030), (5.0, 0.0, 0.0)):
        queue, _ = fill_queue(call_s, cap_s)
        try:
            assert queue.fill_wait_bound_s == 0.0  # no call measured yet: the first batch never waits
            queue.submit(pixels(1)).result(timeout=10)
            # the call took `call_s` on the queue's clock plus the fake's real microseconds
            assert queue.fill_wait_bound_s == pytest.approx(bound, abs=1e-3)
            assert queue.fill_wait_bound_s <= cap_s
        finally:
            queue.stop()


def test_jobs_arriving_during_the_fill_wait_join_the_batch() -> None:
    queue, encoder = fill_queue(call_s=MINUTES_S, cap_s=MINUTES_S)  # a bound of minutes: only arrivals end it
    try:
        queued = four_in_flight(queue, encoder)
        time.sleep(0.2)  # the worker has the three and waits for a fourth (recent concurrency 4)
        assert not any(future.done() for future in queued)
        last = queue.submit(pixels(4.0))
        for i, future in enumerate([*queued, last], start=1):
            assert future.result(timeout=10)[0, 0] == float(i)
        assert encoder.batches == [1, 4]
    finally:
        queue.stop()


def test_build_chunks_neither_count_as_concurrency_nor_wait_to_be_filled() -> None:
    # bound of minutes: a bulk batch that waited, or a classify that waited for bulk "concurrency", would
    # not answer within the 10 s allowed
    queue, encoder = fill_queue(call_s=MINUTES_S, cap_s=MINUTES_S)
    try:
        encoder.gate = threading.Event()
        first = queue.submit(pixels(0.0), bulk=True)
        assert encoder.entered.wait(timeout=10)
        chunks = [queue.submit(pixels(float(i)), bulk=True) for i in (1, 2, 3)]
        assert queue.recent_concurrency() == 0
        encoder.gate.set()
        for i, future in enumerate([first, *chunks]):
            assert future.result(timeout=10)[0, 0] == float(i)
        assert queue.submit(pixels(9.0)).result(timeout=10)[0, 0] == 9.0
        assert encoder.batches == [1, 3, 1]
    finally:
        queue.stop()


def test_at_one_client_the_queue_never_waits() -> None:
    # bound of minutes: a queue that waited would not answer within the 10 s allowed
    queue, encoder = fill_queue(call_s=MINUTES_S, cap_s=MINUTES_S)
    try:
        for i in range(5):
            assert queue.submit(pixels(float(i))).result(timeout=10)[0, 0] == float(i)
            assert queue.recent_concurrency() == 1
        assert encoder.batches == [1] * 5
    finally:
        queue.stop()


def test_the_recent_concurrency_is_forgotten_after_its_window() -> None:
    queue, encoder = fill_queue(call_s=0.0, cap_s=0.0)
    try:
        for future in four_in_flight(queue, encoder):
            future.result(timeout=10)
        assert queue.recent_concurrency() == 4
        encoder.clock.offset += CONCURRENCY_WINDOW_S + 1.0
        assert queue.recent_concurrency() == 0  # nothing in flight now, nothing seen within the window
    finally:
        queue.stop()


def test_stopping_during_a_fill_wait_does_not_hang() -> None:
    queue, encoder = fill_queue(call_s=MINUTES_S, cap_s=MINUTES_S)
    queued = four_in_flight(queue, encoder)
    time.sleep(0.2)  # the worker waits for a fourth job
    assert not any(future.done() for future in queued)
    stopper = threading.Thread(target=queue.stop)
    stopper.start()
    stopper.join(timeout=10)
    assert not stopper.is_alive()
    for i, future in enumerate(queued, start=1):  # the batch being filled is encoded, not dropped
        assert future.result(timeout=10)[0, 0] == float(i)
