"""The live catalog on the request path: the attributes of a list of items (the live catalog in
Redis first, the model's frozen catalog behind it) and the gate that keeps unknown items out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from feature_repo.types import CatalogRead

if TYPE_CHECKING:
    from serving.ranking import ServingModel

# What ranking reads of every candidate (in_stock always comes with them), and what a response
# item may carry when the request names it in `fields`.
RANKING_ATTRIBUTES = ("price", "category", "brand")
RESPONSE_FIELDS = ("title", "category", "brand", "price", "in_stock")


@dataclass(frozen=True)
class CatalogPolicy:
    """Which items may be recommended: those of a catalog (live or the model's), and, when the
    operator allows new items, those at least `new_item_min_users` distinct users sent events on."""

    allow_new_items: bool = False
    new_item_min_users: int = 3


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
