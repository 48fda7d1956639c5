"""`recsys consume`: moves events and impressions from the Redis stream into the event store
(`events`, `recommendation_logs`) through a consumer group, acknowledging only stored entries
(at-least-once delivery + idempotent store = once).

Late events of a forgotten user (still in the stream when they were forgotten) are dropped by
the store's append itself, against the suppression list of that moment (in the INSERT on
PostgreSQL, under the writers' lock in the embedded store): no cached copy can be stale, and a
dropped event is acknowledged like a stored one."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from config import get_settings
from feature_repo.connection import connect
from feature_repo.event_store import EventStore, open_event_store
from feature_repo.stream import EventStream, StreamBatch

log = logging.getLogger("recsys.consumer")


@dataclass
class ConsumerStats:
    """What a run did: batches and entries handled, events and impressions newly stored."""

    batches: int = 0
    entries: int = 0
    stored: int = 0
    impressions: int = 0
    claimed: int = 0
    started: float = field(default_factory=time.time)


def default_consumer_name() -> str:
    """Stable per host, so a restarted consumer finds its own pending entries."""
    return get_settings().consumer.consumer_name()


def run_consumer(
    stop_event: threading.Event | None = None,
    max_batches: int | None = None,
    batch_size: int = 1000,
    block_ms: int = 1000,
    consumer: str | None = None,
    claim_idle_ms: int = 60_000,
    store: EventStore | None = None,
    stream: EventStream | None = None,
    idle_exit: bool = False,
) -> ConsumerStats:
    """Consume until `stop_event` is set, `max_batches` batches were stored, or (idle_exit) the
    stream has nothing left; returns the run's counts.

    On start the consumer re-reads its own unacknowledged entries (a restart under the same
    name), then regularly claims entries other, dead, consumers left idle (XAUTOCLAIM).

    Defaults come from the environment: REDIS_URL / RECSYS_REDIS_NAMESPACE for the stream,
    RECSYS_POSTGRES_URL for the event store (the embedded store under RECSYS_HOME otherwise).
    """
    stop_event = stop_event or threading.Event()
    consumer = consumer or default_consumer_name()
    config = get_settings()
    home = config.home_dir()
    if stream is None:
        stream = EventStream(connect(config.redis.url, home), config.redis.namespace)
    own_store = store is None
    if store is None:
        store = open_event_store(config.store.postgres_url, home)
    stream.ensure_group()
    stats = ConsumerStats()
    try:
        # First what this consumer had read but not acknowledged before it stopped.
        while not stop_event.is_set() and _under(stats, max_batches):
            batch = stream.read_own_pending(consumer, batch_size)
            if not len(batch):
                break
            _store(batch, stream, store, stats)
        next_claim = 0.0
        while not stop_event.is_set() and _under(stats, max_batches):
            if time.monotonic() >= next_claim:
                batch = stream.claim_stale(consumer, claim_idle_ms, batch_size)
                next_claim = time.monotonic() + max(claim_idle_ms / 2000.0, 1.0)
                if len(batch):
                    stats.claimed += len(batch)
                    log.info("claimed %d entries left idle by another consumer", len(batch))
                    _store(batch, stream, store, stats)
                    continue
            batch = stream.read(consumer, batch_size, None if idle_exit else block_ms)
            if not len(batch):
                if idle_exit:
                    break
                continue
            _store(batch, stream, store, stats)
    finally:
        if own_store:
            store.close()
    return stats


def _under(stats: ConsumerStats, max_batches: int | None) -> bool:
    return max_batches is None or stats.batches < max_batches


def _store(
    batch: StreamBatch, stream: EventStream, store: EventStore, stats: ConsumerStats
) -> None:
    # Append first, acknowledge after: a crash in between re-delivers, the store dedupes.
    inserted = store.append(batch.events) if batch.events.height else 0
    logged = store.append_impressions(batch.impressions) if batch.impressions.height else 0
    stream.ack(batch.ids)
    stream.trim()
    stats.batches += 1
    stats.entries += len(batch)
    stats.stored += inserted
    stats.impressions += logged
    log.info(
        "stored %d new events and %d impressions from %d entries (%d events total)",
        inserted,
        logged,
        len(batch),
        stats.stored,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `recsys consume`, shared by the `recsys` CLI and this module's main."""
    parser.add_argument("--batch-size", type=int, default=1000, help="entries per read")
    parser.add_argument(
        "--block-ms", type=int, default=1000, help="how long a read waits for new entries (ms)"
    )
    parser.add_argument(
        "--consumer", default=None, help="consumer name in the group (default: host and pid)"
    )
    parser.add_argument(
        "--claim-idle-ms",
        type=int,
        default=60_000,
        help="take over other consumers' entries left unacknowledged this long (ms)",
    )
    parser.add_argument(
        "--max-batches", type=int, default=None, help="stop after N batches (default: never)"
    )
    parser.add_argument(
        "--until-idle", action="store_true", help="stop when the stream has nothing left"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `recsys consume [--batch-size N] [--block-ms MS] [--consumer NAME] ...`."""
    parser = argparse.ArgumentParser(
        prog="recsys consume",
        description="Move events from the Redis stream to the event store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    problem = _bad_arguments(args)
    if problem:
        parser.error(problem)
    return consume(args)


def _bad_arguments(args: argparse.Namespace) -> str | None:
    if args.batch_size < 1 or args.block_ms < 0 or args.claim_idle_ms < 0:
        return "--batch-size must be >= 1; --block-ms and --claim-idle-ms >= 0"
    return None


def consume(args: argparse.Namespace) -> int:
    """Run the consumer with parsed `recsys consume` options until stopped (or idle)."""
    problem = _bad_arguments(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()

    def _graceful(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the current batch, then stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _graceful)
    signal.signal(signal.SIGINT, _graceful)
    try:
        stats = run_consumer(
            stop_event=stop,
            max_batches=args.max_batches,
            batch_size=args.batch_size,
            block_ms=args.block_ms,
            consumer=args.consumer,
            claim_idle_ms=args.claim_idle_ms,
            idle_exit=args.until_idle,
        )
    except ConnectionError as exc:
        log.error("%s", exc)
        return 2
    log.info(
        "consumer stopped: %d batches, %d entries, %d new events stored, %d impressions",
        stats.batches,
        stats.entries,
        stats.stored,
        stats.impressions,
    )
    return 0
