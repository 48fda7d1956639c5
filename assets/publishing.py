"""Publishing assets: batch recommendations, item neighbours, the gate's decision and, last of
all, the MLflow-registered model (promoted to champion when the gate says so)."""

import json
import tempfile
import time
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import polars as pl
from pydantic import Field

from assets.models import TrainedHybrid
from assets.resources import EXTERNAL_RETRY, EventStoreResource, MLflowResource
from training.evaluation import to_markdown
from training.lineage import DAGSTER, DataSummary, TrainingLineage
from training.matrix import InteractionMatrix
from training.registry import GATE_METRIC, flatten_params, metric_key
from training.train import SplitData

GROUP = "publishing"


class GateConfig(dg.Config):
    """The evaluation gate between challenger and champion."""

    margin: float = Field(
        default=0.0, description="nDCG@10 the challenger must gain over the champion to replace it."
    )


class BatchConfig(dg.Config):
    k: int = Field(default=20, description="Recommendations per user.")
    ttl_hours: float = Field(default=24.0, description="How long a batch list stays valid.")


class NeighborsConfig(dg.Config):
    k: int = Field(default=100, description="Neighbours per item.")


def _evaluation_plot(table: pl.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c for c in ("precision@10", "recall@10", "ndcg@10", "map@10") if c in table.columns]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(metrics), 1)
    x = np.arange(table.height)
    for i, metric in enumerate(metrics):
        ax.bar(x + i * width, table[metric].to_numpy(), width, label=metric)
    ax.set_xticks(x + width * (len(metrics) - 1) / 2, table["model"].to_list())
    ax.set_title("Validation metrics per model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dg.asset(group_name=GROUP, compute_kind="numpy", retry_policy=EXTERNAL_RETRY)
def batch_recommendations(
    context: dg.AssetExecutionContext,
    config: BatchConfig,
    event_store: EventStoreResource,
    interaction_matrix: InteractionMatrix,
    hybrid_ranker: TrainedHybrid,
) -> dg.Output[pl.DataFrame]:
    """Top-k per user, never an item the user interacted with, landed in the event store's
    `user_recommendations` table (replacing the previous lists in one step).

    The registry's version number is given only at registration, the run's last step: until
    then a row's `model_version` names the Dagster run (`run:<run id>`), and `registered_model`
    relabels the rows with the version it registered (lists of a run that registers nothing,
    `recsys batch-recommend`, keep the run's name).
    """
    bundle = hybrid_ranker.final
    started = time.perf_counter()
    next_report = [0.1]

    def report(done: int, total: int) -> None:
        if done / total >= next_report[0] or done == total:
            rate = done / max(time.perf_counter() - started, 1e-9)
            context.log.info(f"batch lists: {done}/{total} users ({rate:.0f} users/s)")
            next_report[0] = done / total + 0.1

    recs = bundle.recommend_ids(
        interaction_matrix.user_ids, k=config.k, exclude_seen=True, progress=report
    )
    now = int(time.time())
    recs = recs.with_columns(
        pl.from_epoch(pl.lit(now), time_unit="s").dt.replace_time_zone("UTC").alias("generated_at"),
        pl.from_epoch(pl.lit(now + int(config.ttl_hours * 3600)), time_unit="s")
        .dt.replace_time_zone("UTC")
        .alias("expires_at"),
        pl.lit(_run_label(context.run_id)).alias("model_version"),
    )
    with event_store.open() as store:
        written = store.replace_recommendations(recs)
    return dg.Output(
        recs,
        metadata={
            "rows": recs.height,
            "table_rows": written,
            "users": recs["user_id"].n_unique(),
            "seconds": round(time.perf_counter() - started, 2),
            "preview": dg.MetadataValue.md(
                to_markdown(recs.head(10).drop("generated_at", "expires_at"))
            ),
        },
    )


def _run_label(run_id: str) -> str:
    return f"run:{run_id}"


@dg.asset_check(
    asset=batch_recommendations,
    blocking=True,
    additional_ins={"interaction_matrix": dg.AssetIn("interaction_matrix")},
)
def batch_recommendations_exclude_seen(
    interaction_matrix: InteractionMatrix, batch_recommendations: pl.DataFrame
) -> dg.AssetCheckResult:
    """No user is recommended an item they already interacted with, nor one item twice."""
    recs = batch_recommendations
    rows = interaction_matrix.user_index(recs["user_id"].to_numpy())
    cols = interaction_matrix.item_index(recs["item_id"].to_numpy())
    # scipy returns a sparse matrix, not an array, for an empty fancy index: a user who has seen
    # every item gets an empty list, which is correct and must not crash the check.
    seen = (
        np.asarray(interaction_matrix.matrix[rows, cols]).ravel() > 0
        if recs.height
        else np.zeros(0, dtype=bool)
    )
    duplicates = recs.height - recs.select("user_id", "item_id").unique().height
    return dg.AssetCheckResult(
        passed=bool(not seen.any() and duplicates == 0),
        metadata={"seen_items": int(seen.sum()), "duplicates": duplicates},
    )


@dg.asset(group_name=GROUP, compute_kind="numpy")
def item_neighbors(
    config: NeighborsConfig, hybrid_ranker: TrainedHybrid
) -> dg.Output[pl.DataFrame]:
    """Top-k similar items per item from the item-item model (item_id, neighbor_id, rank, score)."""
    table = hybrid_ranker.final.item_neighbors(k=config.k)
    return dg.Output(
        table,
        metadata={
            "rows": table.height,
            "items": table["item_id"].n_unique() if table.height else 0,
        },
    )


@dg.asset_check(asset=item_neighbors, blocking=True)
def item_neighbors_valid(item_neighbors: pl.DataFrame) -> dg.AssetCheckResult:
    """No item is its own neighbour or lists a neighbour twice, and every score is finite."""
    table = item_neighbors
    self_pairs = table.filter(pl.col("item_id") == pl.col("neighbor_id")).height
    duplicates = table.height - table.select("item_id", "neighbor_id").unique().height
    non_finite = int((~np.isfinite(table["score"].to_numpy())).sum()) if table.height else 0
    return dg.AssetCheckResult(
        passed=self_pairs == 0 and duplicates == 0 and non_finite == 0,
        metadata={"self_pairs": self_pairs, "duplicates": duplicates, "non_finite": non_finite},
    )


def _gate_value(model_evaluation: pl.DataFrame) -> float:
    return float(model_evaluation.filter(pl.col("model") == "hybrid")["ndcg@10"][0])


@dg.asset(group_name=GROUP, compute_kind="mlflow", retry_policy=EXTERNAL_RETRY)
def champion_gate(
    context: dg.AssetExecutionContext,
    config: GateConfig,
    tracking: MLflowResource,
    model_evaluation: pl.DataFrame,
) -> dg.Output[dict]:
    """Whether this run's hybrid would replace the champion: decided here, applied on register.

    Decided before anything is published, so the push to Redis knows whether to happen while
    registration stays the run's last step.
    """
    decision = tracking.registry().decide(_gate_value(model_evaluation), config.margin)
    context.log.info(f"gate: {decision.reason}")
    result = {
        "promote": decision.promoted,
        "reason": decision.reason,
        "margin": decision.margin,
        "validation_ndcg@10": decision.challenger_value,
        "champion_before": decision.champion_version,
    }
    return dg.Output(result, metadata={"promote": decision.promoted, "gate": decision.reason})


# Registration is the run's last step: it waits for every other asset of the training job and
# for their blocking checks, so a run that fails anywhere never registers a version nor moves
# `champion`. The features pushed to Redis just before are those of the model about to serve.
@dg.asset(
    group_name=GROUP,
    compute_kind="mlflow",
    retry_policy=EXTERNAL_RETRY,
    deps=[
        batch_recommendations,
        item_neighbors,
        dg.AssetKey("online_features"),
        dg.AssetKey("online_popularity"),
        dg.AssetKey("online_catalog"),
    ],
)
def registered_model(
    context: dg.AssetExecutionContext,
    tracking: MLflowResource,
    event_store: EventStoreResource,
    interaction_matrix: InteractionMatrix,
    training_split: SplitData,
    hybrid_ranker: TrainedHybrid,
    model_evaluation: pl.DataFrame,
    champion_gate: dict,
) -> dg.Output[dict]:
    """The trained hybrid logged to MLflow, registered as `challenger`, promoted by the gate."""
    registry = tracking.registry()
    gate_value = _gate_value(model_evaluation)
    tags = {"dagster_run_id": context.run_id, "orchestrator": "dagster"}
    with registry.start_run(f"hybrid-{context.run_id[:8]}", tags) as run:
        params = flatten_params("matrix.", interaction_matrix.params)
        for name, component in hybrid_ranker.components.items():
            params.update(flatten_params(f"{name}.", component.params))
        params.update({f"weight.{k}": str(v) for k, v in hybrid_ranker.final.weights.items()})
        params["users"], params["items"] = (str(v) for v in interaction_matrix.shape)
        params["interactions"] = str(interaction_matrix.nnz)
        mlflow.log_params(params)
        metrics = {
            f"{row['model']}_validation_{metric_key(col)}": float(row[col])
            for row in model_evaluation.iter_rows(named=True)
            for col in model_evaluation.columns
            if col != "model"
        }
        metrics[GATE_METRIC] = gate_value
        for name, component in hybrid_ranker.components.items():
            metrics[f"{name}_fit_seconds"] = component.fit_seconds
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "evaluation.md").write_text(to_markdown(model_evaluation) + "\n")
            model_evaluation.write_csv(folder / "evaluation.csv")
            _evaluation_plot(model_evaluation, folder / "evaluation.png")
            tuning = {name: c.tuning for name, c in hybrid_ranker.components.items()}
            (folder / "tuning.json").write_text(json.dumps(tuning, indent=2, default=str))
            mlflow.log_artifacts(str(folder), artifact_path="evaluation")
        # What `recsys lineage` and every answer of the service trace the version back to.
        lineage = TrainingLineage(
            DAGSTER, context.run_id, DataSummary.of(training_split.events, event_store.kind())
        )
        version = registry.log_bundle(hybrid_ranker.final, lineage)
        run_id = run.info.run_id
    with event_store.open() as store:
        store.relabel_recommendations(_run_label(context.run_id), str(version))
    # The gate is decided again against the champion of this moment: another run may have
    # promoted one since champion_gate looked.
    decision = registry.gate(version, gate_value, champion_gate["margin"])
    context.log.info(f"model version {version}: {decision.reason}")
    if decision.promoted != champion_gate["promote"]:
        context.log.warning(
            f"the champion changed during the run ({champion_gate['reason']}, now "
            f"{decision.reason}): the features in Redis are not the champion's until the next run"
        )
    result = {
        "model_name": registry.model_name,
        "version": version,
        "run_id": run_id,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "validation_ndcg@10": gate_value,
        "champion_before": decision.champion_version,
    }
    return dg.Output(
        result,
        metadata={
            "version": version,
            "promoted": decision.promoted,
            "gate": decision.reason,
            "mlflow_run_id": run_id,
            "tracking_uri": registry.tracking_uri,
            "training_events": lineage.data.event_count if lineage.data else 0,
        },
    )
