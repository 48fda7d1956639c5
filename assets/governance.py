"""Data-governance assets: retention of the event store and of the batch recommendations."""

import time

import dagster as dg

from assets.resources import EXTERNAL_RETRY, EventStoreResource

GROUP = "governance"
DAY = 86_400


@dg.asset(group_name=GROUP, compute_kind="sql", retry_policy=EXTERNAL_RETRY)
def retention_cleanup(
    context: dg.AssetExecutionContext, event_store: EventStoreResource
) -> dg.MaterializeResult:
    """Events and impressions (`recommendation_logs`) older than the configured age
    (`retention_days`; 0 keeps every one) and batch recommendations past their `expires_at`,
    deleted; the counts in the metadata."""
    now = time.time()
    days = event_store.retention_days
    cutoff = int(now - days * DAY) if days > 0 else None
    with event_store.open() as store:
        # Impressions first, to count them: delete_events_before removes the old ones too.
        impressions = store.delete_impressions_before(cutoff) if cutoff is not None else 0
        events = store.delete_events_before(cutoff) if cutoff is not None else 0
        recommendations = store.delete_expired_recommendations(now)
    policy = f"events older than {days:g} days" if cutoff is not None else "events kept (off)"
    context.log.info(
        f"retention ({policy}): {events} events, {impressions} impressions and {recommendations} "
        "expired recommendations deleted"
    )
    return dg.MaterializeResult(
        metadata={
            "deleted_events": events,
            "deleted_impressions": impressions,
            "deleted_expired_recommendations": recommendations,
            "retention_days": float(days),
            "cutoff_timestamp": cutoff if cutoff is not None else -1,
        }
    )
