"""The one implementation of every real-time feature update and read, over Redis: an event
batch is one round trip (the INGEST script), and so is the read of a recommendation request."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import polars as pl
import redis

from feature_repo import scripts
from feature_repo.definitions import NEIGHBORS_LIST, FeatureConfig, Keys

# Columns of the event contract, in the order the stream payload carries them.
EVENT_COLUMNS = ("user_id", "item_id", "event_type", "timestamp", "value", "session_id", "event_id")
_PUSH_CHUNK = 500


class ScoredItems(NamedTuple):
    """Item ids (best first) and their scores, as numpy arrays."""

    ids: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


EMPTY = ScoredItems(np.empty(0, dtype=str), np.empty(0, dtype=np.float64))


def _scored(flat: Sequence[str] | None) -> ScoredItems:
    """A flat [member, score, member, score, ...] reply as arrays (ids as a numpy str array)."""
    if not flat:
        return EMPTY
    return ScoredItems(np.array(flat[0::2], dtype=str), np.array(flat[1::2], dtype=np.float64))


@dataclass(frozen=True)
class IngestResult:
    """What a batch did: how many events were new, which rows were duplicates, new items."""

    accepted: int
    duplicates: int
    duplicate_rows: np.ndarray
    new_items: int


@dataclass(frozen=True)
class UserState:
    """A user's features for one request: a cached response, or recent items and candidates."""

    cached: str | None
    recent: ScoredItems
    candidates: ScoredItems


@dataclass(frozen=True)
class RequestFeatures:
    """A user's features for one request, and the per-item lists of the newest recent items."""

    cached: str | None
    recent: ScoredItems
    candidates: ScoredItems
    lists: dict[str, list[ScoredItems]]


@dataclass(frozen=True)
class GlobalLists:
    """Decayed popularity and trending (scores as of `now`), and the batch loop's popularity."""

    popularity: ScoredItems
    trending: ScoredItems
    batch_popularity: ScoredItems


class FeatureStore:
    """Real-time features of one namespace on one Redis server or a Redis Cluster.

    On one server, an ingest or a request read is one Lua script (one round trip, atomic). On
    a cluster (`sharded`, the default for a RedisCluster client) the same updates are plain
    commands grouped per slot by the pipeline, in three round trips.
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        config: FeatureConfig | None = None,
        sharded: bool | None = None,
    ) -> None:
        self.redis = client
        self.keys = Keys(namespace)
        self.config = config or FeatureConfig()
        self.sharded = isinstance(client, redis.RedisCluster) if sharded is None else sharded
        self._shas: dict[str, str] = {}
        cfg = self.config
        self._cfg_json = json.dumps(
            {
                "recent_cap": cfg.recent_cap,
                "coview_items": cfg.coview_window_items,
                "coview_seconds": cfg.coview_window_seconds,
                "coview_cap": cfg.coview_cap,
                "coview_ttl": cfg.coview_ttl,
                "counters_ttl": cfg.counters_ttl,
                "recent_ttl": cfg.recent_ttl,
                "dedupe_ttl": cfg.dedupe_ttl,
                "pop_rate": cfg.popularity_rate,
                "trend_rate": cfg.trending_rate,
            }
        )
        self._weights = {k: float(v) for k, v in cfg.event_weights.items()}

    @property
    def namespace(self) -> str:
        return self.keys.namespace

    # -- scripts -------------------------------------------------------------------------------

    def _eval(self, name: str, keys: Sequence[str], args: Sequence[object]) -> object:
        """EVALSHA a script of `feature_repo.scripts`, loading it first when Redis lacks it."""
        sha = self._shas.get(name)
        if sha is not None:
            try:
                return self.redis.evalsha(sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                pass  # Redis restarted or SCRIPT FLUSH ran: load it again below.
        sha = self.redis.script_load(getattr(scripts, name))
        self._shas[name] = sha
        return self.redis.evalsha(sha, len(keys), *keys, *args)

    # -- ingest --------------------------------------------------------------------------------

    def event_weights(self, events: pl.DataFrame) -> np.ndarray:
        """Confidence of each event: its type's weight, a rating's value (never negative)."""
        etype = pl.col("event_type").cast(pl.String)
        weight = (
            pl.when(etype == "rating")
            .then(pl.col("value").fill_null(1.0).clip(lower_bound=0.0))
            .otherwise(etype.replace_strict(self._weights, default=1.0, return_dtype=pl.Float64))
        )
        return events.select(weight.alias("w"))["w"].to_numpy()

    def ingest(self, events: pl.DataFrame, now: float | None = None) -> IngestResult:
        """Apply a batch of validated events (the event contract, event_id set) in one round trip.

        New events update every feature and are appended to the stream; events whose event_id
        was ingested within `dedupe_ttl` are reported as duplicates and change nothing.
        """
        if events.is_empty():
            return IngestResult(0, 0, np.empty(0, dtype=np.int64), 0)
        if events["event_id"].null_count():
            raise ValueError("every event needs an event_id; fill them with with_event_ids()")
        now = time.time() if now is None else now
        frame = events.select(
            pl.col("user_id").cast(pl.String),
            pl.col("item_id").cast(pl.String),
            pl.col("event_type").cast(pl.String),
            pl.col("timestamp").cast(pl.Int64),
            pl.col("value").cast(pl.Float64),
            pl.col("session_id").cast(pl.String),
            pl.col("event_id").cast(pl.String),
        )
        batch = {
            "e": frame["event_id"].to_list(),
            "u": frame["user_id"].to_list(),
            "i": frame["item_id"].to_list(),
            "t": frame["event_type"].to_list(),
            "ts": frame["timestamp"].to_list(),
            "w": self.event_weights(frame).tolist(),
        }
        # One JSON document per event for the stream; JSON escapes newlines inside strings, so
        # splitting the NDJSON text on "\n" is exact.
        payloads = frame.write_ndjson().split("\n")[: frame.height]
        if self.sharded:
            return self._ingest_sharded(frame, batch, payloads, now)
        k = self.keys
        reply = self._eval(
            "INGEST",
            [k.popularity, k.trending, k.decay, k.first_seen, k.stats, k.stream],
            [k.namespace, repr(float(now)), self._cfg_json, json.dumps(batch), *payloads],
        )
        accepted, new_items, *dups = reply
        return IngestResult(
            int(accepted), len(dups), np.asarray(dups, dtype=np.int64), int(new_items)
        )

    def _ingest_sharded(
        self, frame: pl.DataFrame, batch: dict[str, list], payloads: list[str], now: float
    ) -> IngestResult:
        """The ingest as plain commands, for Redis Cluster, where a script may touch one slot.

        Round trip 1 appends every event to the stream (so an event is durable before it is
        marked seen; the event store drops the duplicates this lets through). Round trip 2 marks
        event ids seen (SET NX) and reads the users' recent items. Round trip 3 writes the user
        and co-view updates, worked out here exactly as the INGEST script does them; the
        {global} updates are one script in their slot.
        """
        k, cfg = self.keys, self.config
        users, items, types, stamps = batch["u"], batch["i"], batch["t"], batch["ts"]
        pipe = self.redis.pipeline(transaction=False)
        for payload in payloads:
            pipe.xadd(k.stream, {"e": payload})
        pipe.execute()

        distinct = list(dict.fromkeys(users))
        pipe = self.redis.pipeline(transaction=False)
        for user, event_id in zip(users, batch["e"], strict=True):
            pipe.set(k.seen_event(user, event_id), "1", nx=True, ex=cfg.dedupe_ttl)
        for user in distinct:
            pipe.zrange(k.recent(user), 0, -1, withscores=True)
        replies = pipe.execute()
        new = np.array([bool(r) for r in replies[: len(users)]], dtype=bool)
        recent = {u: dict(pairs) for u, pairs in zip(distinct, replies[len(users) :], strict=True)}

        coview: dict[str, list[str]] = {}
        counts: dict[str, dict[str, int]] = {}
        touched: dict[str, dict[str, int]] = {}
        for row in np.flatnonzero(new).tolist():
            user, item, ts = users[row], items[row], stamps[row]
            state = recent[user]
            if item not in state:
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
        for earlier, later in coview.items():
            key = k.coview(earlier)
            for item in later:
                pipe.zincrby(key, 1, item)
            pipe.zremrangebyrank(key, 0, -cfg.coview_cap - 1)
            pipe.expire(key, cfg.coview_ttl)
        accepted_rows = np.flatnonzero(new).tolist()
        for item in dict.fromkeys(items[r] for r in accepted_rows):
            pipe.expire(k.coview(item), cfg.coview_ttl)
        pipe.execute()

        accepted = {name: [batch[name][r] for r in accepted_rows] for name in ("i", "ts", "w")}
        new_items = self._eval(
            "INGEST_GLOBAL",
            [k.popularity, k.trending, k.decay, k.first_seen, k.stats],
            [
                repr(float(now)),
                self._cfg_json,
                json.dumps(accepted),
                len(accepted_rows),
                len(users) - len(accepted_rows),
            ],
        )
        duplicates = np.flatnonzero(~new)
        return IngestResult(len(accepted_rows), len(duplicates), duplicates, int(new_items))

    # -- reads on the request path ---------------------------------------------------------------

    def read_user(
        self,
        user_id: str,
        signature: str,
        n_recent: int,
        n_candidates: int,
        now: float | None = None,
    ) -> UserState:
        """The cached response for `signature` if fresh, else recent items and batch candidates."""
        now = time.time() if now is None else now
        k = self.keys
        reply = self._eval(
            "USER_READ",
            [k.cache(user_id), k.recent(user_id), k.candidates(user_id)],
            [signature, repr(float(now)), self.config.cache_ttl, n_recent, n_candidates],
        )
        if reply[0] is not None:
            return UserState(reply[0], EMPTY, EMPTY)
        return UserState(None, _scored(reply[1]), _scored(reply[2]))

    def read_request(
        self,
        user_id: str,
        signature: str,
        n_recent: int,
        n_candidates: int,
        n_anchors: int,
        list_names: Sequence[str],
        k: int,
        now: float | None = None,
    ) -> RequestFeatures:
        """`read_user` plus the top-k of each list (`coview` or an offline list name) of the
        user's newest `n_anchors` recent items: one round trip on a single Redis node."""
        names = list(list_names)
        if self.sharded:
            state = self.read_user(user_id, signature, n_recent, n_candidates, now)
            if state.cached is not None:
                return RequestFeatures(state.cached, EMPTY, EMPTY, {})
            anchors = list(state.recent.ids[:n_anchors])
            lists = self.item_lists(anchors, names, k) if anchors else {n: [] for n in names}
            return RequestFeatures(None, state.recent, state.candidates, lists)
        now = time.time() if now is None else now
        keys = self.keys
        head = keys.item_prefix("\0")
        head, tail = head.split("\0")
        suffixes = [
            (keys.coview("\0") if name == "coview" else keys.item_list("\0", name))[
                len(keys.item_prefix("\0")) :
            ]
            for name in names
        ]
        reply = self._eval(
            "REQUEST_READ",
            [keys.cache(user_id), keys.recent(user_id), keys.candidates(user_id)],
            [
                signature,
                repr(float(now)),
                self.config.cache_ttl,
                n_recent,
                n_candidates,
                n_anchors,
                k,
                head,
                tail,
                *suffixes,
            ],
        )
        if reply[0] is not None:
            return RequestFeatures(reply[0], EMPTY, EMPTY, {})
        flat = reply[3:]
        per = len(names)
        anchors = len(flat) // per if per else 0
        lists = {
            name: [_scored(flat[a * per + j]) for a in range(anchors)]
            for j, name in enumerate(names)
        }
        return RequestFeatures(None, _scored(reply[1]), _scored(reply[2]), lists)

    def cache_response(
        self, user_id: str, signature: str, body: str, now: float | None = None
    ) -> None:
        """Keep a response for `cache_ttl` seconds, until the user's next event deletes it."""
        now = time.time() if now is None else now
        key = self.keys.cache(user_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, signature, f"{now!r}|{body}")
        pipe.expire(key, self.config.cache_ttl)
        pipe.execute()

    def global_lists(self, n: int, now: float | None = None) -> GlobalLists:
        """Top-n popular (decayed to `now`), trending and batch-popular items, one round trip."""
        now = time.time() if now is None else now
        k = self.keys
        pop, trend, batch, refs = self._eval(
            "GLOBAL_READ", [k.popularity, k.trending, k.batch_popularity, k.decay], [n]
        )
        popularity, trending = _scored(pop), _scored(trend)
        cfg = self.config
        if refs[0] is not None and len(popularity):
            factor = math.exp(-cfg.popularity_rate * (now - float(refs[0])))
            popularity = ScoredItems(popularity.ids, popularity.scores * factor)
        if refs[1] is not None and len(trending):
            factor = math.exp(-cfg.trending_rate * (now - float(refs[1])))
            trending = ScoredItems(trending.ids, trending.scores * factor)
        return GlobalLists(popularity, trending, _scored(batch))

    def popular(self, k: int, now: float | None = None) -> ScoredItems:
        """The k most popular items by decayed live popularity, else by the batch loop's."""
        lists = self.global_lists(k, now)
        return lists.popularity if len(lists.popularity) else lists.batch_popularity

    def trending(self, k: int, now: float | None = None) -> ScoredItems:
        """The k items with the highest short-half-life score."""
        return self.global_lists(k, now).trending

    def item_lists(
        self, item_ids: Sequence[str], names: Sequence[str], k: int
    ) -> dict[str, list[ScoredItems]]:
        """Top-k of per-item lists (`coview` or an offline list name) for several items at once."""
        keys = self.keys
        names = list(names)
        all_keys = [
            keys.coview(item) if name == "coview" else keys.item_list(item, name)
            for name in names
            for item in item_ids
        ]
        if not all_keys:
            return {name: [] for name in names}
        if self.sharded:
            # The keys live in different slots, and a cluster pipeline runs no scripts.
            pipe = self.redis.pipeline(transaction=False)
            for key in all_keys:
                pipe.zrevrange(key, 0, k - 1, withscores=True)
            replies = [[x for pair in r for x in pair] for r in pipe.execute()]
        else:
            replies = self._eval("MULTI_TOP", all_keys, [k])
        n = len(item_ids)
        return {
            name: [_scored(replies[j * n + i]) for i in range(n)] for j, name in enumerate(names)
        }

    def coviewed(self, item_ids: Sequence[str], k: int) -> list[ScoredItems]:
        """Items most often co-viewed after each of `item_ids`, with counts."""
        return self.item_lists(item_ids, ["coview"], k)["coview"]

    def recent_items(self, user_id: str, n: int | None = None) -> ScoredItems:
        """The user's recent items, newest first, scored by the epoch time of the latest event."""
        stop = (n or self.config.recent_cap) - 1
        flat = self.redis.zrevrange(self.keys.recent(user_id), 0, stop, withscores=True)
        if not flat:
            return EMPTY
        return ScoredItems(
            np.array([m for m, _ in flat], dtype=str),
            np.array([s for _, s in flat], dtype=np.float64),
        )

    def counters(self, user_id: str) -> dict[str, float]:
        """Events per event_type, `events` in total and `last_seen` of a user ({} if none)."""
        raw = self.redis.hgetall(self.keys.counters(user_id))
        out = {name: float(value) for name, value in raw.items() if name in self._weights}
        if raw:
            out["events"] = sum(out.values())
            if "last_seen" in raw:
                out["last_seen"] = float(raw["last_seen"])
        return out

    def first_seen(self, item_ids: Sequence[str]) -> np.ndarray:
        """Epoch seconds of each item's first live event, NaN for items never seen live."""
        if not len(item_ids):
            return np.empty(0, dtype=np.float64)
        values = self.redis.hmget(self.keys.first_seen, list(item_ids))
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)

    def stats(self) -> dict[str, int]:
        """Deployment counters: accepted, duplicates, new_items."""
        return {name: int(value) for name, value in self.redis.hgetall(self.keys.stats).items()}

    # -- offline pushes (the batch loop, after a promotion) ------------------------------------

    def push_item_lists(self, name: str, frame: pl.DataFrame) -> int:
        """Replace per-item lists `name` from `item_id, neighbor_id, score`; returns items written.

        Each item's list is swapped in atomically (written aside, then RENAMEd); lists of items
        absent from `frame` expire after `offline_ttl`.
        """
        if not name or any(c in name for c in "{}: "):
            raise ValueError(f"invalid list name {name!r}")
        self._require(frame, ("item_id", "neighbor_id", "score"))
        keys = self.keys
        return self._push_grouped(
            frame, "item_id", "neighbor_id", lambda item: keys.item_list(item, name)
        )

    def push_item_neighbors(self, frame: pl.DataFrame) -> int:
        """Replace the `neighbors` lists (embedding neighbours): `item_id, neighbor_id, score`."""
        return self.push_item_lists(NEIGHBORS_LIST, frame)

    def push_batch_candidates(self, frame: pl.DataFrame) -> int:
        """Replace users' batch candidates from `user_id, item_id, score`; returns users written."""
        self._require(frame, ("user_id", "item_id", "score"))
        return self._push_grouped(frame, "user_id", "item_id", self.keys.candidates)

    def push_popularity(self, frame: pl.DataFrame) -> int:
        """Replace the batch loop's popularity from `item_id, score`; returns items written."""
        self._require(frame, ("item_id", "score"))
        target = self.keys.batch_popularity
        staging = target + ":staging"
        ids = frame["item_id"].cast(pl.String).to_list()
        scores = frame["score"].cast(pl.Float64).to_list()
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(staging)
        for start in range(0, len(ids), _PUSH_CHUNK * 10):
            stop = start + _PUSH_CHUNK * 10
            pipe.zadd(staging, dict(zip(ids[start:stop], scores[start:stop], strict=True)))
        if ids:
            pipe.expire(staging, self.config.offline_ttl)
            pipe.rename(staging, target)
        else:
            pipe.delete(target)
        pipe.execute()
        return len(ids)

    def _push_grouped(self, frame: pl.DataFrame, owner: str, member: str, key_of) -> int:
        grouped = (
            frame.select(
                pl.col(owner).cast(pl.String),
                pl.col(member).cast(pl.String),
                pl.col("score").cast(pl.Float64),
            )
            .group_by(owner, maintain_order=True)
            .agg(member, "score")
        )
        ttl = self.config.offline_ttl
        owners = grouped[owner].to_list()
        members = grouped[member].to_list()
        scores = grouped["score"].to_list()
        for start in range(0, len(owners), _PUSH_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for i in range(start, min(start + _PUSH_CHUNK, len(owners))):
                key = key_of(owners[i])
                staging = key + ":staging"
                pipe.delete(staging)
                pipe.zadd(staging, dict(zip(members[i], scores[i], strict=True)))
                pipe.expire(staging, ttl)
                pipe.rename(staging, key)
            pipe.execute()
        return len(owners)

    @staticmethod
    def _require(frame: pl.DataFrame, columns: Sequence[str]) -> None:
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(
                f"frame lacks column(s) {', '.join(missing)}; has {', '.join(frame.columns)}"
            )
