"""Applying a batch of events to the real-time features: one Lua script on a single Redis node
(`SingleNodeIngest`), per-slot commands on Redis Cluster (`ClusterIngest`)."""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import polars as pl

from feature_repo.definitions import FeatureConfig, Keys
from feature_repo.scripts import Scripts
from feature_repo.stream import EVENT_FIELD
from feature_repo.types import IngestResult
from training.events import EVENT_TYPE_DTYPE, EVENT_TYPES


@dataclass(frozen=True)
class Batch:
    """A validated batch as the scripts take it: columns k (seen_event key), u, i, t, ts, w
    (weight), and one stream payload (JSON) per event."""

    columns: dict[str, list]
    payloads: list[str]
    now: float


class Ingest(ABC):
    """What both backends share: the batch's checks, weights and columns; `_apply` writes it."""

    def __init__(self, scripts: Scripts, keys: Keys, config: FeatureConfig) -> None:
        self.scripts = scripts
        self.redis = scripts.redis  # the scripts' client: plain commands go the same way
        self.keys, self.config = keys, config
        # Confidence of each event: its type's weight (1 for a type without one), a rating's
        # value (never negative); the weights are looked up by the type's position in
        # EVENT_TYPES (a gather, cheaper than a replace per batch).
        etype = pl.col("event_type").cast(pl.String)
        by_code = pl.Series([float(config.event_weights.get(t, 1.0)) for t in EVENT_TYPES])
        code = etype.cast(EVENT_TYPE_DTYPE, strict=False).to_physical()
        self._weight = (
            pl.when(etype == "rating")
            .then(pl.col("value").cast(pl.Float64).fill_null(1.0).clip(lower_bound=0.0))
            .otherwise(pl.lit(by_code).gather(code).fill_null(1.0))
        )
        self._cfg_json = json.dumps(
            {
                "recent_cap": config.recent_cap,
                "coview_items": config.coview_window_items,
                "coview_seconds": config.coview_window_seconds,
                "coview_cap": config.coview_cap,
                "coview_ttl": config.coview_ttl,
                "counters_ttl": config.counters_ttl,
                "recent_ttl": config.recent_ttl,
                "dedupe_ttl": config.dedupe_ttl,
                "pop_rate": config.popularity_rate,
                "trend_rate": config.trending_rate,
                "repeat_window": config.repeat_window,
                "repeat_cap": config.repeat_cap,
                "item_users_ttl": config.item_users_ttl,
                "count_users": config.count_new_item_users,
                # INGEST builds these keys for the ids it reads; Keys stays their one spelling.
                "keys": {
                    "recent": keys.affixes(keys.recent),
                    "counters": keys.affixes(keys.counters),
                    "cache": keys.affixes(keys.cache),
                    "coview": keys.affixes(keys.coview),
                    "repeats": keys.affixes(keys.repeats),
                    "item_users": keys.affixes(keys.item_users),
                },
            }
        )

    def ingest(self, events: pl.DataFrame, now: float | None = None) -> IngestResult:
        """Apply a batch of validated events (the event contract, event_id set).

        New events update every feature and are appended to the stream; events whose event_id
        was ingested within `dedupe_ttl` are reported as duplicates and change nothing.
        """
        if events.is_empty():
            return IngestResult(0, 0, np.empty(0, dtype=np.int64), 0)
        if events["event_id"].null_count():
            raise ValueError("every event needs an event_id; fill them with with_event_ids()")
        return self._apply(self._batch(events, time.time() if now is None else now))

    @abstractmethod
    def _apply(self, batch: Batch) -> IngestResult:
        """Write a batch to Redis: dedupe, every feature, the stream."""

    def _batch(self, events: pl.DataFrame, now: float) -> Batch:
        absent = [
            pl.lit(None, dtype=dtype).alias(name)
            for name, dtype in (
                ("context", pl.String),
                ("request_id", pl.String),
                ("position", pl.Int32),
            )
            if name not in events.columns
        ]
        if absent:
            events = events.with_columns(absent)
        prefix, suffix = self.keys.seen_event_affixes()
        # One select: the stored record's columns, the seen_event keys and the weights.
        frame = events.select(
            pl.col("user_id").cast(pl.String),
            pl.col("item_id").cast(pl.String),
            pl.col("event_type").cast(pl.String),
            pl.col("timestamp").cast(pl.Int64),
            pl.col("value").cast(pl.Float64),
            pl.col("session_id").cast(pl.String),
            pl.col("event_id").cast(pl.String),
            pl.col("context").cast(pl.String),
            pl.col("request_id").cast(pl.String),
            pl.col("position").cast(pl.Int32),
            (prefix + pl.col("event_id").cast(pl.String) + suffix).alias("_k"),
            self._weight.alias("_w"),
        )
        columns = {
            "k": frame["_k"].to_list(),
            "u": frame["user_id"].to_list(),
            "i": frame["item_id"].to_list(),
            "t": frame["event_type"].to_list(),
            "ts": frame["timestamp"].to_list(),
            "w": frame["_w"].to_list(),
        }
        # One JSON document per event for the stream; JSON escapes newlines inside strings, so
        # splitting the NDJSON text on "\n" is exact.
        record = frame.select(pl.exclude("_k", "_w"))
        payloads = record.write_ndjson().split("\n")[: record.height]
        return Batch(columns, payloads, now)


class SingleNodeIngest(Ingest):
    """The whole batch is the INGEST script: one round trip, atomic."""

    def _apply(self, batch: Batch) -> IngestResult:
        k = self.keys
        reply = self.scripts.run(
            "INGEST",
            [
                k.popularity,
                k.trending,
                k.decay,
                k.first_seen,
                k.stats,
                k.stream,
                k.catalog("in_stock"),
            ],
            [
                repr(float(batch.now)),
                self._cfg_json,
                json.dumps(batch.columns),
                *batch.payloads,
            ],
        )
        accepted, new_items, *dups = reply
        return IngestResult(
            int(accepted), len(dups), np.asarray(dups, dtype=np.int64), int(new_items)
        )


class ClusterIngest(Ingest):
    """The ingest as plain commands, for Redis Cluster, where a script may touch one slot.

    Round trip 1 appends every event to the stream (so an event is durable before it is marked
    seen). Round trip 2 marks event ids seen (SET NX) and reads the users' recent items and
    repeat counts; the duplicates' stream entries are then deleted, so the stream holds what it
    holds on one node. Round trip 3 writes the user, repeat and co-view updates, worked out here
    exactly as the INGEST script does them; the {global} updates are one script (INGEST_GLOBAL)
    in their slot.
    """

    def _apply(self, batch: Batch) -> IngestResult:
        k, cfg, columns = self.keys, self.config, batch.columns
        users = columns["u"]
        pipe = self.redis.pipeline(transaction=False)
        for payload in batch.payloads:
            pipe.xadd(k.stream, {EVENT_FIELD: payload})
        entry_ids = pipe.execute()

        distinct = list(dict.fromkeys(users))
        pipe = self.redis.pipeline(transaction=False)
        for key in columns["k"]:
            pipe.set(key, "1", nx=True, ex=cfg.dedupe_ttl)
        for user in distinct:
            pipe.zrange(k.recent(user), 0, -1, withscores=True)
        for user in distinct:
            pipe.hgetall(k.repeats(user))
        replies = pipe.execute()
        new = np.array([bool(r) for r in replies[: len(users)]], dtype=bool)
        n = len(users)
        recent = {u: dict(p) for u, p in zip(distinct, replies[n : n + len(distinct)], strict=True)}
        repeats = {
            u: {item: int(c) for item, c in r.items()}
            for u, r in zip(distinct, replies[n + len(distinct) :], strict=True)
        }
        accepted_rows = np.flatnonzero(new).tolist()
        duplicates = np.flatnonzero(~new)
        if len(duplicates):
            # As on one node, a duplicate leaves no entry in the stream (should this process die
            # before this, the event store drops the duplicate by its event_id).
            self.redis.xdel(k.stream, *[entry_ids[r] for r in duplicates])

        weights, first = self._write_users_and_coview(
            columns, accepted_rows, recent, repeats, batch.now
        )

        accepted = {name: [columns[name][r] for r in accepted_rows] for name in ("i", "ts", "u")}
        accepted["w"], accepted["f"] = weights, first
        new_items = self.scripts.run(
            "INGEST_GLOBAL",
            [k.popularity, k.trending, k.decay, k.first_seen, k.stats, k.catalog("in_stock")],
            [
                repr(float(batch.now)),
                self._cfg_json,
                json.dumps(accepted),
                len(accepted_rows),
                len(users) - len(accepted_rows),
            ],
        )
        return IngestResult(len(accepted_rows), len(duplicates), duplicates, int(new_items))

    def _write_users_and_coview(
        self,
        columns: dict[str, list],
        accepted_rows: list[int],
        recent: dict[str, dict[str, float]],
        repeats: dict[str, dict[str, int]],
        now: float,
    ) -> tuple[list[float], list[bool]]:
        """Round trip 3: the accepted events' recent items, counters, repeats and co-view,
        replayed on `recent` (each user's recent items before the batch) and `repeats` (their
        repeat counts) in event order, as INGEST does; returns each accepted event's weight
        after repeats and whether it was the user's first on the item in the window."""
        k, cfg = self.keys, self.config
        users, items, types, stamps = columns["u"], columns["i"], columns["t"], columns["ts"]
        coview: dict[str, list[str]] = {}
        counts: dict[str, dict[str, int]] = {}
        touched: dict[str, dict[str, int]] = {}
        repeat_window, cap = cfg.repeat_window, cfg.repeat_cap
        fresh_window = {user for user, seen in repeats.items() if not seen}
        added: dict[str, dict[str, int]] = {}
        weights: list[float] = []
        firsts: list[bool] = []
        for row in accepted_rows:
            user, item, ts = users[row], items[row], stamps[row]
            weight, first = columns["w"][row], True
            if repeat_window > 0:
                seen = repeats[user]
                prior = seen.get(item, 0)
                seen[item] = prior + 1
                per_user = added.setdefault(user, {})
                per_user[item] = per_user.get(item, 0) + 1
                first = prior == 0
                weight = 0.0 if prior >= cap else weight / (1 + prior)
            weights.append(weight)
            firsts.append(first)
            state = recent[user]
            if item not in state and not first:
                state[item] = ts
                if len(state) > cfg.recent_cap:
                    del state[min(state.items(), key=lambda p: (p[1], p[0]))[0]]
            elif item not in state:
                window = sorted(
                    (
                        (score, member)
                        for member, score in state.items()
                        if score >= ts - cfg.coview_window_seconds
                    ),
                    reverse=True,
                )[: cfg.coview_window_items]
                for _, earlier in window:
                    coview.setdefault(earlier, []).append(item)
                state[item] = ts
                if len(state) > cfg.recent_cap:
                    del state[min(state.items(), key=lambda p: (p[1], p[0]))[0]]
            else:
                state[item] = max(state[item], ts)
            latest = touched.setdefault(user, {})
            latest[item] = max(latest.get(item, ts), ts)
            per_type = counts.setdefault(user, {})
            per_type[types[row]] = per_type.get(types[row], 0) + 1

        pipe = self.redis.pipeline(transaction=False)
        for user, per_type in counts.items():
            key = k.recent(user)
            pipe.zadd(key, touched[user], gt=True)
            pipe.zremrangebyrank(key, 0, -cfg.recent_cap - 1)
            pipe.expire(key, cfg.recent_ttl)
            counters = k.counters(user)
            for event_type, count in per_type.items():
                pipe.hincrby(counters, event_type, count)
            pipe.hset(counters, "last_seen", repr(float(now)))
            pipe.expire(counters, cfg.counters_ttl)
            pipe.delete(k.cache(user))
        for user, per_item in added.items():
            key = k.repeats(user)
            for item, count in per_item.items():
                pipe.hincrby(key, item, count)
            if user in fresh_window:
                pipe.expire(key, repeat_window)
        for earlier, later in coview.items():
            key = k.coview(earlier)
            for item in later:
                pipe.zincrby(key, 1, item)
            pipe.zremrangebyrank(key, 0, -cfg.coview_cap - 1)
            pipe.expire(key, cfg.coview_ttl)
        for item in dict.fromkeys(items[r] for r in accepted_rows):
            pipe.expire(k.coview(item), cfg.coview_ttl)
        pipe.execute()
        return weights, firsts
