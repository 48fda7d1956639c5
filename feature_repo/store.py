"""The one implementation of every real-time feature update and read, over Redis: an event
batch is one round trip (the INGEST script), and so is the read of a recommendation request."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import polars as pl
import redis

from feature_repo import scripts
from feature_repo.definitions import (
    NEIGHBORS_LIST,
    PROFILE_FIELDS,
    TREND_INFO_FIELDS,
    UNKNOWN_SEGMENT,
    FeatureConfig,
    Keys,
)

_PUSH_CHUNK = 500
_MEMBER_CHUNK = 5000


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
class UserProfile:
    """A user's segment, scores and preferences from the daily segmentation (`unknown` when the
    batch loop has not profiled the user)."""

    user_id: str
    segment: str = UNKNOWN_SEGMENT
    r_score: int | None = None
    f_score: int | None = None
    m_score: int | None = None
    rfm: str | None = None
    engagement: float | None = None
    churn_risk: float | None = None
    lifetime_value: float | None = None
    price_percentile: float | None = None
    preferences: dict = field(default_factory=dict)
    updated_at: float | None = None

    @property
    def known(self) -> bool:
        return self.segment != UNKNOWN_SEGMENT

    @classmethod
    def from_hash(cls, user_id: str, flat: Sequence[str] | Mapping[str, str] | None) -> UserProfile:
        """A profile from an HGETALL reply: a mapping, or a flat [field, value, ...] list."""
        if not flat:
            return cls(user_id)
        raw = dict(flat) if isinstance(flat, Mapping) else dict(_pairs(flat))
        if not raw.get("segment"):
            return cls(user_id)
        values: dict[str, object] = {}
        for name in ("r_score", "f_score", "m_score"):
            values[name] = _number(raw.get(name), int)
        for name in ("engagement", "churn_risk", "lifetime_value", "price_percentile"):
            values[name] = _number(raw.get(name), float)
        try:
            preferences = json.loads(raw.get("preferences") or "{}")
        except ValueError:
            preferences = {}
        return cls(
            user_id,
            segment=raw["segment"],
            rfm=raw.get("rfm") or None,
            preferences=preferences if isinstance(preferences, dict) else {},
            updated_at=_number(raw.get("updated_at"), float),
            **values,  # type: ignore[arg-type]
        )


def _number(raw: str | None, kind: type) -> int | float | None:
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return int(value) if kind is int else value


@dataclass(frozen=True)
class TrendList:
    """Top items of a trend list (best first) with each item's trend info, the categories'
    trends (all, or the one asked for) and when the analysis ran; empty before any push."""

    items: ScoredItems
    info: list[dict]
    categories: list[dict]
    analysed_at: float | None = None
    pushed_at: float | None = None

    def __len__(self) -> int:
        return len(self.items)


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
    profile: Sequence[str] | None = None  # the profile hash, flat; UserProfile.from_hash reads it


@dataclass(frozen=True)
class RequestFeatures:
    """A user's features for one request, and the per-item lists of the newest recent items."""

    cached: str | None
    recent: ScoredItems
    candidates: ScoredItems
    lists: dict[str, list[ScoredItems]]
    profile: Sequence[str] | None = None  # the profile hash, flat; UserProfile.from_hash reads it


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
        if "context" not in events.columns:
            events = events.with_columns(pl.lit(None, dtype=pl.String).alias("context"))
        frame = events.select(
            pl.col("user_id").cast(pl.String),
            pl.col("item_id").cast(pl.String),
            pl.col("event_type").cast(pl.String),
            pl.col("timestamp").cast(pl.Int64),
            pl.col("value").cast(pl.Float64),
            pl.col("session_id").cast(pl.String),
            pl.col("event_id").cast(pl.String),
            pl.col("context").cast(pl.String),
        )
        prefix, suffix = self.keys.seen_event_affixes()
        batch = {
            "k": frame.select((prefix + pl.col("event_id") + suffix).alias("k"))["k"].to_list(),
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
        for key in batch["k"]:
            pipe.set(key, "1", nx=True, ex=cfg.dedupe_ttl)
        for user in distinct:
            pipe.zrange(k.recent(user), 0, -1, withscores=True)
        replies = pipe.execute()
        new = np.array([bool(r) for r in replies[: len(users)]], dtype=bool)
        recent = {u: dict(pairs) for u, pairs in zip(distinct, replies[len(users) :], strict=True)}

        coview: dict[str, list[str]] = {}
        counts: dict[str, dict[str, int]] = {}
        touched: dict[str, dict[str, int]] = {}
        accepted_rows = np.flatnonzero(new).tolist()
        for row in accepted_rows:
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
            [k.cache(user_id), k.recent(user_id), k.candidates(user_id), k.profile(user_id)],
            [signature, repr(float(now)), self.config.cache_ttl, n_recent, n_candidates],
        )
        if reply[0] is not None:
            return UserState(reply[0], EMPTY, EMPTY)
        return UserState(None, _scored(reply[1]), _scored(reply[2]), reply[3])

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
            return RequestFeatures(None, state.recent, state.candidates, lists, state.profile)
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
            [
                keys.cache(user_id),
                keys.recent(user_id),
                keys.candidates(user_id),
                keys.profile(user_id),
            ],
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
        flat = reply[4:]
        per = len(names)
        anchors = len(flat) // per if per else 0
        lists = {
            name: [_scored(flat[a * per + j]) for a in range(anchors)]
            for j, name in enumerate(names)
        }
        return RequestFeatures(None, _scored(reply[1]), _scored(reply[2]), lists, reply[3])

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

    # -- analytics: user profiles and trend lists ----------------------------------------------

    def user_profile(self, user_id: str) -> UserProfile:
        """The user's segment, scores and preferences (segment `unknown` if never profiled)."""
        return UserProfile.from_hash(user_id, self.redis.hgetall(self.keys.profile(user_id)))

    def trending_items(self, k: int, category: str | None = None) -> TrendList:
        """The k items with the highest trend_score (of one category, or of all), with their
        trend info, the categories' trends and the push metadata: one round trip."""
        keys = self.keys
        target = keys.trend_items if category is None else keys.trend_category(category)
        top, info, cats, meta = self._eval(
            "TREND_READ",
            [target, keys.trend_info, keys.trend_categories, keys.trend_meta],
            [max(int(k), 0), category or ""],
        )
        items = _scored(top) if k > 0 else EMPTY
        details = [_loads(raw) for raw in info[: len(items)]]
        categories = [
            {"category": name, **_loads(raw)} for name, raw in _pairs(cats) if raw is not None
        ]
        categories.sort(key=lambda c: (-float(c.get("trend_score") or 0.0), c["category"]))
        stamps = dict(_pairs(meta))
        return TrendList(
            items,
            details,
            categories,
            _number(stamps.get("analysed_at"), float),
            _number(stamps.get("pushed_at"), float),
        )

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

    def push_user_profiles(self, frame: pl.DataFrame, now: float | None = None) -> int:
        """Write profiles from `user_id, segment` and any other of `PROFILE_FIELDS`
        (`preferences` as a JSON string or a struct); returns the users written.

        Every field is written each time (empty when unknown), so a profile never mixes two
        pushes; profiles of users absent from `frame` expire after `profile_ttl`. Pipelined in
        chunks of users: no round trip per user.
        """
        self._require(frame, ("user_id", "segment"))
        now = time.time() if now is None else now
        values = []
        for name in PROFILE_FIELDS:
            if name == "updated_at":
                expr = pl.lit(repr(float(now)))
            elif name not in frame.columns:
                expr = pl.lit("")
            else:
                expr = pl.col(name)
                dtype = frame.schema[name]
                if isinstance(dtype, pl.Struct):
                    expr = expr.struct.json_encode()
                elif dtype.is_float():
                    expr = expr.fill_nan(None)
                expr = expr.cast(pl.String).fill_null("")
            values.append(expr.alias(name))
        table = (
            frame.select(pl.col("user_id").cast(pl.String), *values)
            .filter(pl.col("user_id").is_not_null() & (pl.col("segment") != ""))
            .unique("user_id", keep="last", maintain_order=True)
        )
        users = table["user_id"].to_list()
        rows = table.drop("user_id").rows()
        profile, ttl = self.keys.profile, self.config.profile_ttl
        for start in range(0, len(users), _PUSH_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            stop = start + _PUSH_CHUNK
            for user, row in zip(users[start:stop], rows[start:stop], strict=True):
                key = profile(user)
                pipe.hset(key, items=_interleave(PROFILE_FIELDS, row))
                pipe.expire(key, ttl)
            pipe.execute()
        return len(users)

    def push_trends(
        self,
        items: pl.DataFrame,
        categories: pl.DataFrame | None = None,
        analysed_at: float | None = None,
        now: float | None = None,
    ) -> dict[str, int]:
        """Replace the trend lists from the trend analysis' `items` (`item_id, trend_score`,
        `category` and the other `TREND_INFO_FIELDS` when present) and `categories` tables.

        The global list and one list per category keep the `trend_list_cap` items with the
        highest positive trend_score; lists, info and metadata are written aside and swapped in
        together, and categories no longer present are deleted. Returns counts written.
        """
        self._require(items, ("item_id", "trend_score"))
        now = time.time() if now is None else now
        cfg, keys = self.config, self.keys
        frame = items.select(
            pl.col("item_id").cast(pl.String),
            pl.col("trend_score").cast(pl.Float64),
            *_info_columns(items),
        ).filter(
            pl.col("item_id").is_not_null()
            & pl.col("trend_score").is_finite()
            & (pl.col("trend_score") > 0)
        )
        frame = frame.unique("item_id", keep="first", maintain_order=True)
        ranked = frame.sort(["trend_score", "item_id"], descending=[True, False])
        top = ranked.head(cfg.trend_list_cap)
        per_category = ranked.filter(pl.int_range(pl.len()).over("category") < cfg.trend_list_cap)
        listed = pl.concat([top.select("item_id"), per_category.select("item_id")]).unique()
        info = frame.join(listed, on="item_id", how="semi").select(
            "item_id", _json_of(frame.columns, exclude=("item_id", "trend_score"))
        )
        cats = (
            categories.select(
                pl.col("category").cast(pl.String).fill_null(UNKNOWN_SEGMENT),
                pl.col("trend_score").cast(pl.Float64).fill_nan(None).round(4),
                *[c for c in _info_columns(categories) if c.meta.output_name() != "category"],
            )
            if categories is not None and "category" in categories.columns
            else pl.DataFrame({"category": []}, schema={"category": pl.String})
        )
        cats = cats.unique("category", keep="first", maintain_order=True)
        cat_json = cats.select("category", _json_of(cats.columns, exclude=("category",)))
        groups = per_category.group_by("category", maintain_order=True).agg(
            "item_id", "trend_score"
        )
        names = groups["category"].to_list()

        def staged(key: str) -> str:
            return key + ":staging"

        previous = self.redis.hget(keys.trend_meta, "lists")
        old_names = set(json.loads(previous)) if previous else set()
        writes: list[tuple[str, list, list]] = [
            (keys.trend_items, top["item_id"].to_list(), top["trend_score"].to_list()),
            *(
                (keys.trend_category(n), ids, scores)
                for n, ids, scores in zip(
                    names, groups["item_id"].to_list(), groups["trend_score"].to_list(), strict=True
                )
            ),
        ]
        hashes = [
            (keys.trend_info, info["item_id"].to_list(), info["info"].to_list()),
            (keys.trend_categories, cat_json["category"].to_list(), cat_json["info"].to_list()),
        ]
        pipe = self.redis.pipeline(transaction=False)
        for key, *_ in writes + hashes:
            pipe.delete(staged(key))
        for key, ids, scores in writes:
            for start in range(0, len(ids), _MEMBER_CHUNK):
                stop = start + _MEMBER_CHUNK
                pipe.zadd(staged(key), dict(zip(ids[start:stop], scores[start:stop], strict=True)))
        for key, fields, texts in hashes:
            for start in range(0, len(fields), _MEMBER_CHUNK):
                stop = start + _MEMBER_CHUNK
                pipe.hset(
                    staged(key),
                    items=_interleave(fields[start:stop], texts[start:stop]),
                )
        pipe.execute()
        # The swap: every key is in the `{global}` slot, so one MULTI also works on a cluster.
        pipe = self.redis.pipeline(transaction=True)
        for key, ids, _ in writes + hashes:
            if ids:
                pipe.expire(staged(key), cfg.trends_ttl)
                pipe.rename(staged(key), key)
            else:
                pipe.delete(key)
        for name in sorted(old_names - set(names)):
            pipe.delete(keys.trend_category(name))
        pipe.delete(keys.trend_meta)
        pipe.hset(
            keys.trend_meta,
            mapping={
                "analysed_at": repr(float(analysed_at if analysed_at is not None else now)),
                "pushed_at": repr(float(now)),
                "items": top.height,
                "categories": cats.height,
                "lists": json.dumps(names),
            },
        )
        pipe.expire(keys.trend_meta, cfg.trends_ttl)
        pipe.execute()
        return {
            "trend_items": top.height,
            "category_lists": len(names),
            "items_with_info": info.height,
            "categories": cats.height,
        }

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


def _loads(raw: str | None) -> dict:
    """A JSON object stored by a push, {} when missing or not an object."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _info_columns(frame: pl.DataFrame) -> list[pl.Expr]:
    """The `TREND_INFO_FIELDS` a trend table has, typed for compact JSON (floats rounded)."""
    out = []
    for name in TREND_INFO_FIELDS:
        if name not in frame.columns:
            continue
        expr = pl.col(name)
        dtype = frame.schema[name]
        if dtype.is_float():
            expr = expr.fill_nan(None).round(4)
        elif name == "category":
            expr = expr.cast(pl.String).fill_null(UNKNOWN_SEGMENT)
        out.append(expr.alias(name))
    if "category" not in frame.columns:
        out.insert(0, pl.lit(UNKNOWN_SEGMENT).alias("category"))
    return out


def _json_of(columns: Sequence[str], exclude: Sequence[str]) -> pl.Expr:
    fields = [c for c in columns if c not in exclude]
    if not fields:
        return pl.lit("{}").alias("info")
    return pl.struct(fields).struct.json_encode().alias("info")


def _pairs(flat: Sequence[str]) -> zip:
    """(field, value) pairs of a flat HGETALL reply."""
    return zip(flat[0::2], flat[1::2], strict=True)


def _interleave(names: Sequence[str], values: Sequence[object]) -> list:
    """[name, value, name, value, ...] for HSET."""
    return [x for pair in zip(names, values, strict=True) for x in pair]
