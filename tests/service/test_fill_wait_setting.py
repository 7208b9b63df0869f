"""SHOTCACHE_FILL_WAIT_CAP_MS reaches the encoder queue: whether the fill wait pays depends on the host."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.service.queue import FILL_WAIT_CAP_S, FILL_WAIT_FRACTION

from .conftest import make_service


@pytest.mark.parametrize("cap_ms", [0.0, None, 1000.0])
def test_the_fill_wait_cap_setting_bounds_the_queue(
    cap_ms: float | None, encoder: Any, model_data_dir: Path, tmp_path: Path
) -> None:
    overrides = {} if cap_ms is None else {"fill_wait_cap_ms": cap_ms}
    service = make_service(encoder, model_data_dir, tmp_path / "data", **overrides)
    try:
        size = encoder.input_size
        started = time.monotonic()
        service.queue.encode(np.zeros((1, size, size, 3), dtype=np.uint8))
        call_s = time.monotonic() - started  # the encoder call took at most this
        bound = service.queue.fill_wait_bound_s
        cap_s = FILL_WAIT_CAP_S if cap_ms is None else cap_ms / 1000.0
        assert 0.0 <= bound <= min(cap_s, FILL_WAIT_FRACTION * call_s)
        if cap_ms == 0.0:
            assert bound == 0.0
        else:
            assert bound > 0.0
    finally:
        service.close()
