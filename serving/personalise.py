"""Segment-aware re-ranking: the boosts a user's segment earns each candidate (vectorised over
the pool), and the reasons shown for the trend analysis' items."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from feature_repo.types import UserProfile
from serving.catalog import ItemAttributes
from serving.settings import SegmentRule

# Below this gain a boost is too small to mention in the reason.
MENTION = 0.01
_PART_LABELS = {
    "price": "low price in its category",
    "brand": "one of your brands",
    "category": "one of your categories",
    "trend": "trending",
}


@dataclass(frozen=True)
class SegmentBoost:
    """Per pool position: the factor on the blended score and which boosts applied."""

    segment: str
    multiplier: np.ndarray
    parts: dict[str, np.ndarray] = field(default_factory=dict)  # boost name -> gain per position

    def note(self, position: int) -> str:
        """`; <segment> boost: <what>` for a position, or '' when no boost is worth naming."""
        applied = [_PART_LABELS[n] for n, gain in self.parts.items() if gain[position] >= MENTION]
        return f"; {self.segment} boost: {', '.join(applied)}" if applied else ""


def segment_boost(
    rule: SegmentRule,
    profile: UserProfile,
    attrs: ItemAttributes,
    trend: np.ndarray | None,
) -> SegmentBoost:
    """The boosts of `rule` over the candidate pool, on its catalog attributes (live first,
    the model's frozen catalog behind): items without a price, brand or category get none of
    that boost; the trend boost scales with the item's normalised trend score.
    """
    size = len(attrs.known)
    parts: dict[str, np.ndarray] = {}
    if rule.price > 0:
        pct = attrs.price_percentile
        parts["price"] = rule.price * np.nan_to_num(
            np.clip(1.0 - pct / rule.price_cutoff, 0.0, 1.0), nan=0.0
        )
    preferences = profile.preferences
    for name, values, per_item in (
        ("brand", preferences.get("top_brands"), attrs.brand),
        ("category", preferences.get("top_categories"), attrs.category),
    ):
        weight = getattr(rule, name)
        if weight > 0 and isinstance(values, list) and values:
            wanted = np.asarray([str(v) for v in values], dtype=object)
            parts[name] = weight * np.isin(per_item, wanted) * (per_item != "")
    if rule.trend > 0 and trend is not None:
        parts["trend"] = rule.trend * trend
    multiplier = 1.0 + sum(parts.values(), np.zeros(size))
    return SegmentBoost(profile.segment, multiplier, parts)


def trend_reasons(info: list[dict]) -> np.ndarray:
    """The reason shown for each item of the trend analysis' list, from its trend info."""
    out = np.empty(len(info), dtype=object)
    for position, item in enumerate(info):
        if item.get("burst"):
            out[position] = "going viral"
        elif item.get("trend_type") == "rising":
            out[position] = "rising this week"
        else:
            out[position] = "popular this week"
    return out
