"""The service's tunables, read from the environment when the service starts (never at import)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

# The design's blend when the training run gives no weights: co-view 0.4, embedding 0.3,
# popularity 0.2, recency 0.1. Trending, the batch loop's candidates and its pushed item-item
# lists join with smaller shares.
DEFAULT_BLEND: dict[str, float] = {
    "coview": 0.4,
    "item2vec": 0.3,
    "popularity": 0.2,
    "recency": 0.1,
    "trending": 0.1,
    "batch": 0.2,
    "itemitem": 0.2,
}
# Sources whose weight comes from the training run when a model is loaded.
MODEL_SOURCES = ("als", "item2vec", "ease", "itemknn", "popularity")
# Share of the blend the trained components take together; live sources keep the rest.
DEFAULT_MODEL_SHARE = 0.5


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a number") from exc


@dataclass(frozen=True)
class ServingSettings:
    """Everything the request path can be tuned by; see docs/serving.md for each variable."""

    blend_overrides: dict[str, float] = field(default_factory=dict)
    model_share: float = DEFAULT_MODEL_SHARE
    challenger_share: float = 0.1
    poll_seconds: float = 30.0
    cache_ttl: int = 60
    max_future_seconds: float = 300.0
    max_body_bytes: int = 1_048_576
    global_lists_ttl: float = 0.05
    candidates_per_source: int = 100
    anchors: int = 10
    per_anchor: int = 20
    recency_half_life: float = 6 * 3600.0
    freshness_boost: float = 0.1
    category_cap: float = 0.4

    @classmethod
    def from_env(cls) -> ServingSettings:
        raw = os.environ.get("RECSYS_BLEND_WEIGHTS", "")
        overrides: dict[str, float] = {}
        if raw.strip():
            try:
                parsed = json.loads(raw)
                overrides = {str(k): float(v) for k, v in parsed.items()}
            except (ValueError, AttributeError, TypeError) as exc:
                raise ValueError(
                    f'RECSYS_BLEND_WEIGHTS must be a JSON object like {{"coview": 0.4}}: {raw!r}'
                ) from exc
        settings = cls(
            blend_overrides=overrides,
            model_share=_float("RECSYS_MODEL_SHARE", DEFAULT_MODEL_SHARE),
            challenger_share=_float("RECSYS_CHALLENGER_SHARE", 0.1),
            poll_seconds=_float("RECSYS_MODEL_POLL_SECONDS", 30.0),
            cache_ttl=int(_float("RECSYS_CACHE_TTL", 60)),
            max_future_seconds=_float("RECSYS_MAX_FUTURE_SECONDS", 300.0),
            max_body_bytes=int(_float("RECSYS_MAX_BODY_BYTES", 1_048_576)),
            global_lists_ttl=_float("RECSYS_GLOBAL_LISTS_TTL", 0.05),
        )
        if not 0.0 <= settings.challenger_share <= 1.0:
            raise ValueError("RECSYS_CHALLENGER_SHARE must be between 0 and 1")
        if not 0.0 <= settings.model_share <= 1.0:
            raise ValueError("RECSYS_MODEL_SHARE must be between 0 and 1")
        return settings


def blend_weights(settings: ServingSettings, trained: dict[str, float] | None) -> dict[str, float]:
    """Per-source weights: the training run's for model components, the defaults for the rest.

    The trained weights are rescaled to `model_share` in total; `popularity` is served from the
    live decayed popularity, with the weight the training run gave the popularity component.
    Explicit RECSYS_BLEND_WEIGHTS entries win over both.
    """
    weights = dict(DEFAULT_BLEND)
    if trained:
        usable = {k: max(float(v), 0.0) for k, v in trained.items() if k in MODEL_SOURCES}
        total = sum(usable.values())
        if total > 0:
            for name in MODEL_SOURCES:
                weights.pop(name, None)
            # The loaded model supersedes its own batch output and pushed item-item lists.
            weights.pop("batch", None)
            weights.pop("itemitem", None)
            for name, value in usable.items():
                weights[name] = settings.model_share * value / total
    weights.update(settings.blend_overrides)
    return {k: v for k, v in weights.items() if v > 0}
