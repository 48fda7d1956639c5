"""The one reader of the real-time features a request needs: list names, cache signature, the
request's read (or its cached answer), the worker's cached global lists, and the degraded path."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from feature_repo.definitions import CATALOG_FIELDS, ITEM_ITEM_LIST, NEIGHBORS_LIST
from feature_repo.store import FeatureStore
from feature_repo.types import CatalogRead, FeatureRequest, GlobalLists, ScoredItems
from serving import lists
from serving.bundle import ServingModel
from serving.catalog import (
    CatalogCache,
    CatalogPolicy,
    ItemAttributes,
    item_attributes,
)
from serving.errors import DependencyUnavailable
from serving.metrics import ServiceMetrics
from serving.outage import REDIS_DOWN, Outage
from serving.personalise import trend_reasons
from serving.ranking import LiveFeatures
from serving.schemas import RecommendRequest
from serving.settings import ServingSettings

T = TypeVar("T")
NO_ITEMS = ScoredItems(np.empty(0, dtype=object), np.empty(0))
_NO_LISTS = GlobalLists(NO_ITEMS, NO_ITEMS, NO_ITEMS)


@dataclass(frozen=True)
class RequestRead:
    """What one /recommend request read: its cached answer, or the features to rank with."""

    signature: str
    cached: str | None = None
    live: LiveFeatures = LiveFeatures()
    degraded: bool = False


def list_names(model: ServingModel | None) -> list[str]:
    """The per-item lists a request reads: co-view always, pushed lists the model lacks."""
    names = ["coview"]
    if model is None or "item2vec" not in model.components:
        names.append(NEIGHBORS_LIST)
    if model is None or model.item_item is None:
        names.append(ITEM_ITEM_LIST)
    return names


def cache_signature(
    model: ServingModel | None,
    body: RecommendRequest,
    catalog_version: str | None = None,
    label: str | None = None,
) -> str:
    """What a cached answer of the user must match: the model serving them and the label of
    its answer (variant and experiment), the request and the live catalog's version (any stock
    or price change retires every cached answer)."""
    variant = label or (model.variant if model is not None else "popularity")
    version = model.version if model is not None else None
    filters = body.filters.model_dump_json() if body.filters else ""
    fields = ",".join(body.fields) if body.fields else ""
    return (
        f"{variant}|{version}|{body.k}|{int(body.exclude_seen)}|{filters}|{fields}|"
        f"{catalog_version}"
    )


class FeatureReader:
    """Reads Redis for the service, skipping it while it is known to be down."""

    def __init__(
        self,
        store: Callable[[], FeatureStore],
        settings: ServingSettings,
        outage: Outage,
        metrics: ServiceMetrics,
        champion: Callable[[], ServingModel | None] = lambda: None,
    ) -> None:
        # A callable: the service opens its store on first use, not at start.
        self._store = store
        # The model whose frozen catalog gates the shared global lists.
        self._champion = champion
        self.settings = settings
        self.policy = CatalogPolicy(settings.allow_new_items, settings.new_item_min_users)
        self._catalog = CatalogCache()
        self.outage = outage
        self.metrics = metrics
        self._global: tuple[float, GlobalLists] | None = None
        self._refreshing = threading.Lock()
        self._refresher: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        self._trends: tuple[float, ScoredItems, np.ndarray] | None = None

    def store(self) -> FeatureStore:
        """The service's feature store (opened on first use)."""
        return self._store()

    def unavailable(self, what: str) -> DependencyUnavailable:
        """The 503 of an answer that needs Redis while it is down."""
        return DependencyUnavailable(
            f"Redis is unavailable and {what}; retry later", self.outage.retry_after
        )

    def live(self, read: Callable[[], T]) -> T | None:
        """`read()` of Redis, or None while Redis is down (then no request waits on it)."""
        if self.outage.down:
            self.metrics.degraded.inc()
            return None
        try:
            return read()
        except REDIS_DOWN as exc:
            self.outage.failed(exc)
            self.metrics.degraded.inc()
            return None

    def global_lists(self, now: float | None = None) -> tuple[GlobalLists, bool]:
        """Popularity and trending, shared by every request of this worker for a few ms, and
        whether they are degraded: while Redis is down, the last lists read (or none).

        Lists older than `global_lists_ttl` are read again by a background thread while the
        requests go on with them, up to twice that age; older (an idle worker, or a refresh
        stuck) the request reads them itself. On the request path, the read and its catalog
        gate (20 times a second) took a sixth of a busy worker's time."""
        now = time.time() if now is None else now
        cached = self._global
        ttl = self.settings.global_lists_ttl
        if cached is not None:
            age = now - cached[0]
            if age < ttl:
                return cached[1], False
            if age < 2 * ttl and not self.outage.down:
                self._refresh_in_background()
                return cached[1], False
        found = self._read_global(now)
        if found is None:
            return (cached[1] if cached is not None else _NO_LISTS), True
        return found, False

    def _read_global(self, now: float) -> GlobalLists | None:
        """Read and gate the global lists, keep them; None while Redis is down."""
        # Deeper than the ranker needs: /popular filters it by category.
        depth = max(500, self.settings.candidates_per_source)
        found = self.live(lambda: self._gated_lists(self._store().global_lists(depth, now)))
        if found is not None:
            self._global = (now, found)
        return found

    def _refresh_in_background(self) -> None:
        """Wake the thread that reads the lists (started on first use; a thread per refresh
        cost the request more than the read, waiting for it to start)."""
        if self._refresher is None:
            with self._refreshing:
                if self._refresher is None:
                    self._refresher = threading.Thread(
                        target=self._refresh_loop, name="global-lists", daemon=True
                    )
                    self._refresher.start()
        self._wake.set()

    def _refresh_loop(self) -> None:
        while True:
            self._wake.wait()
            if self._closed:
                return
            self._wake.clear()
            cached = self._global
            now = time.time()
            # Woken by several requests at once: one read serves them.
            if cached is None or now - cached[0] >= self.settings.global_lists_ttl:
                self._read_global(now)

    def close(self) -> None:
        """Stop the background thread (the worker's shutdown)."""
        self._closed = True
        self._wake.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)

    def _gated_lists(self, found: GlobalLists) -> GlobalLists:
        """The global lists without the items the catalog gate refuses, before any list is cut
        to size, so a refused item takes no other item's place."""
        parts = (found.popularity, found.trending, found.batch_popularity)
        ids = np.unique(np.concatenate([np.asarray(p.ids, dtype=str) for p in parts]))
        if not len(ids):
            return found
        read = self._catalog_read(ids, found.catalog_version)
        allowed = ids[item_attributes(ids, read, self._champion(), self.policy).known]
        if len(allowed) == len(ids):
            return found
        masks = [np.isin(np.asarray(p.ids, dtype=str), allowed) for p in parts]
        kept = [ScoredItems(p.ids[m], p.scores[m]) for p, m in zip(parts, masks, strict=True)]
        return GlobalLists(*kept, found.catalog_version)

    def attributes(self, ids: np.ndarray, model: ServingModel | None) -> ItemAttributes:
        """Catalog attributes and the gate of `ids`: the worker's copy of the live catalog for
        the version its global lists last read (Redis only for items it has not seen since the
        last write), the model's frozen catalog alone while Redis is down."""
        version = self._global[1].catalog_version if self._global is not None else None
        return item_attributes(ids, self._catalog_read(ids, version), model, self.policy)

    def known(self, ids: np.ndarray, model: ServingModel | None) -> np.ndarray:
        """Which of `ids` the catalog gate lets through."""
        return self.attributes(ids, model).known

    def _catalog_read(self, ids: np.ndarray, version: str | None) -> CatalogRead | None:
        store = self._store
        if self.policy.allow_new_items:
            # Distinct-user counts move with every event: read them with the values each time.
            return self.live(lambda: store().catalog(ids.tolist(), CATALOG_FIELDS, True))
        return self._catalog.read(
            ids,
            version,
            lambda missing: self.live(lambda: store().catalog(missing, CATALOG_FIELDS)),
        )

    def trend_list(self, now: float) -> tuple[ScoredItems, np.ndarray]:
        """The trend analysis' top items and their reasons, reused for `trends_ttl` seconds (the
        analysis runs hourly)."""
        cached = self._trends
        if cached is not None and now - cached[0] < self.settings.trends_ttl:
            return cached[1], cached[2]
        found = self._store().trending_items(self.settings.candidates_per_source)
        items, reasons = found.items, trend_reasons(found.info)
        if len(items):
            keep = self.known(np.asarray(items.ids, dtype=str), self._champion())
            items, reasons = ScoredItems(items.ids[keep], items.scores[keep]), reasons[keep]
        self._trends = (now, items, reasons)
        return items, reasons

    def for_request(
        self,
        body: RecommendRequest,
        model: ServingModel | None,
        now: float,
        label: str | None = None,
    ) -> RequestRead:
        """The user's cached answer (of the same `label`: variant and experiment), else the
        features to rank with; degraded (no live features) while Redis is down, which only a
        model can answer."""
        signature = cache_signature(model, body, label=label)
        read = RequestRead(signature, degraded=self.outage.down)
        # While Redis is known to be down the request does not wait on it.
        if not read.degraded:
            try:
                # The worker's global lists (read every few ms) carry the catalog's version.
                glob, _ = self.global_lists(now)
                signature = cache_signature(model, body, glob.catalog_version, label)
                read = self._read(body, model, signature, now)
            except REDIS_DOWN as exc:
                # Without Redis the model still answers; the response just lacks live signals.
                self.outage.failed(exc)
                read = RequestRead(signature, degraded=True)
        if read.degraded:
            if model is None:
                raise self.unavailable("no model is loaded")
            self.metrics.degraded.inc()
            # The last lists read, else the model's own popularity: a visitor the model does not
            # know still gets items while Redis is down.
            last = self._global[1] if self._global is not None else _NO_LISTS
            top = self.settings.candidates_per_source
            read = RequestRead(
                signature,
                live=LiveFeatures(popularity=lists.popular(last, model, top, None)),
                degraded=True,
            )
        return read

    def _read(
        self, body: RecommendRequest, model: ServingModel | None, signature: str, now: float
    ) -> RequestRead:
        store, settings = self._store(), self.settings
        request = FeatureRequest(
            user_id=body.user_id,
            signature=signature,
            n_recent=store.config.recent_cap,
            n_candidates=settings.candidates_per_source,
            n_anchors=settings.anchors,
            list_names=tuple(list_names(model)),
            k=settings.per_anchor,
        )
        found = store.read_request(request, now=now)
        if found.cached is not None:
            self.metrics.cache.labels("hit").inc()
            return RequestRead(signature, cached=found.cached)
        self.metrics.cache.labels("miss").inc()
        glob, degraded = self.global_lists(now)  # the worker's copy, read just before
        top = settings.candidates_per_source
        # Topped up from the model's popularity when the live lists are short (a new Redis).
        popularity = lists.popular(glob, model, top, None)
        trend, reasons = self.trend_list(now)
        live = LiveFeatures(
            recent=found.recent,
            candidates=found.candidates,
            popularity=popularity,
            trending=ScoredItems(glob.trending.ids[:top], glob.trending.scores[:top]),
            trend=trend,
            trend_reasons=reasons,
            profile=found.profile,
            coview=found.lists.get("coview", []),
            neighbors=found.lists.get(NEIGHBORS_LIST, []),
            item_item=found.lists.get(ITEM_ITEM_LIST, []),
        )
        return RequestRead(signature, live=live, degraded=degraded)

    def cache_answer(self, user_id: str, read: RequestRead, payload: str, now: float) -> None:
        """Keep a fresh answer for the user's next identical request (not a degraded one)."""
        if not read.degraded and self.settings.cache_ttl > 0:
            self.live(lambda: self._store().cache_response(user_id, read.signature, payload, now))
