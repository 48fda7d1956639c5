"""Online assets: push what the batch loop computed to the Redis features the service reads."""

import dagster as dg
import polars as pl
from pydantic import Field

from assets.models import TrainedHybrid
from assets.resources import EXTERNAL_RETRY, RedisFeaturesResource
from feature_repo.definitions import ITEM_ITEM_LIST

GROUP = "online"


class OnlineConfig(dg.Config):
    embedding_neighbors: int = Field(default=50, description="Item2Vec neighbours per item.")
    push_when_not_promoted: bool = Field(
        default=False, description="Push even when the gate kept the old champion."
    )


@dg.asset(group_name=GROUP, compute_kind="redis", retry_policy=EXTERNAL_RETRY)
def online_features(
    context: dg.AssetExecutionContext,
    config: OnlineConfig,
    redis: RedisFeaturesResource,
    champion_gate: dict,
    hybrid_ranker: TrainedHybrid,
    item_neighbors: pl.DataFrame,
    batch_recommendations: pl.DataFrame,
) -> dg.MaterializeResult:
    """Before a promotion: item-item lists, embedding neighbours and batch candidates to Redis.

    Runs just before `registered_model` registers and promotes the model (registration is the
    run's last step). When the gate keeps the old champion, nothing is pushed: Redis keeps
    matching what serves.
    """
    if not champion_gate["promote"] and not config.push_when_not_promoted:
        context.log.info(f"the gate keeps the champion ({champion_gate['reason']}): nothing pushed")
        return dg.MaterializeResult(metadata={"pushed": False})
    store = redis.store()
    counts = {"item_item_lists": store.push_item_lists(ITEM_ITEM_LIST, item_neighbors)}
    bundle = hybrid_ranker.final
    if "item2vec" in bundle.components:
        embedding = bundle.item_neighbors(k=config.embedding_neighbors, component="item2vec")
        counts["embedding_lists"] = store.push_item_neighbors(embedding)
    counts["batch_candidate_users"] = store.push_batch_candidates(batch_recommendations)
    return dg.MaterializeResult(metadata={"pushed": True, **counts})


@dg.asset(group_name=GROUP, compute_kind="redis", retry_policy=EXTERNAL_RETRY)
def online_popularity(
    redis: RedisFeaturesResource, popularity_snapshot: pl.DataFrame
) -> dg.MaterializeResult:
    """The hourly decayed popularity, pushed for the service's cold-start and trending lists."""
    written = redis.store().push_popularity(popularity_snapshot.select("item_id", "score"))
    return dg.MaterializeResult(metadata={"items": written})


@dg.asset(group_name=GROUP, compute_kind="redis", retry_policy=EXTERNAL_RETRY)
def online_catalog(
    redis: RedisFeaturesResource, item_catalog: pl.DataFrame
) -> dg.MaterializeResult:
    """The item catalog into the live catalog the service ranks with (stock, price, category,
    brand, title); items and attributes the file lacks keep what POST /items wrote."""
    written = redis.store().write_catalog(item_catalog) if item_catalog.height else 0
    return dg.MaterializeResult(metadata={"items": written})
