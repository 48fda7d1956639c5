"""Up/down state of one dependency (Redis, the model registry): one log line when it goes down and
one when it is back, instead of one per request, and a background probe that notices recovery."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import redis

log = logging.getLogger("recsys.serving")

# What "Redis is unreachable" looks like; any other RedisError (a script error, a wrong type) is a
# bug and must not be mistaken for an outage. On Redis Cluster also: CLUSTERDOWN (a master lost
# and not failed over; MasterDownError too), TRYAGAIN (a slot migrating), a slot no node serves,
# and ClusterError (redirections or reconnections exhausted).
REDIS_DOWN: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
)


class Outage:
    """Tracks one dependency. `failed(exc)` marks it down (logged once); while down, callers skip
    it and, when a probe is given, a daemon thread runs the probe every `probe_seconds` until it
    succeeds; `recovered()` marks it up (logged once with the outage's length)."""

    def __init__(
        self,
        name: str,
        probe: Callable[[], object] | None = None,
        probe_seconds: float = 1.0,
        on_recovery: Callable[[], None] | None = None,
        errors: tuple[type[BaseException], ...] = REDIS_DOWN,
    ) -> None:
        self.name = name
        self.probe = probe
        self.probe_seconds = probe_seconds
        self.on_recovery = on_recovery
        self.errors = errors
        self.outages = 0
        self.last_downtime: float | None = None
        self._down_since: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def down(self) -> bool:
        return self._down_since is not None

    @property
    def retry_after(self) -> int:
        """Seconds a client should wait before retrying (the probe's period, at least 1)."""
        return max(1, math.ceil(self.probe_seconds))

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
            self.outages += 1
            log.warning("%s unavailable: %s: %s", self.name, type(exc).__name__, exc)
            if self.probe is not None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._probe_until_up, name=f"probe-{self.name}", daemon=True
                )
                self._thread.start()

    def recovered(self) -> None:
        with self._lock:
            if self._down_since is None:
                return
            self.last_downtime = time.monotonic() - self._down_since
            self._down_since = None
            log.warning("%s back after %.1f s", self.name, self.last_downtime)
        if self.on_recovery is not None:
            try:
                self.on_recovery()
            except self.errors as exc:
                self.failed(exc)

    def _probe_until_up(self) -> None:
        assert self.probe is not None
        while not self._stop.wait(self.probe_seconds):
            try:
                self.probe()
            except self.errors:
                continue
            # The probe itself can fail in other ways (a bug): keep probing, it is logged once.
            except Exception as exc:
                log.debug("%s probe failed: %s", self.name, exc)
                continue
            self.recovered()
            return

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=5)
