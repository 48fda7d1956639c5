"""A registered model as the request path holds it: the bundle plus the arrays ranking reads
(item and user indexes, categories, per-category price percentiles), computed once at load."""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp

from serving.settings import ServingSettings, blend_weights
from training.hybrid import HybridRecommender
from training.lineage import ModelLineage
from training.matrix import lookup

ITEM_ITEM = ("ease", "itemknn")


class ServingModel:
    """A loaded bundle plus the arrays the request path reads, computed once at load."""

    def __init__(
        self,
        bundle: HybridRecommender,
        version: str,
        variant: str,
        lineage: ModelLineage | None = None,
    ) -> None:
        self.bundle = bundle
        self.version = version
        self.variant = variant
        # Read from the version's tags once, at load: answers name it without asking MLflow.
        self.lineage = lineage or ModelLineage(version, None, None, "unknown")
        self.lineage_json = self.lineage.as_json()
        self.item_ids = np.asarray(bundle.item_ids).astype(str)
        if len(self.item_ids) > 1 and not np.all(self.item_ids[:-1] < self.item_ids[1:]):
            raise ValueError("the bundle's item_ids must be sorted and unique")
        self.user_ids = np.asarray(bundle.user_ids).astype(str)
        catalog = bundle.catalog
        names = catalog["category"].fill_null("").to_numpy().astype(str)
        self.categories, codes = np.unique(names, return_inverse=True)
        self.category_code = np.where(names == "", -1, codes).astype(np.int64)
        self.category = names
        self.price = catalog["price"].cast(float).fill_null(float("nan")).to_numpy()
        self.price_percentile = price_percentiles(catalog)
        brands = catalog["brand"] if "brand" in catalog.columns else pl.Series([None] * len(names))
        self.brand = brands.cast(pl.String).fill_null("").to_numpy().astype(str)
        self.in_stock = catalog["in_stock"].fill_null(True).to_numpy().astype(bool)
        titles = catalog["title"] if "title" in catalog.columns else pl.Series([None] * len(names))
        self.title = titles.cast(pl.String).to_numpy().astype(object)
        # Which items the frozen catalog lists (a bundle from before the column: all of them).
        self.in_catalog = (
            catalog["in_catalog"].fill_null(False).to_numpy().astype(bool)
            if "in_catalog" in catalog.columns
            else np.ones(len(names), dtype=bool)
        )
        self.has_catalog = bool(self.in_catalog.any())
        self._price_keys, self._price_starts, self._price_counts = _price_index(
            self.category_code, self.price, len(self.categories)
        )
        self.weights = dict(bundle.weights)
        # Per-source blend weights; the service sets them from its settings before serving.
        self.blend: dict[str, float] = blend_weights(ServingSettings(), self.weights)
        self.components = bundle.components
        self.item_item = next((n for n in ITEM_ITEM if n in bundle.components), None)
        pop = bundle.components.get("popularity")
        self.popularity = (
            np.asarray(pop.score(sp.csr_matrix((1, bundle.n_items)))[0], dtype=np.float64)
            if pop is not None
            else np.zeros(bundle.n_items)
        )
        ui = bundle.user_items.tocsr()
        self._indptr, self._indices, self._data = ui.indptr, ui.indices, ui.data

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def item_index(self, ids: np.ndarray) -> np.ndarray:
        """Column of each id, -1 for ids the model does not know."""
        return lookup(self.item_ids, np.asarray(ids, dtype=str))

    def user_index(self, user_id: str) -> int:
        return int(lookup(self.user_ids, np.array([user_id], dtype=str))[0])

    def user_row(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """(item columns, confidences) of a known user's training interactions."""
        start, stop = self._indptr[user], self._indptr[user + 1]
        return self._indices[start:stop], self._data[start:stop]

    def price_percentile_of(self, categories: np.ndarray, prices: np.ndarray) -> np.ndarray:
        """Percentile of each (category, price) among the frozen catalog's prices of that
        category (0 = cheapest, as price_percentiles); 0.5 for a category it lacks."""
        code = lookup(self.categories, np.asarray(categories, dtype=str))
        code = np.where(np.asarray(categories, dtype=str) == "", -1, code)
        out = np.full(len(code), 0.5)
        ok = (code >= 0) & np.isfinite(prices)
        if not ok.any() or not len(self._price_keys):
            return np.where(np.isfinite(prices), out, np.nan)
        c = code[ok] + 1  # slot 0: items without a category
        rank = (
            np.searchsorted(self._price_keys, c * _PRICE_SPAN + prices[ok]) - self._price_starts[c]
        )
        count = self._price_counts[c]
        out[ok] = np.where(count > 1, np.clip(rank / np.maximum(count - 1, 1), 0.0, 1.0), 0.5)
        return np.where(np.isfinite(prices), out, np.nan)

    def category_codes(self, names: list[str]) -> np.ndarray:
        """Codes of category names (names the catalog lacks match nothing)."""
        pos = lookup(self.categories, np.asarray(names, dtype=str))
        return pos[pos >= 0]


# Prices are keyed per category as code * _PRICE_SPAN + price, so one sorted array serves every
# category's searchsorted (prices above the span are clipped: the dearest of any category).
_PRICE_SPAN = 1e9


def _price_index(
    code: np.ndarray, price: np.ndarray, n_categories: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted per-category price keys, each category's first position and count."""
    ok = np.isfinite(price)
    slot = code[ok] + 1
    keys = np.sort(slot * _PRICE_SPAN + np.minimum(price[ok], _PRICE_SPAN - 1))
    counts = np.bincount(slot, minlength=n_categories + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return keys, starts, counts


def price_percentiles(catalog: pl.DataFrame) -> np.ndarray:
    """Each item's price percentile within its category (0 = cheapest, 0.5 when alone), over
    the whole catalog for items without a category; NaN without a price."""
    price = pl.col("price").cast(pl.Float64).fill_nan(None)
    category = pl.col("category").cast(pl.String)

    def percentile(rank: pl.Expr, count: pl.Expr) -> pl.Expr:
        return pl.when(count > 1).then((rank - 1) / (count - 1)).otherwise(0.5)

    within = percentile(price.rank("average").over(category), price.count().over(category))
    overall = percentile(price.rank("average"), price.count())
    pct = pl.when(price.is_null()).then(None).when(category.is_null()).then(overall)
    out = catalog.select(pct.otherwise(within).cast(pl.Float64).alias("pct"))["pct"]
    return out.fill_null(float("nan")).to_numpy()
