"""Ingestion assets: the events in the event store and the item catalog."""

import dagster as dg
import polars as pl
from pydantic import Field

from assets.resources import EXTERNAL_RETRY, EventStoreResource, LocalStateResource
from feature_repo.event_store import without_users
from training.data import DataValidationError, load_catalog, load_events
from training.evaluation import to_markdown
from training.events import EARLIEST_TIMESTAMP
from training.matrix import decayed_popularity, usable_events


class EventImportConfig(dg.Config):
    """Optionally import a file into the event store before reading it back."""

    events_path: str = Field(default="", description="CSV/Parquet events file to import first.")
    skip_invalid: bool = Field(default=False, description="Drop malformed rows (and count them).")
    earliest_timestamp: int = Field(
        default=EARLIEST_TIMESTAMP,
        description="Events before this (epoch seconds) are invalid. The contract's 2000-01-01 "
        "catches unit mistakes; lower it only for a historical dataset (MovieLens 100k).",
    )


class CatalogImportConfig(dg.Config):
    """Optionally replace the stored item catalog with a file."""

    catalog_path: str = Field(default="", description="CSV/Parquet catalog file to import.")
    skip_invalid: bool = Field(default=False, description="Drop malformed rows (and count them).")


def _span(events: pl.DataFrame) -> str:
    lo, hi = events["timestamp"].min(), events["timestamp"].max()
    fmt = "%Y-%m-%d %H:%M"
    start = pl.from_epoch(pl.Series([lo]), time_unit="s").dt.strftime(fmt)[0]
    end = pl.from_epoch(pl.Series([hi]), time_unit="s").dt.strftime(fmt)[0]
    return f"{start} .. {end} UTC"


@dg.asset(group_name="ingestion", compute_kind="polars", retry_policy=EXTERNAL_RETRY)
def raw_events(
    context: dg.AssetExecutionContext,
    config: EventImportConfig,
    event_store: EventStoreResource,
) -> dg.Output[pl.DataFrame]:
    """Every event in the event store (after importing `events_path`, when given)."""
    imported = skipped = 0
    limits = event_store.limits(config.earliest_timestamp)
    with event_store.open() as store:
        if config.events_path:
            try:
                loaded = load_events(
                    config.events_path,
                    skip_invalid=config.skip_invalid,
                    keep_context=True,
                    limits=limits,
                )
            except (DataValidationError, FileNotFoundError) as exc:
                # The file is at fault, not the store: a retry would fail the same way.
                raise dg.Failure(str(exc), allow_retries=False) from exc
            skipped = loaded.skipped
            imported = store.append(loaded.frame)
            context.log.info(
                f"imported {imported} new events from {config.events_path} "
                f"({loaded.frame.height - imported} already stored, {skipped} invalid skipped)"
            )
        events = store.read()
        # Forgotten users never reach a model: their events were deleted, and any that reached
        # the store another way (an old import) are left out here.
        stored = events.height
        events = without_users(events, store.suppressed())
        suppressed = stored - events.height
    # Stored before the contract (or its bounds) changed: left out of training, counted.
    events, out_of_contract = usable_events(events, limits)
    if events.is_empty():
        raise dg.Failure(
            "the event store is empty: import events first "
            "(recsys pipeline --events PATH, or POST /events and recsys consume)",
            allow_retries=False,
        )
    counts = events.group_by("event_type").len().sort("len", descending=True)
    return dg.Output(
        events,
        metadata={
            "rows": events.height,
            "users": events["user_id"].n_unique(),
            "items": events["item_id"].n_unique(),
            "span": _span(events),
            "imported": imported,
            "skipped_invalid": skipped,
            "stored_out_of_contract": out_of_contract,
            "suppressed_user_events": suppressed,
            "event_types": dg.MetadataValue.md(
                "\n".join(f"- {r[0]}: {r[1]}" for r in counts.iter_rows())
            ),
        },
    )


@dg.asset(group_name="ingestion", compute_kind="polars")
def item_catalog(
    context: dg.AssetExecutionContext, config: CatalogImportConfig, state: LocalStateResource
) -> dg.Output[pl.DataFrame]:
    """The item catalog (category, brand, price, stock); empty when none was imported."""
    skipped = 0
    if config.catalog_path:
        loaded = load_catalog(config.catalog_path, skip_invalid=config.skip_invalid)
        skipped = loaded.skipped
        state.write_catalog(loaded.frame)
        context.log.info(f"imported {loaded.frame.height} items from {config.catalog_path}")
    catalog = state.read_catalog()
    return dg.Output(
        catalog,
        metadata={
            "items": catalog.height,
            "categories": catalog["category"].n_unique() if catalog.height else 0,
            "skipped_invalid": skipped,
        },
    )


class PopularityConfig(dg.Config):
    half_life_days: float = Field(default=7.0, description="Half-life of an event's weight.")


@dg.asset(group_name="ingestion", compute_kind="polars")
def popularity_snapshot(
    config: PopularityConfig, raw_events: pl.DataFrame
) -> dg.Output[pl.DataFrame]:
    """Time-decayed weighted popularity per item (refreshed hourly), most popular first."""
    table = decayed_popularity(raw_events, config.half_life_days)
    return dg.Output(
        table,
        metadata={"items": table.height, "top": dg.MetadataValue.md(to_markdown(table.head(10)))},
    )
