"""`FeatureStore`, the one object callers hold: the ingest, the request reads and the offline
pushes of one namespace, with the backend for the kind of Redis client chosen in one place."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import redis
from redis.cluster import RedisCluster

from feature_repo.definitions import FeatureConfig, Keys
from feature_repo.ingest import ClusterIngest, Ingest, SingleNodeIngest
from feature_repo.pushes import Pushes
from feature_repo.reads import ClusterReads, Reads
from feature_repo.scripts import Scripts
from feature_repo.types import (
    CatalogRead,
    FeatureRequest,
    GlobalLists,
    IngestResult,
    RequestFeatures,
    ScoredItems,
    TrendList,
    UserProfile,
)


class FeatureStore:
    """Real-time features of one namespace on one Redis server or a Redis Cluster.

    On one server, an ingest or a request read is one Lua script (one round trip, atomic). On a
    cluster the same updates are plain commands grouped per slot, in three round trips. The
    methods only delegate: to `Ingest`, `Reads` (the service) and `Pushes` (the batch loop); a
    facade rather than mixins, so each part sees only the client, keys and config it needs and
    the backend is picked once, here, instead of in every method.
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        namespace: str,
        config: FeatureConfig | None = None,
        cluster: bool | None = None,
    ) -> None:
        """`cluster` forces the Redis Cluster backends on any client (the tests run both paths
        on one server); by default they serve a `RedisCluster` client."""
        self.redis = client
        self.keys = Keys(namespace)
        self.config = config or FeatureConfig()
        self.scripts = Scripts(client)
        if cluster is None:
            cluster = isinstance(client, RedisCluster)
        ingest: type[Ingest] = ClusterIngest if cluster else SingleNodeIngest
        reads: type[Reads] = ClusterReads if cluster else Reads
        self._ingest = ingest(self.scripts, self.keys, self.config)
        self._reads = reads(self.scripts, self.keys, self.config)
        self._pushes = Pushes(client, self.keys, self.config)

    @property
    def namespace(self) -> str:
        return self.keys.namespace

    def take_tokens(
        self, buckets: Sequence[tuple[str, float, float, int]]
    ) -> tuple[int, list[int]]:
        """Tokens from each of `buckets` (name, rate per second, capacity, tokens wanted), from
        all or none, in one round trip: (0, tokens taken from each, at least 1 and at most what
        was wanted) when every bucket had one, else (milliseconds until all have one, [])."""
        keys = [self.keys.rate_limit(b[0]) for b in buckets]
        args = [f"{v:.17g}" for _, rate, capacity, want in buckets for v in (rate, capacity, want)]
        answer = self.scripts.run("RATE_LIMIT", keys, args)
        return int(answer[0]), [int(n) for n in answer[1:]]

    # -- ingest (POST /events) ---------------------------------------------------------------

    def ingest(self, events: pl.DataFrame, now: float | None = None) -> IngestResult:
        """See `Ingest.ingest`: apply a batch of validated events, duplicates changing nothing."""
        return self._ingest.ingest(events, now)

    # -- reads on the request path -------------------------------------------------------------

    def read_request(self, request: FeatureRequest, *, now: float | None = None) -> RequestFeatures:
        """See `Reads.read_request`: everything one recommendation request reads."""
        return self._reads.read_request(request, now=now)

    def cache_response(
        self, user_id: str, signature: str, body: str, now: float | None = None
    ) -> None:
        """See `Reads.cache_response`."""
        self._reads.cache_response(user_id, signature, body, now)

    def global_lists(self, n: int, now: float | None = None) -> GlobalLists:
        """See `Reads.global_lists`."""
        return self._reads.global_lists(n, now)

    def catalog(
        self, item_ids: Sequence[str], attributes: Sequence[str], count_users: bool = False
    ) -> CatalogRead:
        """See `Reads.catalog`."""
        return self._reads.catalog(item_ids, attributes, count_users)

    def write_catalog(self, frame: pl.DataFrame, now: float | None = None) -> int:
        """See `Pushes.write_catalog` (POST /items and the online_catalog asset)."""
        return self._pushes.write_catalog(frame, now)

    def item_lists(
        self, item_ids: Sequence[str], names: Sequence[str], k: int
    ) -> dict[str, list[ScoredItems]]:
        """See `Reads.item_lists`."""
        return self._reads.item_lists(item_ids, names, k)

    def recent_items(self, user_id: str, n: int | None = None) -> ScoredItems:
        """See `Reads.recent_items`."""
        return self._reads.recent_items(user_id, n)

    def counters(self, user_id: str) -> dict[str, float]:
        """See `Reads.counters`."""
        return self._reads.counters(user_id)

    def user_profile(self, user_id: str) -> UserProfile:
        """See `Reads.user_profile`."""
        return self._reads.user_profile(user_id)

    def trending_items(self, k: int, category: str | None = None) -> TrendList:
        """See `Reads.trending_items`."""
        return self._reads.trending_items(k, category)

    # -- offline pushes (the batch loop) -------------------------------------------------------

    def push_item_lists(self, name: str, frame: pl.DataFrame) -> int:
        """See `Pushes.push_item_lists`."""
        return self._pushes.push_item_lists(name, frame)

    def push_item_neighbors(self, frame: pl.DataFrame) -> int:
        """See `Pushes.push_item_neighbors`."""
        return self._pushes.push_item_neighbors(frame)

    def push_batch_candidates(self, frame: pl.DataFrame) -> int:
        """See `Pushes.push_batch_candidates`."""
        return self._pushes.push_batch_candidates(frame)

    def push_popularity(self, frame: pl.DataFrame) -> int:
        """See `Pushes.push_popularity`."""
        return self._pushes.push_popularity(frame)

    def push_user_profiles(self, frame: pl.DataFrame, now: float | None = None) -> int:
        """See `Pushes.push_user_profiles`."""
        return self._pushes.push_user_profiles(frame, now)

    def push_trends(
        self,
        items: pl.DataFrame,
        categories: pl.DataFrame | None = None,
        analysed_at: float | None = None,
        now: float | None = None,
    ) -> dict[str, int]:
        """See `Pushes.push_trends`."""
        return self._pushes.push_trends(items, categories, analysed_at, now)
