"""What the service reads on the request path, and the response cache: one script a read on a
single Redis node (`Reads`); per-slot where a read spans items on Redis Cluster (`ClusterReads`)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import numpy as np

from feature_repo.definitions import CATALOG_FIELDS, FeatureConfig, Keys
from feature_repo.scripts import Scripts
from feature_repo.types import (
    EMPTY,
    CatalogRead,
    FeatureRequest,
    GlobalLists,
    RequestFeatures,
    ScoredItems,
    TrendList,
    UserProfile,
    json_object,
    number,
    pairs,
    scored,
)


class Reads:
    """Request reads of one namespace on one Redis node."""

    def __init__(self, scripts: Scripts, keys: Keys, config: FeatureConfig) -> None:
        self.scripts = scripts
        self.redis = scripts.redis  # the scripts' client: plain commands go the same way
        self.keys, self.config = keys, config
        self._event_types = set(config.event_weights)

    def read_request(self, request: FeatureRequest, *, now: float | None = None) -> RequestFeatures:
        """The cached response for the request's signature if fresh, else its features (see
        `FeatureRequest`), the profile parsed: one round trip."""
        names = list(request.list_names)
        user_id = request.user_id
        now = time.time() if now is None else now
        keys = self.keys
        head, tail = keys.affixes(keys.item_prefix)
        suffixes = [
            (keys.coview("\0") if name == "coview" else keys.item_list("\0", name))[
                len(keys.item_prefix("\0")) :
            ]
            for name in names
        ]
        reply = self.scripts.run(
            "REQUEST_READ",
            [
                keys.cache(user_id),
                keys.recent(user_id),
                keys.candidates(user_id),
                keys.profile(user_id),
            ],
            [
                request.signature,
                repr(float(now)),
                self.config.cache_ttl,
                request.n_recent,
                request.n_candidates,
                request.n_anchors,
                request.k,
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
            name: [scored(flat[a * per + j]) for a in range(anchors)]
            for j, name in enumerate(names)
        }
        profile = UserProfile.from_hash(user_id, reply[3])
        return RequestFeatures(None, scored(reply[1]), scored(reply[2]), lists, profile)

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
        pop, trend, batch, refs, version = self.scripts.run(
            "GLOBAL_READ",
            [k.popularity, k.trending, k.batch_popularity, k.decay, k.catalog_meta],
            [n],
        )
        popularity, trending = scored(pop), scored(trend)
        cfg = self.config
        if refs[0] is not None and len(popularity):
            factor = math.exp(-cfg.popularity_rate * (now - float(refs[0])))
            popularity = ScoredItems(popularity.ids, popularity.scores * factor)
        if refs[1] is not None and len(trending):
            factor = math.exp(-cfg.trending_rate * (now - float(refs[1])))
            trending = ScoredItems(trending.ids, trending.scores * factor)
        return GlobalLists(popularity, trending, scored(batch), version)

    def catalog(
        self, item_ids: Sequence[str], attributes: Sequence[str], count_users: bool = False
    ) -> CatalogRead:
        """The live catalog's `attributes` (of CATALOG_FIELDS; `in_stock` is always read: it
        marks an item as known) of `item_ids`, and with `count_users` the distinct users of the
        items it lacks: one round trip."""
        wanted = ["in_stock", *(a for a in dict.fromkeys(attributes) if a != "in_stock")]
        unknown = set(wanted) - set(CATALOG_FIELDS)
        if unknown:
            raise ValueError(f"not catalog attributes: {sorted(unknown)}")
        keys = self.keys
        head, tail = keys.affixes(keys.item_users)
        reply = self.scripts.run(
            "CATALOG_READ",
            [keys.catalog(a) for a in wanted],
            ["1" if count_users else "0", head, tail, *item_ids],
        )
        users = reply[-1] if count_users else [None] * len(item_ids)
        return CatalogRead(
            int(reply[0]),
            dict(zip(wanted, reply[1:-1], strict=True)),
            [None if u is None else int(u) for u in users],
        )

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
        replies = self._tops(all_keys, k)
        n = len(item_ids)
        return {
            name: [scored(replies[j * n + i]) for i in range(n)] for j, name in enumerate(names)
        }

    def _tops(self, keys: list[str], k: int) -> list:
        """Top-k of each sorted set in `keys`, each flat [member, score, ...]."""
        return self.scripts.run("MULTI_TOP", keys, [k])

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
        out = {name: float(value) for name, value in raw.items() if name in self._event_types}
        if raw:
            out["events"] = sum(out.values())
            if "last_seen" in raw:
                out["last_seen"] = float(raw["last_seen"])
        return out

    def user_profile(self, user_id: str) -> UserProfile:
        """The user's segment, scores and preferences (segment `unknown` if never profiled)."""
        return UserProfile.from_hash(user_id, self.redis.hgetall(self.keys.profile(user_id)))

    def trending_items(self, k: int, category: str | None = None) -> TrendList:
        """The k items with the highest trend_score (of one category, or of all), with their
        trend info, the categories' trends and the push metadata: one round trip."""
        keys = self.keys
        target = keys.trend_items if category is None else keys.trend_category(category)
        top, info, cats, meta = self.scripts.run(
            "TREND_READ",
            [target, keys.trend_info, keys.trend_categories, keys.trend_meta],
            [max(int(k), 0), category or ""],
        )
        items = scored(top) if k > 0 else EMPTY
        details = [json_object(raw) for raw in info[: len(items)]]
        categories = [
            {"category": name, **json_object(raw)} for name, raw in pairs(cats) if raw is not None
        ]
        categories.sort(key=lambda c: (-float(c.get("trend_score") or 0.0), c["category"]))
        stamps = dict(pairs(meta))
        return TrendList(
            items,
            details,
            categories,
            number(stamps.get("analysed_at"), float),
            number(stamps.get("pushed_at"), float),
        )


class ClusterReads(Reads):
    """On Redis Cluster a script may touch one slot: the user's keys are one script, the
    per-item lists (each item its own slot) plain commands in a pipeline."""

    def read_request(self, request: FeatureRequest, *, now: float | None = None) -> RequestFeatures:
        names = list(request.list_names)
        # No anchors: the script reads the user's keys only, one slot.
        own = dataclasses.replace(request, n_anchors=0, list_names=())
        found = super().read_request(own, now=now)
        if found.cached is not None:
            return found
        anchors = list(found.recent.ids[: request.n_anchors])
        k = request.k
        lists = self.item_lists(anchors, names, k) if anchors else {n: [] for n in names}
        return RequestFeatures(None, found.recent, found.candidates, lists, found.profile)

    def _tops(self, keys: list[str], k: int) -> list:
        # The keys live in different slots, and a cluster pipeline runs no scripts.
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.zrevrange(key, 0, k - 1, withscores=True)
        return [[x for pair in r for x in pair] for r in pipe.execute()]
