"""Prometheus metrics of the service core (the HTTP layer adds per-route request metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ENCODE_SECONDS = Histogram(
    "shotcache_encode_seconds",
    "Time of one batched encoder call.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_IMAGES = Histogram(
    "shotcache_encode_batch_images", "Images per encoder call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
QUEUE_IMAGES = Gauge("shotcache_queue_images", "Classify images waiting for the encoder.")
QUEUE_REJECTED = Counter("shotcache_queue_rejected_total", "Requests refused with 429 because the queue was full.")
TASKS_STORED = Gauge("shotcache_tasks", "Tasks held by the service.")
IMAGES_CLASSIFIED = Counter("shotcache_images_classified_total", "Images classified.")
TASK_BUILD_SECONDS = Histogram(
    "shotcache_task_build_seconds",
    "Time to build or update a task (decode, encode, tune, persist).",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
