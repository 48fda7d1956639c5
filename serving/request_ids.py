"""Request ids that name the answer's variant and model version, so an event posted back with one
is attributed to its version at ingest without a lookup (docs/experiments.md).

`<32 random hex>-<variant code><version>`: `c` champion, `h` challenger, `p` popularity (no
version), `x` another arm of an online experiment, e.g. `9f0c...e1-c12`. Any replica can read
what any other issued. A client can send any string: ids of another shape, unknown codes and
versions this worker has not served recently are counted as `unknown`/`other`, so a forged id
cannot add label sets without bound.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable

import polars as pl

VARIANT_CODES = {"champion": "c", "challenger": "h", "popularity": "p"}
# An experiment's other arms (`v3`, `champion-2`, `interleaved`): their version tells them apart.
EXPERIMENT_ARM = "experiment"
_VARIANTS = {**{code: name for name, code in VARIANT_CODES.items()}, "x": EXPERIMENT_ARM}
_PATTERN = r"^[0-9a-f]{32}-([chpx])([0-9]{0,12})$"
ATTRIBUTED_TYPES = ("click", "add_to_cart", "purchase")
UNKNOWN = "unknown"
OTHER = "other"


# 128 random bits per id from a generator seeded from the OS once per process (and again in a
# forked child, which would otherwise repeat its parent's ids): uuid4 reads os.urandom per id, a
# system call that showed as 3% of a loaded worker's samples. The ids name answers; they are not
# secrets (a client can send any id with its events).
_RANDOM = random.Random()
os.register_at_fork(after_in_child=_RANDOM.seed)


def new_request_id(variant: str, version: str | None) -> str:
    """A fresh request id naming the answer's variant and model version."""
    return f"{_RANDOM.getrandbits(128):032x}-{VARIANT_CODES.get(variant, 'x')}{version or ''}"


def attributed_counts(events: pl.DataFrame, known_versions: Iterable[str]) -> pl.DataFrame:
    """Per (variant, version, event_type), how many of `events` (clicks, add-to-carts and
    purchases with a `request_id`) the ids attribute; columns variant, version, event_type, n.

    `version` is `none` for popularity answers, `other` for a version not in `known_versions`;
    an id of another shape counts as variant `unknown`.
    """
    if "request_id" not in events.columns or events.is_empty():
        return pl.DataFrame(
            schema={
                "variant": pl.String,
                "version": pl.String,
                "event_type": pl.String,
                "n": pl.UInt32,
            }
        )
    known = list(known_versions)
    rid = pl.col("request_id")
    code = rid.str.extract(_PATTERN, 1)
    version = rid.str.extract(_PATTERN, 2)
    return (
        events.filter(
            rid.is_not_null() & pl.col("event_type").cast(pl.String).is_in(ATTRIBUTED_TYPES)
        )
        .select(
            code.replace_strict(_VARIANTS, default=UNKNOWN).fill_null(UNKNOWN).alias("variant"),
            pl.when(code.is_null())
            .then(pl.lit(OTHER))
            .when(version == "")
            .then(pl.lit("none"))
            .when(version.is_in(known))
            .then(version)
            .otherwise(pl.lit(OTHER))
            .alias("version"),
            pl.col("event_type").cast(pl.String),
        )
        .group_by("variant", "version", "event_type")
        .agg(pl.len().alias("n"))
    )
