"""Prometheus metrics of the service core (the HTTP layer adds per-route request metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ENCODE_SECONDS = Histogram(
    "shotcache_encode_seconds",
    "Time of one batched image encoder call.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_IMAGES = Histogram(
    "shotcache_encode_batch_images", "Images per encoder call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
LANE_JOBS = Counter("shotcache_encoder_jobs_total", "Jobs submitted to the encoder queue, per lane.", ["lane"])
LANE_ROWS = Counter("shotcache_encoder_rows_total", "Images or texts encoded, per lane.", ["lane"])
LANE_SECONDS = Counter("shotcache_encoder_seconds_total", "Encoder time spent, per lane.", ["lane"])
LANE_WAITING = Gauge("shotcache_encoder_waiting", "Images or texts waiting in the encoder queue, per lane.", ["lane"])
QUEUE_IMAGES = Gauge("shotcache_queue_images", "Classify images admitted and not yet answered.")
QUEUE_REJECTED = Counter("shotcache_queue_rejected_total", "Classify requests refused with 429 (queue full).")
BUILDS_PENDING = Gauge("shotcache_builds_pending", "Task builds admitted and not finished.")
TASKS_STORED = Gauge("shotcache_tasks", "Tasks held by the service.")
IMAGES_CLASSIFIED = Counter("shotcache_images_classified_total", "Images classified.")
TASK_BUILD_SECONDS = Histogram(
    "shotcache_task_build_seconds",
    "Time to build or update a task (decode, encode, tune, persist).",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
