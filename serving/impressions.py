"""Impression logging: every answer of the read routes, appended as a tuple to a bounded
in-process buffer and written by a background thread onto the event stream, a flush as one
entry (field `i`, a document per line), so a request never waits on Redis for it. The consumer
stores them in `recommendation_logs` (IMPRESSION_SCHEMA, training/events.py)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from training.events import canonical_context

log = logging.getLogger("recsys.impressions")

# A flush every 50 ms (or at once when this many wait) keeps an impression's delay far below
# the consumer's, and a batch of a busy worker at a few hundred entries: one round trip each.
FLUSH_SECONDS = 0.05
FLUSH_RECORDS = 500
# About a minute of a busy worker's answers; beyond it (Redis down longer) the oldest go.
CAPACITY = 50_000
# Impressions per stream entry at most (a backlog after an outage is written in entries of this
# many), so that an entry, and a consumer's batch of entries, stays a few hundred kB.
_WRITE_CHUNK = FLUSH_RECORDS

# The kinds of record the hot path appends (the first field of each tuple).
_RECOMMEND = 0  # (kind, ts, request_id, user_id, payload JSON, latency, cached, degraded,
#                  experiment, context, teams, variant)
_ITEMS = 1  # (kind, ts, route, request_id, user_id, items, model_version, variant, latency,
#              status, experiment); a failed request is one of these without items


def recommend_document(record: tuple) -> str:
    """The stream document of a /recommend record: the request's fields with the answer's JSON
    spliced in whole as `answer` (fresh or cached alike). Parsing the answer is left to the
    consumer (feature_repo/stream.py `decode_impressions`), out of the serving workers."""
    _, ts, request_id, user_id, payload, latency, cached, degraded, experiment, context = record[
        :10
    ]
    teams = record[10]
    if not (payload.startswith("{") and payload.endswith("}")) or "\n" in payload:
        # A raw newline would split the entry's line-per-document batch (json.dumps writes none).
        raise ValueError("the answer is not a one-line JSON object")
    head = json.dumps(
        {
            "request_id": request_id,
            "user_id": user_id,
            "timestamp": ts,
            "route": "/recommend",
            "experiment": experiment,
            "latency_ms": latency,
            "status": "degraded" if degraded else "ok",
            "cached": cached,
            "context": None if context is None else canonical_context(context),
            "teams": teams,
        },
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return f'{head[:-1]},"answer":{payload}}}'


def items_impression(record: tuple) -> dict[str, Any]:
    """The impression of a /similar_items, /popular or /trending record: an item's source is
    the list its reason names."""
    _, ts, route, request_id, user_id, items, version, variant, latency, status, exp = record
    return {
        "request_id": request_id,
        "user_id": user_id,
        "timestamp": ts,
        "route": route,
        "items": [i["item_id"] for i in items],
        "scores": [i["score"] for i in items],
        "sources": [i.get("reason") or "" for i in items],
        "variant": variant,
        "experiment": exp,
        "model_version": version,
        "latency_ms": latency,
        "status": status,
        "cached": False,
        "context": None,
        "teams": None,
    }


class ImpressionLog:
    """The worker's impression buffer and the thread that empties it onto the stream.

    `write(payloads)` appends JSON documents to the stream (one entry, one round trip);
    `ready()` says whether to try (False while Redis is known to be down: the records wait).
    Records that could not be written wait for the next flush; past `capacity` waiting, the
    oldest are dropped and counted. `on_written(counts)` and `on_dropped(n)` feed the metrics.
    """

    def __init__(
        self,
        write: Callable[[Sequence[str]], None],
        enabled: bool = True,
        ready: Callable[[], bool] = lambda: True,
        on_written: Callable[[Mapping[tuple[str, str], int]], None] = lambda counts: None,
        on_dropped: Callable[[int], None] = lambda n: None,
        capacity: int = CAPACITY,
        flush_seconds: float = FLUSH_SECONDS,
        flush_records: int = FLUSH_RECORDS,
    ) -> None:
        self.enabled = enabled
        self._write, self._ready = write, ready
        self._on_written, self._on_dropped = on_written, on_dropped
        self.capacity = capacity
        self.flush_seconds, self.flush_records = flush_seconds, flush_records
        # deque(maxlen) drops the oldest record itself when full; the hot path counts that.
        self._buffer: deque[tuple] = deque(maxlen=capacity)
        # Encoded records a failed write left, oldest first: (route, variant, payload).
        self._waiting: list[tuple[str, str, str]] = []
        self._dropped_unreported = 0
        self.dropped = 0
        self.written = 0
        self._failing = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- the hot path: one tuple appended ----------------------------------------------------

    def _append(self, record: tuple) -> None:
        buffer = self._buffer
        if len(buffer) >= self.capacity:
            self._dropped_unreported += 1  # approximate under threads; a metric, not a ledger
        buffer.append(record)
        if len(buffer) >= self.flush_records:
            self._wake.set()

    def recommend(
        self,
        request_id: str,
        user_id: str,
        payload: str,
        latency_ms: float,
        cached: bool,
        degraded: bool,
        experiment: str | None,
        context: Mapping[str, Any] | None,
        variant: str,
        teams: list[str] | None = None,
    ) -> None:
        """Log a /recommend answer: `payload` is its `{items, model_version, variant, ...}` JSON
        (parsed by the consumer, not in the worker); `teams` the arm of each position of an
        interleaved answer."""
        if self.enabled:
            self._append(
                (
                    _RECOMMEND,
                    time.time(),
                    request_id,
                    user_id,
                    payload,
                    latency_ms,
                    cached,
                    degraded,
                    experiment,
                    context,
                    teams,
                    variant,
                )
            )

    def items(
        self,
        route: str,
        request_id: str,
        user_id: str | None,
        items: list[dict],
        model_version: str | None,
        variant: str,
        latency_ms: float,
        degraded: bool,
        experiment: str | None,
        status: str | None = None,
    ) -> None:
        """Log an answer of /similar_items, /popular or /trending (`items`: its item dicts, not
        changed afterwards); `status` overrides the one `degraded` gives (`error`)."""
        if self.enabled:
            self._append(
                (
                    _ITEMS,
                    time.time(),
                    route,
                    request_id,
                    user_id,
                    items,
                    model_version,
                    variant,
                    latency_ms,
                    status or ("degraded" if degraded else "ok"),
                    experiment,
                )
            )

    def failed(
        self,
        route: str,
        request_id: str,
        user_id: str | None,
        model_version: str | None,
        variant: str,
        latency_ms: float,
        experiment: str | None,
    ) -> None:
        """Log a request its variant could not answer (status `error`, no items): the error-rate
        guardrail of an experiment counts these."""
        self.items(
            route, request_id, user_id, [], model_version, variant, latency_ms, False, experiment,
            status="error",
        )  # fmt: skip

    # -- the background side -----------------------------------------------------------------

    def start(self) -> None:
        """Flush every `flush_seconds` (sooner when `flush_records` wait) in a daemon thread."""
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="impressions", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after a last flush (the records of the answers already sent)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self.flush()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self.flush()
        self.flush()

    def pending(self) -> int:
        """Records not written yet (buffered or waiting for Redis)."""
        return len(self._buffer) + len(self._waiting)

    def flush(self) -> int:
        """Encode what is buffered and write it with what waits; returns the records written."""
        with self._flush_lock:
            encoded = self._drain()
            if encoded:
                self._waiting.extend(encoded)
            self._report_drops()
            if not self._waiting or not self._ready():
                return 0
            written = 0
            while self._waiting:
                chunk = self._waiting[:_WRITE_CHUNK]
                try:
                    self._write([payload for _, _, payload in chunk])
                except Exception as exc:  # noqa: BLE001 - any failure: the records wait
                    if not self._failing:
                        log.warning(
                            "cannot write impressions to the stream (they wait, up to %d, then "
                            "the oldest are dropped): %s",
                            self.capacity,
                            exc,
                        )
                        self._failing = True
                    break
                del self._waiting[: len(chunk)]
                written += len(chunk)
                self._on_written(Counter((route, variant) for route, variant, _ in chunk))
            if written and self._failing and not self._waiting:
                log.info("impressions are written to the stream again")
                self._failing = False
            self.written += written
            return written

    def _drain(self) -> list[tuple[str, str, str]]:
        buffer = self._buffer
        encoded = []
        for _ in range(len(buffer)):
            record = buffer.popleft()
            try:
                if record[0] == _RECOMMEND:
                    route, variant, text = "/recommend", record[-1], recommend_document(record)
                else:
                    row = items_impression(record)
                    route, variant = row["route"], row["variant"] or ""
                    # allow_nan=False: a NaN score would break the consumer's parse.
                    text = json.dumps(
                        row, separators=(",", ":"), ensure_ascii=False, allow_nan=False
                    )
            except (ValueError, KeyError, TypeError) as exc:
                log.error("an impression could not be encoded (dropped): %r", exc)
                self._dropped_unreported += 1
                continue
            encoded.append((route, variant, text))
        return encoded

    def _report_drops(self) -> None:
        overflow = len(self._waiting) - self.capacity
        if overflow > 0:
            del self._waiting[:overflow]
            self._dropped_unreported += overflow
        dropped, self._dropped_unreported = self._dropped_unreported, 0
        if dropped:
            self.dropped += dropped
            self._on_dropped(dropped)
