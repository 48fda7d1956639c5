"""Accuracy on MovieLens 100k: per-user random 75/25 split, every held-out rating relevant.

The 75% goes through the platform's own asset graph (offline_job, default configs unless a
variant says otherwise); every model and the hybrid are then scored on the 25% with seen items
excluded, k = 10. Prints one table per variant and the median over seeds.

    .venv/bin/python benchmarks/accuracy.py [--seeds 42 43 44] [--data ../shared/datasets/ml-100k]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import read_movielens  # noqa: E402
from training.evaluation import evaluate_all, to_markdown  # noqa: E402
from training.matrix import split_per_user  # noqa: E402
from training.train import interactions_from  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k"
VARIANTS: dict[str, dict] = {
    "defaults": {},
    "binary ratings": {"interaction_matrix": {"config": {"binary_ratings": True}}},
}


def split_events(events: pl.DataFrame, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per-user random 75/25 split of the (user, item) pairs; returns (train events, test pairs)."""
    full = interactions_from(events)
    train, test = split_per_user(full.matrix, 0.25, seed=seed)
    coo = test.tocoo()
    test_pairs = pl.DataFrame(
        {
            "user_id": full.user_ids[coo.row].astype(str),
            "item_id": full.item_ids[coo.col].astype(str),
        }
    )
    train_events = events.join(test_pairs, on=["user_id", "item_id"], how="anti")
    return train_events, test_pairs


def test_matrix(bundle, test_pairs: pl.DataFrame) -> sp.csr_matrix:  # noqa: ANN001
    """Held-out pairs in the bundle's index; items it never saw get extra (unreachable) columns."""
    rows = bundle.user_index(test_pairs["user_id"].to_numpy())
    cols = bundle.item_index(test_pairs["item_id"].to_numpy())
    unknown = cols < 0
    extra = pl.Series(test_pairs["item_id"].to_numpy()[unknown]).unique().to_list()
    extra_pos = {item: bundle.n_items + i for i, item in enumerate(extra)}
    cols = cols.copy()
    cols[unknown] = [extra_pos[i] for i in test_pairs["item_id"].to_numpy()[unknown]]
    keep = rows >= 0
    return sp.csr_matrix(
        (np.ones(keep.sum(), dtype=np.float32), (rows[keep], cols[keep])),
        shape=(len(bundle.user_ids), bundle.n_items + len(extra)),
    )


def run_variant(train_events: pl.DataFrame, ops: dict, scratch: Path) -> tuple[dict, float]:
    """Train through the asset graph on the training events; return (hybrid output, seconds)."""
    from orchestration.cli import _scratch_resources
    from orchestration.runner import run_job

    path = scratch / "train.parquet"
    train_events.write_parquet(path)
    # MovieLens 100k is from 1997-98, before the contract's default earliest time.
    earliest = int(train_events["timestamp"].min())
    raw = {"events_path": str(path), "earliest_timestamp": earliest}
    config = {"ops": {"raw_events": {"config": raw}, **ops}}
    started = time.perf_counter()
    result = run_job(
        "offline_job",
        config,
        resources=_scratch_resources(scratch),
        persistent=False,
        show_progress=False,
    )
    if not result.success:
        raise SystemExit("the offline job failed")
    return result.output_for_node("hybrid_ranker"), time.perf_counter() - started


def evaluate(trained, test_pairs: pl.DataFrame) -> dict[str, dict[str, float]]:  # noqa: ANN001
    bundle = trained.final
    held = test_matrix(bundle, test_pairs)
    users = np.flatnonzero(np.diff(held.indptr) > 0)
    train = bundle.user_items
    padded_train = sp.hstack(
        [train, sp.csr_matrix((train.shape[0], held.shape[1] - train.shape[1]))]
    ).tocsr()
    out = {}
    models = {name: c.model for name, c in trained.components.items()} | {"hybrid": bundle}
    for name, model in models.items():
        recs, _ = model.recommend(train[users], users, k=10)
        out[name] = evaluate_all(recs, held[users], padded_train, k=10)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    if not (args.data / "u.data").exists():
        print(f"skipped: MovieLens 100k not found at {args.data}")
        return 0
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    events, _ = read_movielens(args.data)
    for variant in args.variants:
        per_seed: dict[str, list[dict[str, float]]] = {}
        seconds = []
        weights = []
        for seed in args.seeds:
            train_events, test_pairs = split_events(events, seed)
            with tempfile.TemporaryDirectory() as tmp:
                trained, took = run_variant(train_events, VARIANTS[variant], Path(tmp))
            seconds.append(took)
            weights.append(trained.final.weights)
            for name, metrics in evaluate(trained, test_pairs).items():
                per_seed.setdefault(name, []).append(metrics)
        rows = []
        for name, runs in per_seed.items():
            row = {"model": name}
            for metric in runs[0]:
                row[metric] = statistics.median(r[metric] for r in runs)
            row["ndcg@10 per seed"] = " ".join(f"{r['ndcg@10']:.4f}" for r in runs)
            rows.append(row)
        print(f"\n## ML-100k, variant '{variant}', seeds {args.seeds} (median over seeds)\n")
        print(to_markdown(pl.DataFrame(rows)))
        print(f"\ngraph run time per seed (s): {' '.join(f'{s:.1f}' for s in seconds)}")
        print(f"blend weights per seed: {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
