"""Micro-batching in front of the encoder: concurrent requests share one encoder call.

One worker thread owns the encoder. It takes the first waiting job, then keeps collecting jobs for up
to `max_wait_ms` or until `max_batch` images are gathered, encodes them in one call and hands each job
its rows. It only waits while a job is on its way: callers `announce` a job before preparing its pixels
(decoding), so a lone request is encoded at once instead of idling `max_wait_ms` (measured: 5 ms of a
15 ms request with the stand-in), while concurrent requests still share a batch.

It also waits, briefly, when fewer classify images are waiting than the recent concurrency (the most
submitted-but-not-finished over the last `CONCURRENCY_WINDOW_S`): closed-loop clients otherwise settle
into groups that alternate on the encoder (with 8 clients, two groups of 4: each call held 4 images while
the other group's 4 were being answered, docs/benchmarks.md, request path). That wait is bounded by a
fraction of the last encoder call and capped; at one client the recent concurrency is 1 and nothing waits.
Measured (quiet window, 8 clients, raw body): batches of 8 instead of 4, ViT-B-32 88 -> 112 img/s,
the stand-in 108-115 -> 123-129; 1 client unchanged. That was an Intel host with AMX; on an AMD EPYC host the
wait bought ViT-B-32 nothing and cost the stand-in 3-11%, so SHOTCACHE_FILL_WAIT_CAP_MS=0 turns it off per host.

Image jobs come as uint8 crops: a lone job's crops go to the encoder as they are, a batch of several is copied
into one uint8 buffer the worker reuses, and the image tower normalises them (inside the OpenVINO graph, or
into the tower's own reused float buffer: app/encoder/backends/crops.py), instead of each request allocating
(and page-faulting) its own float pixels (docs/benchmarks.md, request path).

Three lanes, served in this order: `interactive` (classify images), `text` (class prompts of a task
being built), `bulk` (shot images of a task being built). So a big build slows classify down by at most
one batch. The queue admits nothing itself: `Admission` (admission.py) decides what may enter.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from app.encoder import Encoder
from app.encoder.preprocess import Crops, check_crops
from app.errors import AppError, ErrorCode
from app.settings import Settings

from . import metrics
from .task import FloatArray

log = logging.getLogger(__name__)

Lane = Literal["interactive", "text", "bulk"]
LANES: tuple[Lane, ...] = ("interactive", "text", "bulk")

# The concurrency-aware fill wait. Its bound: this fraction of the last image encoder call, long enough for
# the other group of closed-loop clients to be answered and send again (the answer, HTTP and decoding of a
# group took about half a call here; 0.1 and 10 ms filled batches to only 5.7 of 8 for ViT-B-32), so a wait
# that finds nobody costs at most 60% of one call once, after which the recent concurrency falls ...
FILL_WAIT_FRACTION = 0.6
# ... and never more than this, so a slow encoder (a big model, a loaded machine) does not add much latency
# to a request. 0 turns the fill wait off (the `announce` wait is `max_wait_ms`'s). It is a setting,
# SHOTCACHE_FILL_WAIT_CAP_MS (30 ms), since whether the wait pays depends on the host; this is its default.
FILL_WAIT_CAP_S = float(Settings.model_fields["fill_wait_cap_ms"].default) / 1000.0
# How far back the recent concurrency looks: this long, short enough that a burst's concurrency soon stops
# making batches wait once it ends (1.0 s made a lone request after an 8-client burst wait: ViT-B-32's
# first 1-client run after one took 3.2-3.4 ms outside the encoder against 2.4-2.6 in the next; at 0.2 s,
# 2.3-2.4 in both, batches at 8 clients still 8.0: docs/benchmarks.md, request path), ...
CONCURRENCY_WINDOW_S = 0.2
# ... or this many of the last encoder call, if longer: the groups of clients alternate over two calls,
# so the window must span a few calls even when one takes longer than `CONCURRENCY_WINDOW_S`.
CONCURRENCY_WINDOW_CALLS = 4


@dataclass
class _Job:
    lane: Lane
    crops: Crops | None = None
    texts: Sequence[str] = ()
    future: Future[FloatArray] = field(default_factory=Future)

    @property
    def size(self) -> int:
        if self.crops is not None:
            return int(self.crops.shape[0])
        return len(self.texts)


def shutting_down() -> AppError:
    return AppError(ErrorCode.SHUTTING_DOWN, "the service is shutting down; retry on another replica or later")


class EncoderQueue:
    def __init__(
        self,
        encoder: Encoder,
        *,
        max_batch: int,
        max_wait_ms: float,
        fill_wait_cap_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`fill_wait_cap_s` bounds the concurrency-aware fill wait (None: `FILL_WAIT_CAP_S`, 0: off);
        `clock` times encoder calls and waits (tests pass one they can move)."""
        self._encoder = encoder
        self._buffer: Crops | None = None  # the worker's batch of several jobs' crops, reused
        self._max_batch = max_batch
        self._max_wait = max_wait_ms / 1000.0
        self._lanes: dict[Lane, collections.deque[_Job]] = {lane: collections.deque() for lane in LANES}
        self._announced = 0  # jobs being prepared (decoded) that will be submitted soon
        self._delivering = 0  # jobs of the batch whose results are being handed over
        self._cond = threading.Condition()
        self._stopping = False
        self._images_per_second = 20.0  # replaced by a moving average once batches run
        self._fill_wait_cap = FILL_WAIT_CAP_S if fill_wait_cap_s is None else fill_wait_cap_s
        self._clock = clock
        self._last_call_s = 0.0  # the last image encoder call's duration; 0: none yet, so nothing waits
        self._in_flight = 0  # images submitted and not finished (queued or being encoded)
        self._in_flight_seen: collections.deque[tuple[float, int]] = collections.deque()  # (when, in flight)
        self._thread = threading.Thread(target=self._run, name="encoder-queue", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        for lane in self._lanes.values():
            for job in lane:
                job.future.set_exception(shutting_down())

    @property
    def images_per_second(self) -> float:
        """Measured image throughput (moving average), for Retry-After estimates."""
        return self._images_per_second

    @property
    def has_other_work(self) -> bool:
        """Whether the encoder has work besides the one job whose result is being handed over: other jobs of
        its batch, or jobs waiting or announced (a snapshot, read without the lock; for a result's callback)."""
        return self._delivering > 1 or self._announced > 0 or any(self._lanes.values())

    @property
    def fill_wait_bound_s(self) -> float:
        """How long a batch may wait for the recent concurrency to fill it: a fraction of the last
        image encoder call, capped."""
        return min(FILL_WAIT_FRACTION * self._last_call_s, self._fill_wait_cap)

    def recent_concurrency(self) -> int:
        """The most images submitted-but-not-finished at once over the last `CONCURRENCY_WINDOW_S`
        (or `CONCURRENCY_WINDOW_CALLS` encoder calls, if longer)."""
        with self._cond:
            seen = self._in_flight_seen
            horizon = self._clock() - max(CONCURRENCY_WINDOW_S, CONCURRENCY_WINDOW_CALLS * self._last_call_s)
            while seen and seen[0][0] < horizon:
                seen.popleft()
            return max((n for _, n in seen), default=self._in_flight)

    def announce(self) -> None:
        """A job is being prepared: batches wait for it (up to `max_wait_ms`). Follow with
        `submit(..., announced=True)`, or `withdraw()` if it will not come."""
        with self._cond:
            self._announced += 1

    def withdraw(self) -> None:
        with self._cond:
            self._announced = max(0, self._announced - 1)
            self._cond.notify_all()

    def submit(self, crops: Crops, *, bulk: bool = False, announced: bool = False) -> Future[FloatArray]:
        """Queue uint8 crops ([n, S, S, 3], the preprocessor's eval or view crops) on the interactive lane (bulk:
        a build's); the future resolves to their L2-normalised features."""
        check_crops(crops, self._encoder.input_size)  # here, so one bad job cannot fail a batch it joins
        return self._put(_Job("bulk" if bulk else "interactive", crops=crops), announced=announced)

    def submit_texts(self, texts: Sequence[str]) -> Future[FloatArray]:
        """Queue prompts for the text tower (the text lane); resolves to L2-normalised features."""
        return self._put(_Job("text", texts=list(texts)), announced=False)

    def encode(self, crops: Crops, *, bulk: bool = False) -> FloatArray:
        """Blocking form of `submit`, for worker threads."""
        return self.submit(crops, bulk=bulk).result()

    def encode_texts(self, texts: Sequence[str]) -> FloatArray:
        """Blocking form of `submit_texts`, for worker threads."""
        return self.submit_texts(texts).result()

    def _put(self, job: _Job, *, announced: bool) -> Future[FloatArray]:
        with self._cond:
            if announced:
                self._announced = max(0, self._announced - 1)
            if self._stopping:
                raise shutting_down()
            self._lanes[job.lane].append(job)
            if job.lane == "interactive":  # what a batch can wait for (builds send their chunks one by one)
                self._in_flight += job.size
                self._in_flight_seen.append((self._clock(), self._in_flight))
            metrics.LANE_JOBS.labels(job.lane).inc()
            self._set_gauges()
            self._cond.notify()
        return job.future

    def _set_gauges(self) -> None:
        for lane, jobs in self._lanes.items():
            metrics.LANE_WAITING.labels(lane).set(sum(j.size for j in jobs))

    # ---- worker -------------------------------------------------------------------------------
    def _take_batch(self) -> list[_Job] | None:
        """The next batch: interactive images (topped up with bulk ones when it started as bulk), or
        one text job on its own."""
        interactive, text, bulk = (self._lanes[lane] for lane in LANES)
        with self._cond:
            while not (interactive or text or bulk):
                if self._stopping:
                    return None
                self._cond.wait()
            if not interactive and text:
                job = text.popleft()
                self._set_gauges()
                return [job]
            first_is_bulk = not interactive
            batch = [(bulk if first_is_bulk else interactive).popleft()]
            size = batch[0].size
            now = self._clock()
            announced_deadline = now + self._max_wait
            fill_deadline = now + self.fill_wait_bound_s
            fill_to = 0 if first_is_bulk else min(self._max_batch, self.recent_concurrency())
            while size < self._max_batch and not self._stopping:
                queue = interactive or (bulk if first_is_bulk else None)
                if queue and size + queue[0].size <= self._max_batch:
                    job = queue.popleft()
                    batch.append(job)
                    size += job.size
                    continue
                if queue:  # the next job doesn't fit
                    break
                deadline = max(
                    announced_deadline if self._announced else 0.0,  # a job is being decoded
                    fill_deadline if size < fill_to else 0.0,  # the recent concurrency would fill it more
                )
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._set_gauges()
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            lane = batch[0].lane
            started = self._clock()
            try:
                if lane == "text":
                    features = self._encoder.encode_texts(batch[0].texts)
                else:
                    crops = self._batch_crops(batch)
                    started = self._clock()  # the encoder call: the tower's normalising and the model
                    features = self._encoder.encode_crops(crops)
            except Exception as exc:  # the encoder failing must fail the jobs, not kill the worker
                log.exception("encoder call failed for a %s batch of %d", lane, sum(j.size for j in batch))
                self._finished(batch)
                for job in batch:
                    job.future.set_exception(exc)
                continue
            elapsed = self._clock() - started
            rows = int(features.shape[0])
            metrics.LANE_SECONDS.labels(lane).inc(elapsed)
            metrics.LANE_ROWS.labels(lane).inc(rows)
            if lane != "text":
                metrics.ENCODE_SECONDS.observe(elapsed)
                metrics.BATCH_IMAGES.observe(rows)
                if elapsed > 0:
                    self._images_per_second = 0.8 * self._images_per_second + 0.2 * rows / elapsed
                self._last_call_s = elapsed
            self._finished(batch)
            row = 0
            self._delivering = len(batch)  # read by the results' callbacks (`has_other_work`)
            try:
                for job in batch:
                    job.future.set_result(features[row : row + job.size])
                    row += job.size
            finally:
                self._delivering = 0

    def _finished(self, batch: Sequence[_Job]) -> None:
        if batch[0].lane == "interactive":
            with self._cond:
                self._in_flight -= sum(job.size for job in batch)

    def _batch_crops(self, batch: Sequence[_Job]) -> Crops:
        """The batch's crops in one array: a lone job's as they are, else rows of the reused buffer."""
        first = batch[0].crops
        assert first is not None  # image lanes hold crops jobs only
        if len(batch) == 1:
            return first
        total = sum(job.size for job in batch)
        shape = first.shape[1:]
        if self._buffer is None or self._buffer.shape[0] < total or self._buffer.shape[1:] != shape:
            self._buffer = np.empty((max(total, self._max_batch), *shape), dtype=np.uint8)
        out = self._buffer[:total]
        row = 0
        for job in batch:
            assert job.crops is not None
            out[row : row + job.size] = job.crops
            row += job.size
        return out
