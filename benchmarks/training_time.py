"""Training time of the platform's ALS and Item2Vec against calling implicit / gensim directly.

Same data, same parameters, interleaved runs; prints the median seconds and the ratio
(target: the platform within 1.3x of the library).

    .venv/bin/python benchmarks/training_time.py [--repeats 5] [--data ml-100k | generated]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
from gensim.models import Word2Vec
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import read_movielens  # noqa: E402
from training.evaluation import to_markdown  # noqa: E402
from training.models.als import ALSModel  # noqa: E402
from training.models.item2vec import Item2VecModel, session_sequences  # noqa: E402
from training.train import interactions_from  # noqa: E402

ML100K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k"
ALS_PARAMS = {"factors": 64, "regularization": 20.0, "alpha": 1.0, "iterations": 15}
I2V_PARAMS = {"vector_size": 64, "window": 5, "negative": 5, "epochs": 10, "min_count": 1}


def load(data: str) -> pl.DataFrame:
    if data == "ml-100k":
        if not (ML100K / "u.data").exists():
            raise SystemExit(f"skipped: MovieLens 100k not found at {ML100K}")
        return read_movielens(ML100K)[0]
    from training.generate import generate

    return generate(20_000, 5_000, 1_000_000, seed=0).events


def timed(fn) -> float:  # noqa: ANN001
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", choices=["ml-100k", "generated"], default="ml-100k")
    args = parser.parse_args()
    events = load(args.data)
    matrix = interactions_from(events)
    csr = matrix.matrix
    ours_als = ALSModel(**ALS_PARAMS, bm25=False)
    weighted = ours_als._weight(csr)  # the exact input both sides train on

    def direct_als() -> None:
        with threadpool_limits(1, "blas"):
            AlternatingLeastSquares(**ALS_PARAMS, random_state=0).fit(weighted, show_progress=False)

    def platform_als() -> None:
        ALSModel(**ALS_PARAMS, bm25=False, random_state=0).fit(csr)

    sequences = session_sequences(events, matrix.item_ids, 30.0)

    def direct_i2v() -> None:
        Word2Vec(sentences=sequences, sg=1, sample=1e-3, workers=2, seed=0, **I2V_PARAMS)

    def platform_i2v() -> None:
        Item2VecModel(**I2V_PARAMS, workers=2, seed=0).fit_sequences(sequences, csr.shape[1])

    results: dict[str, list[float]] = {
        k: [] for k in ("als direct", "als platform", "i2v direct", "i2v platform")
    }
    for _ in range(args.repeats):  # interleaved so machine noise hits both sides alike
        results["als direct"].append(timed(direct_als))
        results["als platform"].append(timed(platform_als))
        results["i2v direct"].append(timed(direct_i2v))
        results["i2v platform"].append(timed(platform_i2v))
    med = {k: statistics.median(v) for k, v in results.items()}
    table = pl.DataFrame(
        {
            "model": ["ALS (implicit)", "Item2Vec (gensim)"],
            "direct_s": [med["als direct"], med["i2v direct"]],
            "platform_s": [med["als platform"], med["i2v platform"]],
            "ratio": [
                med["als platform"] / med["als direct"],
                med["i2v platform"] / med["i2v direct"],
            ],
        }
    )
    print(
        f"\n## Training time, {args.data}: {csr.shape[0]} users x {csr.shape[1]} items, "
        f"{csr.nnz} interactions; median of {args.repeats} interleaved runs\n"
    )
    print(to_markdown(table, digits=3))
    tokens = int(np.sum([len(s) for s in sequences]))
    print(f"\nitem2vec sequences: {len(sequences)}, tokens: {tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
