"""The batch loop's pushes to Redis (assets only): per-item lists, batch candidates, batch
popularity, user profiles and trend lists, each swapped in whole so a reader never sees half."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import polars as pl
import redis
from redis.cluster import ClusterPipeline, RedisCluster

from feature_repo.definitions import (
    CATALOG_FIELDS,
    NEIGHBORS_LIST,
    PROFILE_FIELDS,
    TREND_INFO_FIELDS,
    UNKNOWN_SEGMENT,
    FeatureConfig,
    Keys,
)

_PUSH_CHUNK = 500
_MEMBER_CHUNK = 5000


class Pushes:
    """Offline pushes of one namespace (the batch loop, after a promotion or an analysis)."""

    def __init__(
        self, client: redis.Redis | RedisCluster, keys: Keys, config: FeatureConfig
    ) -> None:
        self.redis = client
        self.keys = keys
        self.config = config

    def push_item_lists(self, name: str, frame: pl.DataFrame) -> int:
        """Replace per-item lists `name` from `item_id, neighbor_id, score`; returns items written.

        Each item's list is swapped in atomically (written aside, then RENAMEd); lists of items
        absent from `frame` expire after `offline_ttl`.
        """
        if not name or any(c in name for c in "{}: "):
            raise ValueError(f"invalid list name {name!r}")
        self._require(frame, ("item_id", "neighbor_id", "score"))
        keys = self.keys
        return self._push_grouped(
            frame, "item_id", "neighbor_id", lambda item: keys.item_list(item, name)
        )

    def push_item_neighbors(self, frame: pl.DataFrame) -> int:
        """Replace the `neighbors` lists (embedding neighbours): `item_id, neighbor_id, score`."""
        return self.push_item_lists(NEIGHBORS_LIST, frame)

    def push_batch_candidates(self, frame: pl.DataFrame) -> int:
        """Replace users' batch candidates from `user_id, item_id, score`; returns users written."""
        self._require(frame, ("user_id", "item_id", "score"))
        return self._push_grouped(frame, "user_id", "item_id", self.keys.candidates)

    def push_popularity(self, frame: pl.DataFrame) -> int:
        """Replace the batch loop's popularity from `item_id, score`; returns items written."""
        self._require(frame, ("item_id", "score"))
        target = self.keys.batch_popularity
        staging = Keys.staging(target)
        ids = frame["item_id"].cast(pl.String).to_list()
        scores = frame["score"].cast(pl.Float64).to_list()
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(staging)
        for start in range(0, len(ids), _PUSH_CHUNK * 10):
            stop = start + _PUSH_CHUNK * 10
            pipe.zadd(staging, dict(zip(ids[start:stop], scores[start:stop], strict=True)))
        if ids:
            pipe.expire(staging, self.config.offline_ttl)
            _rename(pipe, staging, target)
        else:
            pipe.delete(target)
        pipe.execute()
        return len(ids)

    def write_catalog(self, frame: pl.DataFrame, now: float | None = None) -> int:
        """Upsert items of the catalog contract (`item_id` and any of title, category, brand,
        price, in_stock) into the live catalog; returns the items written.

        A null or absent attribute keeps the stored value (a new item without `in_stock` is in
        stock); every write bumps the catalog's version, which retires cached answers.
        """
        self._require(frame, ("item_id",))
        if frame["item_id"].null_count():
            raise ValueError("every catalog item needs an item_id")
        frame = frame.unique("item_id", keep="last", maintain_order=True)
        keys = self.keys
        pipe = self.redis.pipeline(transaction=False)
        for name in CATALOG_FIELDS:
            if name not in frame.columns:
                continue
            column = pl.col(name)
            if name == "in_stock":
                value = pl.when(column.cast(pl.Boolean)).then(pl.lit("1")).otherwise(pl.lit("0"))
            elif name == "price":
                value = column.cast(pl.Float64).cast(pl.String)
            else:
                value = column.cast(pl.String)
            given = frame.filter(column.is_not_null()).select("item_id", value.alias("v"))
            ids, values = given["item_id"].cast(pl.String).to_list(), given["v"].to_list()
            for start in range(0, len(ids), _MEMBER_CHUNK):
                stop = start + _MEMBER_CHUNK
                pipe.hset(
                    keys.catalog(name),
                    mapping=dict(zip(ids[start:stop], values[start:stop], strict=True)),
                )
        # Known from its first write: an item without a stock flag is in stock.
        stock = keys.catalog("in_stock")
        unset = (
            frame["item_id"]
            if "in_stock" not in frame.columns
            else frame.filter(pl.col("in_stock").is_null())["item_id"]
        )
        for item in unset.cast(pl.String).to_list():
            pipe.hsetnx(stock, item, "1")
        pipe.hincrby(keys.catalog_meta, "version", 1)
        pipe.hset(keys.catalog_meta, "updated_at", repr(float(time.time() if now is None else now)))
        pipe.execute()
        return frame.height

    def push_user_profiles(self, frame: pl.DataFrame, now: float | None = None) -> int:
        """Write profiles from `user_id, segment` and any other of `PROFILE_FIELDS`
        (`preferences` as a JSON string or a struct); returns the users written.

        Every field is written each time (empty when unknown), so a profile never mixes two
        pushes; profiles of users absent from `frame` expire after `profile_ttl`. Pipelined in
        chunks of users: no round trip per user.
        """
        self._require(frame, ("user_id", "segment"))
        now = time.time() if now is None else now
        values = []
        for name in PROFILE_FIELDS:
            if name == "updated_at":
                expr = pl.lit(repr(float(now)))
            elif name not in frame.columns:
                expr = pl.lit("")
            else:
                expr = pl.col(name)
                dtype = frame.schema[name]
                if isinstance(dtype, pl.Struct):
                    expr = expr.struct.json_encode()
                elif dtype.is_float():
                    expr = expr.fill_nan(None)
                expr = expr.cast(pl.String).fill_null("")
            values.append(expr.alias(name))
        table = (
            frame.select(pl.col("user_id").cast(pl.String), *values)
            .filter(pl.col("user_id").is_not_null() & (pl.col("segment") != ""))
            .unique("user_id", keep="last", maintain_order=True)
        )
        users = table["user_id"].to_list()
        rows = table.drop("user_id").rows()
        profile, ttl = self.keys.profile, self.config.profile_ttl
        for start in range(0, len(users), _PUSH_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            stop = start + _PUSH_CHUNK
            for user, row in zip(users[start:stop], rows[start:stop], strict=True):
                key = profile(user)
                pipe.hset(key, items=_interleave(PROFILE_FIELDS, row))
                pipe.expire(key, ttl)
            pipe.execute()
        return len(users)

    def push_trends(
        self,
        items: pl.DataFrame,
        categories: pl.DataFrame | None = None,
        analysed_at: float | None = None,
        now: float | None = None,
    ) -> dict[str, int]:
        """Replace the trend lists from the trend analysis' `items` (`item_id, trend_score`,
        `category` and the other `TREND_INFO_FIELDS` when present) and `categories` tables.

        The global list and one list per category keep the `trend_list_cap` items with the
        highest positive trend_score; lists, info and metadata are written aside and swapped in
        together, and categories no longer present are deleted. Returns counts written.
        """
        self._require(items, ("item_id", "trend_score"))
        now = time.time() if now is None else now
        cfg, keys = self.config, self.keys
        frame = items.select(
            pl.col("item_id").cast(pl.String),
            pl.col("trend_score").cast(pl.Float64),
            *_info_columns(items),
        ).filter(
            pl.col("item_id").is_not_null()
            & pl.col("trend_score").is_finite()
            & (pl.col("trend_score") > 0)
        )
        frame = frame.unique("item_id", keep="first", maintain_order=True)
        ranked = frame.sort(["trend_score", "item_id"], descending=[True, False])
        top = ranked.head(cfg.trend_list_cap)
        per_category = ranked.filter(pl.int_range(pl.len()).over("category") < cfg.trend_list_cap)
        listed = pl.concat([top.select("item_id"), per_category.select("item_id")]).unique()
        info = frame.join(listed, on="item_id", how="semi").select(
            "item_id", _json_of(frame.columns, exclude=("item_id", "trend_score"))
        )
        cats = (
            categories.select(
                pl.col("category").cast(pl.String).fill_null(UNKNOWN_SEGMENT),
                pl.col("trend_score").cast(pl.Float64).fill_nan(None).round(4),
                *[c for c in _info_columns(categories) if c.meta.output_name() != "category"],
            )
            if categories is not None and "category" in categories.columns
            else pl.DataFrame({"category": []}, schema={"category": pl.String})
        )
        cats = cats.unique("category", keep="first", maintain_order=True)
        cat_json = cats.select("category", _json_of(cats.columns, exclude=("category",)))
        groups = per_category.group_by("category", maintain_order=True).agg(
            "item_id", "trend_score"
        )
        names = groups["category"].to_list()

        staged = Keys.staging
        previous = self.redis.hget(keys.trend_meta, "lists")
        old_names = set(json.loads(previous)) if previous else set()
        writes: list[tuple[str, list, list]] = [
            (keys.trend_items, top["item_id"].to_list(), top["trend_score"].to_list()),
            *(
                (keys.trend_category(n), ids, scores)
                for n, ids, scores in zip(
                    names, groups["item_id"].to_list(), groups["trend_score"].to_list(), strict=True
                )
            ),
        ]
        hashes = [
            (keys.trend_info, info["item_id"].to_list(), info["info"].to_list()),
            (keys.trend_categories, cat_json["category"].to_list(), cat_json["info"].to_list()),
        ]
        pipe = self.redis.pipeline(transaction=False)
        for key, *_ in writes + hashes:
            pipe.delete(staged(key))
        for key, ids, scores in writes:
            for start in range(0, len(ids), _MEMBER_CHUNK):
                stop = start + _MEMBER_CHUNK
                pipe.zadd(staged(key), dict(zip(ids[start:stop], scores[start:stop], strict=True)))
        for key, fields, texts in hashes:
            for start in range(0, len(fields), _MEMBER_CHUNK):
                stop = start + _MEMBER_CHUNK
                pipe.hset(
                    staged(key),
                    items=_interleave(fields[start:stop], texts[start:stop]),
                )
        pipe.execute()
        # The swap: every key is in the `{global}` slot, so one MULTI also works on a cluster.
        pipe = self.redis.pipeline(transaction=True)
        for key, ids, _ in writes + hashes:
            if ids:
                pipe.expire(staged(key), cfg.trends_ttl)
                _rename(pipe, staged(key), key)
            else:
                pipe.delete(key)
        for name in sorted(old_names - set(names)):
            pipe.delete(keys.trend_category(name))
        pipe.delete(keys.trend_meta)
        pipe.hset(
            keys.trend_meta,
            mapping={
                "analysed_at": repr(float(analysed_at if analysed_at is not None else now)),
                "pushed_at": repr(float(now)),
                "items": top.height,
                "categories": cats.height,
                "lists": json.dumps(names),
            },
        )
        pipe.expire(keys.trend_meta, cfg.trends_ttl)
        pipe.execute()
        return {
            "trend_items": top.height,
            "category_lists": len(names),
            "items_with_info": info.height,
            "categories": cats.height,
        }

    def _push_grouped(
        self, frame: pl.DataFrame, owner: str, member: str, key_of: Callable[[str], str]
    ) -> int:
        grouped = (
            frame.select(
                pl.col(owner).cast(pl.String),
                pl.col(member).cast(pl.String),
                pl.col("score").cast(pl.Float64),
            )
            .group_by(owner, maintain_order=True)
            .agg(member, "score")
        )
        ttl = self.config.offline_ttl
        owners = grouped[owner].to_list()
        members = grouped[member].to_list()
        scores = grouped["score"].to_list()
        for start in range(0, len(owners), _PUSH_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for i in range(start, min(start + _PUSH_CHUNK, len(owners))):
                key = key_of(owners[i])
                staging = Keys.staging(key)
                pipe.delete(staging)
                pipe.zadd(staging, dict(zip(members[i], scores[i], strict=True)))
                pipe.expire(staging, ttl)
                _rename(pipe, staging, key)
            pipe.execute()
        return len(owners)

    @staticmethod
    def _require(frame: pl.DataFrame, columns: Sequence[str]) -> None:
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(
                f"frame lacks column(s) {', '.join(missing)}; has {', '.join(frame.columns)}"
            )


def _rename(pipe: redis.client.Pipeline | ClusterPipeline, source: str, target: str) -> None:
    """RENAME in a pipeline. redis-py's cluster pipeline refuses `rename()` (a command of two
    keys); the raw command passes, and redis-py checks that both keys are in one slot, which a
    staging key always is with its target."""
    pipe.execute_command("RENAME", source, target)


def _info_columns(frame: pl.DataFrame) -> list[pl.Expr]:
    """The `TREND_INFO_FIELDS` a trend table has, typed for compact JSON (floats rounded)."""
    out = []
    for name in TREND_INFO_FIELDS:
        if name not in frame.columns:
            continue
        expr = pl.col(name)
        dtype = frame.schema[name]
        if dtype.is_float():
            expr = expr.fill_nan(None).round(4)
        elif name == "category":
            expr = expr.cast(pl.String).fill_null(UNKNOWN_SEGMENT)
        out.append(expr.alias(name))
    if "category" not in frame.columns:
        out.insert(0, pl.lit(UNKNOWN_SEGMENT).alias("category"))
    return out


def _json_of(columns: Sequence[str], exclude: Sequence[str]) -> pl.Expr:
    fields = [c for c in columns if c not in exclude]
    if not fields:
        return pl.lit("{}").alias("info")
    return pl.struct(fields).struct.json_encode().alias("info")


def _interleave(names: Sequence[str], values: Sequence[object]) -> list:
    """[name, value, name, value, ...] for HSET."""
    return [x for pair in zip(names, values, strict=True) for x in pair]
