"""Training assets: interaction matrix, split, candidate generators, hybrid ranker, evaluation."""

from dataclasses import dataclass

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from assets.resources import ComputeResource
from training.evaluation import to_markdown
from training.hybrid import HybridRecommender
from training.matrix import DEFAULT_EVENT_WEIGHTS, InteractionMatrix
from training.models.als import ALSModel
from training.models.base import default_params
from training.models.item2vec import Item2VecModel
from training.models.itemknn import EASEModel, ItemKNNModel
from training.train import (
    MIN_TRAINING_USERS,
    ComponentResult,
    SplitData,
    blend,
    evaluate_models,
    fit_component,
    interactions_from,
    sequences_for,
    split_training_data,
)

GROUP = "training"
# Each hyperparameter's default lives in its model's constructor; the configs below refer to it.
_ALS = default_params(ALSModel)
_I2V = default_params(Item2VecModel)
_EASE = default_params(EASEModel)
_KNN = default_params(ItemKNNModel)


class MatrixConfig(dg.Config):
    """How events become confidences."""

    event_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS),
        description="Confidence per event type; a rating's confidence is its value.",
    )
    half_life_days: float = Field(
        default=0.0, description="Exponential time decay half-life in days; 0 turns decay off."
    )
    binary_ratings: bool = Field(
        default=False, description="Count a rating as 1 instead of its value (explicit data)."
    )


class SplitConfig(dg.Config):
    """The validation split carved from the training data (tuning sees only this)."""

    holdout_fraction: float = Field(default=0.2, description="Share of each user's items held out.")
    seed: int = Field(default=0, description="Seed of the random per-user split.")
    min_users: int = Field(
        default=MIN_TRAINING_USERS,
        description="Fewest users with two or more items to train on; fewer fails the run.",
    )


class TuningConfig(dg.Config):
    """Shared by the model configs: grids are skipped above this many interactions."""

    tuning_max_interactions: int = Field(
        default=2_000_000, description="Above this many interactions, fit the base params only."
    )


class ALSConfig(TuningConfig):
    factors: int = Field(default=_ALS["factors"], description="Latent factors.")
    regularization: float = Field(default=_ALS["regularization"], description="L2 regularisation.")
    alpha: float = Field(default=_ALS["alpha"], description="Confidence scaling of interactions.")
    iterations: int = Field(default=_ALS["iterations"], description="ALS sweeps.")
    bm25: bool = Field(
        default=_ALS["bm25"], description="BM25-weight the confidences before fitting."
    )
    grid_factors: list[int] = Field(default=[32, 64, 128], description="Factors tried in tuning.")
    grid_regularization: list[float] = Field(
        default=[5.0, 20.0, 50.0], description="Regularisation values tried in tuning."
    )


class Item2VecConfig(dg.Config):
    vector_size: int = Field(default=_I2V["vector_size"], description="Embedding dimensions.")
    window: int = Field(default=_I2V["window"], description="Skip-gram context window.")
    negative: int = Field(default=_I2V["negative"], description="Negative samples per positive.")
    epochs: int = Field(default=_I2V["epochs"], description="Passes over the sequences.")
    min_count: int = Field(
        default=_I2V["min_count"], description="Items seen fewer times get no vector."
    )
    sample: float = Field(
        default=_I2V["sample"], description="Down-sampling threshold of frequent items."
    )
    session_gap_minutes: float = Field(
        default=_I2V["session_gap_minutes"], description="A longer gap starts a session."
    )
    seed: int = Field(default=_I2V["seed"], description="Random seed.")
    max_token_passes: int = Field(
        default=_I2V["max_token_passes"],
        description="Epochs are cut so epochs x tokens stays within this.",
    )


class ItemItemConfig(TuningConfig):
    kind: str = Field(default="auto", description="ease, itemknn, or auto (EASE when it fits).")
    ease_max_items: int = Field(
        default=_EASE["max_items"], description="Largest catalog EASE is used for."
    )
    ease_l2: float = Field(default=_EASE["l2"], description="EASE L2 regularisation.")
    grid_ease_l2: list[float] = Field(
        default=[100.0, 300.0, 600.0, 1000.0], description="EASE L2 values tried in tuning."
    )
    neighbors: int = Field(
        default=_KNN["neighbors"], description="Item-kNN neighbours kept per item."
    )


class HybridConfig(dg.Config):
    seed: int = Field(default=0, description="Seed of the weight search.")


def _component_output(result: ComponentResult, extra: dict | None = None) -> dg.Output:
    trials = pl.DataFrame(result.tuning)
    return dg.Output(
        result,
        metadata={
            "params": dg.MetadataValue.json(result.params),
            "validation_ndcg@10": result.validation_ndcg,
            "fit_seconds": round(result.fit_seconds, 3),
            "tuning": dg.MetadataValue.md(to_markdown(trials)),
            **(extra or {}),
        },
    )


def _use_grid(config: TuningConfig, data: SplitData) -> bool:
    return data.interactions.nnz <= config.tuning_max_interactions


@dg.asset(group_name=GROUP, compute_kind="scipy")
def interaction_matrix(
    config: MatrixConfig, raw_events: pl.DataFrame, item_catalog: pl.DataFrame
) -> dg.Output[InteractionMatrix]:
    """Sparse users x items confidences with the id mappings."""
    matrix = interactions_from(
        raw_events,
        config.event_weights,
        config.half_life_days or None,
        config.binary_ratings,
        item_catalog,
    )
    n_users, n_items = matrix.shape
    return dg.Output(
        matrix,
        metadata={
            "users": n_users,
            "items": n_items,
            "non_zeros": matrix.nnz,
            "density": float(matrix.nnz / max(n_users * n_items, 1)),
            # Stored events with a non-finite or out-of-range value, left out (see the log).
            "dropped_invalid_values": matrix.dropped_events,
            "config": dg.MetadataValue.json(config.model_dump()),
        },
    )


@dg.asset_check(asset=interaction_matrix, blocking=True)
def interaction_matrix_not_empty(interaction_matrix: InteractionMatrix) -> dg.AssetCheckResult:
    """An empty or all-zero matrix would train nothing."""
    data = interaction_matrix.matrix.data
    ok = interaction_matrix.nnz > 0 and bool(np.isfinite(data).all()) and bool((data > 0).any())
    return dg.AssetCheckResult(
        passed=ok,
        metadata={"non_zeros": interaction_matrix.nnz, "finite": bool(np.isfinite(data).all())},
    )


@dg.asset(group_name=GROUP, compute_kind="numpy")
def training_split(
    config: SplitConfig, raw_events: pl.DataFrame, interaction_matrix: InteractionMatrix
) -> dg.Output[SplitData]:
    """A per-user random train/validation split of the training data (fails on too little)."""
    data = split_training_data(
        raw_events, interaction_matrix, config.holdout_fraction, config.seed, config.min_users
    )
    return dg.Output(
        data,
        metadata={
            "train_non_zeros": int(data.train.nnz),
            "validation_non_zeros": int(data.validation.nnz),
            "validation_users": int((np.diff(data.validation.indptr) > 0).sum()),
        },
    )


@dg.asset(group_name=GROUP, compute_kind="implicit")
def als_model(
    config: ALSConfig, training_split: SplitData, compute: ComputeResource
) -> dg.Output[ComponentResult]:
    """Implicit ALS factors, tuned on validation and refit on all training data."""
    params = {
        "factors": config.factors,
        "regularization": config.regularization,
        "alpha": config.alpha,
        "iterations": config.iterations,
        "bm25": config.bm25,
    }
    grid_spec = (
        {"factors": config.grid_factors, "regularization": config.grid_regularization}
        if _use_grid(config, training_split)
        else None
    )
    data = training_split
    result = fit_component(
        "als",
        params,
        data.train,
        data.validation,
        data.interactions.matrix,
        grid_spec,
        threads=compute.threads,
    )
    return _component_output(result)


@dg.asset_check(asset=als_model, blocking=True)
def als_factors_finite(als_model: ComponentResult) -> dg.AssetCheckResult:
    """NaN or infinite factors would poison every score."""
    model = als_model.model
    ok = bool(np.isfinite(model.user_factors).all() and np.isfinite(model.item_factors).all())
    return dg.AssetCheckResult(passed=ok)


@dg.asset(group_name=GROUP, compute_kind="gensim")
def item2vec_model(
    config: Item2VecConfig, training_split: SplitData, compute: ComputeResource
) -> dg.Output[ComponentResult]:
    """Item2Vec skip-gram embeddings over each user's time-ordered sessions."""
    data = training_split
    item_ids = data.interactions.item_ids
    params = config.model_dump()
    result = fit_component(
        "item2vec",
        params,
        data.train,
        data.validation,
        data.interactions.matrix,
        train_sequences=sequences_for(data.train_events, item_ids, config.session_gap_minutes),
        full_sequences=sequences_for(data.events, item_ids, config.session_gap_minutes),
        threads=compute.threads,
    )
    return _component_output(result)


@dg.asset_check(asset=item2vec_model, blocking=True)
def item2vec_vectors_finite(item2vec_model: ComponentResult) -> dg.AssetCheckResult:
    """NaN vectors would poison similar-item lists."""
    return dg.AssetCheckResult(passed=bool(np.isfinite(item2vec_model.model.vectors).all()))


@dg.asset(group_name=GROUP, compute_kind="numpy")
def item_item_model(
    config: ItemItemConfig, training_split: SplitData, compute: ComputeResource
) -> dg.Output[ComponentResult]:
    """EASE on catalogs that fit in memory, sparse cosine item-kNN above that."""
    data = training_split
    n_items = data.interactions.shape[1]
    kind = config.kind
    if kind == "auto":
        kind = "ease" if n_items <= config.ease_max_items else "itemknn"
    if kind == "ease":
        params = {"l2": config.ease_l2, "max_items": max(config.ease_max_items, n_items)}
        grid_spec = {"l2": config.grid_ease_l2} if _use_grid(config, data) else None
    elif kind == "itemknn":
        params, grid_spec = {"neighbors": config.neighbors}, None
    else:
        raise dg.Failure(f"item_item_model kind must be auto, ease or itemknn, not {kind!r}")
    result = fit_component(
        kind,
        params,
        data.train,
        data.validation,
        data.interactions.matrix,
        grid_spec,
        threads=compute.threads,
    )
    return _component_output(result, {"kind": kind})


@dg.asset(group_name=GROUP, compute_kind="numpy")
def popularity_model(training_split: SplitData) -> dg.Output[ComponentResult]:
    """Item popularity (users per item), the cold-start fallback and a blend component."""
    data = training_split
    result = fit_component("popularity", {}, data.train, data.validation, data.interactions.matrix)
    return _component_output(result)


@dataclass
class TrainedHybrid:
    """The final hybrid (refit on all training data) and its twin fit on the train part."""

    final: HybridRecommender
    on_validation: HybridRecommender
    validation_ndcg: float
    components: dict[str, ComponentResult]


@dg.asset(group_name=GROUP, compute_kind="numpy")
def hybrid_ranker(
    config: HybridConfig,
    training_split: SplitData,
    item_catalog: pl.DataFrame,
    als_model: ComponentResult,
    item2vec_model: ComponentResult,
    item_item_model: ComponentResult,
    popularity_model: ComponentResult,
) -> dg.Output[TrainedHybrid]:
    """Blend weights tuned on validation nDCG@10 over every candidate generator."""
    results = {r.name: r for r in (als_model, item2vec_model, item_item_model, popularity_model)}
    final, on_validation, score = blend(results, training_split, item_catalog, seed=config.seed)
    weights = pl.DataFrame(
        {"component": list(final.weights), "weight": list(final.weights.values())}
    )
    return dg.Output(
        TrainedHybrid(final, on_validation, score, results),
        metadata={
            "weights": dg.MetadataValue.md(to_markdown(weights)),
            "validation_ndcg@10": score,
        },
    )


@dg.asset(group_name=GROUP, compute_kind="numpy")
def model_evaluation(
    training_split: SplitData, hybrid_ranker: TrainedHybrid
) -> dg.Output[pl.DataFrame]:
    """Precision, recall, nDCG, MAP, hit rate, coverage and novelty @10 for every model."""
    models = {name: r.validation_model for name, r in hybrid_ranker.components.items()} | {
        "hybrid": hybrid_ranker.on_validation
    }
    table = evaluate_models(models, training_split.train, training_split.validation, k=10)
    return dg.Output(
        table,
        metadata={
            "evaluation": dg.MetadataValue.md(to_markdown(table)),
            "hybrid_ndcg@10": float(table.filter(pl.col("model") == "hybrid")["ndcg@10"][0]),
        },
    )
