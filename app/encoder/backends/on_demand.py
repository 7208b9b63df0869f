"""The exported text tower, held only while builds use it: closed after `idle_s` without a call, opened
again by the next one.

Why: on a serving replica the text tower encodes class prompts only when a task is built or gains classes;
classify, the steady work, never calls it. Yet its compiled session is a large share of a small model's
memory: in-process, the stand-in's text tower took +200 MB on OpenVINO fp32 and +171 MB on ONNX Runtime,
and closing it gave back 163 MB (ONNX Runtime: 141 MB, after `malloc_trim`). Opening it again took
0.14-0.20 s, paid by the first build after an idle spell (docs/benchmarks.md, serving without torch).

It is open from the start (a broken export fails the start, as before) and `warm_up` closes it after its check
call, so a server at rest holds the image tower only. Thread-safe: its own lock serialises calls and the
close; the close runs on a timer thread armed by a call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from app.heap import release_freed_memory

from .base import FloatArray, TextTower, TokenArray

log = logging.getLogger(__name__)


class OnDemandTextTower:
    def __init__(
        self,
        open_tower: Callable[[], TextTower],
        idle_s: float,
        *,
        opened: TextTower | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`open_tower` opens a session; `opened`: the first one, if the caller has it already."""
        if idle_s <= 0:
            raise ValueError(f"idle_s must be > 0 (a tower that stays open needs no wrapper), got {idle_s}")
        self._open_tower = open_tower
        self.idle_s = idle_s
        self._clock = clock
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._last_used = clock()
        self._tower: TextTower | None = opened if opened is not None else open_tower()
        self.name = self._tower.name
        # What `auto` holds the tower to (choice.fidelity_bound): every session it opens runs at this precision.
        self.precision = str(getattr(self._tower, "precision", "fp32"))
        self.opens = 1  # how often a session was opened (the first one included)

    @property
    def is_open(self) -> bool:
        return self._tower is not None

    @property
    def current(self) -> TextTower | None:
        """The open session's tower (None while closed)."""
        return self._tower

    def __call__(self, tokens: TokenArray) -> FloatArray:
        with self._lock:
            tower = self._tower
            if tower is None:
                started = time.perf_counter()
                tower = self._tower = self._open_tower()
                self.opens += 1
                seconds = time.perf_counter() - started
                log.info("%s text tower opened again for a build (%.2f s)", self.name, seconds)
            try:
                return tower(tokens)
            finally:
                self._last_used = self._clock()
                self._arm()

    def close(self) -> bool:
        """Close the session now (the next call opens it again); whether one was open."""
        with self._lock:
            return self._close()

    def close_if_idle(self) -> bool:
        """Close the session if it has not been called for `idle_s`; whether it closed it."""
        with self._lock:
            return self._tower is not None and self._idle_remaining() <= 0 and self._close()

    def _idle_remaining(self) -> float:  # under the lock
        return self.idle_s - (self._clock() - self._last_used)

    def _close(self) -> bool:  # under the lock
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._tower is None:
            return False
        self._tower = None
        release_freed_memory()  # ONNX Runtime's freed session stays in glibc's heap otherwise (141 of 171 MB)
        return True

    def _arm(self) -> None:  # under the lock
        if self._timer is None:
            self._timer = threading.Timer(self.idle_s, self._on_timer)
            self._timer.daemon = True
            self._timer.name = f"{self.name}-text-idle"
            self._timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            if self._tower is None:
                return
            remaining = self._idle_remaining()
            if remaining > 0:  # called again since the timer was armed: wait for the rest
                self._timer = threading.Timer(remaining, self._on_timer)
                self._timer.daemon = True
                self._timer.start()
                return
            self._close()
        log.info("%s text tower closed after %.0f s without a build", self.name, self.idle_s)
