"""The stores: the event store (offline, `event_store.py` over its PostgreSQL and Parquet
backends) and the Redis features (online)."""
