"""The live catalog on the request path: the attributes of a list of items (the live catalog in
Redis first, the model's frozen catalog behind it) and the gate that keeps unknown items out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from config.settings import ServingSettingsEnv
from feature_repo.types import CatalogRead
from training.matrix import lookup

if TYPE_CHECKING:
    from serving.bundle import ServingModel

# What a response item may carry when the request names it in `fields`.
RESPONSE_FIELDS = ("title", "category", "brand", "price", "in_stock")


_DEFAULTS = ServingSettingsEnv.model_construct()  # RECSYS_ALLOW_NEW_ITEMS, ..._MIN_USERS


@dataclass(frozen=True)
class CatalogPolicy:
    """Which items may be recommended: those of a catalog (live or the model's), and, when the
    operator allows new items, those at least `new_item_min_users` distinct users sent events on."""

    allow_new_items: bool = _DEFAULTS.allow_new_items
    new_item_min_users: int = _DEFAULTS.new_item_min_users


@dataclass(frozen=True)
class ItemAttributes:
    """Per item of a list: may it be recommended, and the attributes ranking and the response use
    (live value where Redis has one, else the model's; NaN / '' where neither has)."""

    known: np.ndarray
    in_stock: np.ndarray
    price: np.ndarray
    category: np.ndarray
    brand: np.ndarray
    price_percentile: np.ndarray
    title: np.ndarray


def item_attributes(
    ids: np.ndarray,
    read: CatalogRead | None,
    model: ServingModel | None,
    policy: CatalogPolicy,
) -> ItemAttributes:
    """The attributes of `ids` from a catalog read (None: Redis was not read) and the model.

    Known items: those of the live catalog or of the model's frozen catalog (either suffices;
    POST /items has no delete, so an item leaves only with a retrained model and a fresh Redis),
    plus new items past the distinct-user minimum when allowed. With no catalog anywhere (no
    live catalog and a model trained without one) nothing tells items apart and all pass.
    """
    n = len(ids)
    in_stock = np.ones(n, dtype=bool)
    price = np.full(n, np.nan)
    category = np.full(n, "", dtype=object)
    brand = np.full(n, "", dtype=object)
    title = np.full(n, None, dtype=object)
    percentile = np.full(n, np.nan)
    listed = np.zeros(n, dtype=bool)
    model_price = np.full(n, np.nan)
    if model is not None and n:
        idx = model.item_index(ids)
        in_model = idx >= 0
        cols = idx[in_model]
        in_stock[in_model] = model.in_stock[cols]
        price[in_model] = model_price[in_model] = model.price[cols]
        category[in_model] = model.category[cols]
        brand[in_model] = model.brand[cols]
        title[in_model] = model.title[cols]
        percentile[in_model] = model.price_percentile[cols]
        listed[in_model] = model.in_catalog[cols]
    gate = model is not None and model.has_catalog
    if read is not None:
        gate = gate or read.size > 0
        stock = np.asarray(read.values["in_stock"], dtype=object)
        live = stock != None  # noqa: E711 (elementwise over an object array)
        in_stock[live] = stock[live] == "1"
        listed |= live
        for name, target in (("category", category), ("brand", brand), ("title", title)):
            if name in read.values:
                values = np.asarray(read.values[name], dtype=object)
                given = values != None  # noqa: E711
                target[given] = values[given]
        if "price" in read.values:
            values = np.asarray(read.values["price"], dtype=object)
            given = values != None  # noqa: E711
            price[given] = values[given].astype(np.float64)
            changed = given & ~(price == model_price)
            if changed.any():
                percentile[changed] = (
                    model.price_percentile_of(category[changed].astype(str), price[changed])
                    if model is not None
                    else 0.5
                )
    if not gate:
        known = np.ones(n, dtype=bool)
    else:
        known = listed
        if policy.allow_new_items and read is not None:
            users = np.array([u or 0 for u in read.users], dtype=np.int64)
            known = known | (users >= policy.new_item_min_users)
    return ItemAttributes(known, in_stock, price, category, brand, percentile, title)


class CatalogCache:
    """A worker's copy of the live catalog's values of the items it has read, valid for one
    catalog version: every write bumps the version, so a copy of the current version is exact,
    and a request reads Redis only for items it has not seen since the last write. Distinct-user
    counts (new items allowed) change with events, not writes, and are never kept."""

    def __init__(self) -> None:
        # (version, sorted ids, values per field, catalog size), replaced as a whole: the
        # requests and the global lists' background refresh read it from two threads.
        self._state: tuple[str | None, np.ndarray, dict[str, np.ndarray], int] = (
            None,
            np.empty(0, dtype=str),
            {},
            0,
        )

    @property
    def version(self) -> str | None:
        return self._state[0]

    def read(
        self,
        ids: np.ndarray,
        version: str | None,
        fetch: Callable[[list[str]], CatalogRead | None],
    ) -> CatalogRead | None:
        """The values of `ids` (a str array) for `version`, fetching the ones not held (all of
        CATALOG_FIELDS at once); None when the fetch found Redis down."""
        held_version, held_ids, held_values, size = self._state
        if version != held_version or not held_values:
            held_ids, held_values = np.empty(0, dtype=str), {}
        ids = np.asarray(ids, dtype=str)
        pos = lookup(held_ids, ids)
        if (pos < 0).any():
            missing = np.unique(ids[pos < 0])
            found = fetch(missing.tolist())
            if found is None:
                return None
            merged = np.concatenate([held_ids, missing])
            order = np.argsort(merged, kind="stable")
            held_ids = merged[order]
            held_values = {
                name: np.concatenate(
                    [held_values.get(name, np.empty(0, dtype=object)), np.asarray(v, dtype=object)]
                )[order]
                for name, v in found.values.items()
            }
            size = found.size
            # Two threads that both fetched: the last one's copy stays (the other's items are
            # read again when next asked for).
            self._state = (version, held_ids, held_values, size)
            pos = lookup(held_ids, ids)
        values = {name: column[pos] for name, column in held_values.items()}
        return CatalogRead(size, values, [None] * len(ids))
