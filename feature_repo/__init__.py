"""The stores: the event store (offline, `event_store.py`) and the Redis features (online)."""
