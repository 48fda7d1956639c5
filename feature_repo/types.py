"""The values the feature store hands its callers: scored item lists, request features, user
profiles, trend lists and ingest results (plain data, no Redis)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from feature_repo.definitions import UNKNOWN_SEGMENT


class ScoredItems(NamedTuple):
    """Item ids (best first) and their scores, as numpy arrays."""

    ids: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


EMPTY = ScoredItems(np.empty(0, dtype=str), np.empty(0, dtype=np.float64))


def scored(flat: Sequence[str] | None) -> ScoredItems:
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
        raw = dict(flat) if isinstance(flat, Mapping) else dict(pairs(flat))
        if not raw.get("segment"):
            return cls(user_id)
        values: dict[str, object] = {}
        for name in ("r_score", "f_score", "m_score"):
            values[name] = number(raw.get(name), int)
        for name in ("engagement", "churn_risk", "lifetime_value", "price_percentile"):
            values[name] = number(raw.get(name), float)
        try:
            preferences = json.loads(raw.get("preferences") or "{}")
        except ValueError:
            preferences = {}
        return cls(
            user_id,
            segment=raw["segment"],
            rfm=raw.get("rfm") or None,
            preferences=preferences if isinstance(preferences, dict) else {},
            updated_at=number(raw.get("updated_at"), float),
            **values,  # type: ignore[arg-type]
        )


def number(raw: str | None, kind: type) -> int | float | None:
    """A stored number as `kind`, None when missing, unparsable or not finite."""
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
class FeatureRequest:
    """What one recommendation request reads: the user's cached answer under `signature`, or
    up to `n_recent` recent items, `n_candidates` batch candidates, the profile, and the top `k`
    of each of `list_names` (`coview` or an offline list) of the newest `n_anchors` recent items."""

    user_id: str
    signature: str
    n_recent: int
    n_candidates: int
    n_anchors: int = 0
    list_names: tuple[str, ...] = ()
    k: int = 0


@dataclass(frozen=True)
class RequestFeatures:
    """A user's features for one request, and the per-item lists of the newest recent items."""

    cached: str | None
    recent: ScoredItems
    candidates: ScoredItems
    lists: dict[str, list[ScoredItems]]
    profile: UserProfile | None = None  # None with a cached answer


@dataclass(frozen=True)
class GlobalLists:
    """Decayed popularity and trending (scores as of `now`), and the batch loop's popularity."""

    popularity: ScoredItems
    trending: ScoredItems
    batch_popularity: ScoredItems
    catalog_version: str | None = None  # the live catalog's version (None before any write)


@dataclass(frozen=True)
class CatalogRead:
    """The live catalog's attributes of some items, as read: `size` items in the catalog, per
    attribute asked the stored strings aligned with the ids (None where the item has none), and
    per item the distinct users of those the catalog lacks (None when not counted)."""

    size: int
    values: dict[str, list[str | None]]
    users: list[int | None]


def pairs(flat: Sequence[str]) -> zip:
    """(field, value) pairs of a flat HGETALL reply."""
    return zip(flat[0::2], flat[1::2], strict=True)


def json_object(raw: str | None) -> dict:
    """A JSON object stored by a push, {} when missing or not an object."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
