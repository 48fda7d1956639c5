"""Training time: the platform's ALS and Item2Vec against implicit / gensim, and whole runs.

Library mode (default): same data, same parameters, interleaved runs; prints the median seconds
and the ratio (target: the platform within 1.3x of the library).

Batch mode (--batch): `recsys batch-recommend` on ML-100k (target <= 30 s) and on
`recsys generate --users 600 --items 10000 --events 100000` (target <= 60 s), each in a fresh
RECSYS_HOME under `/usr/bin/time -v`: wall and CPU seconds, peak RSS and the seconds of each
training asset. With --before CHECKOUT the same runs use that checkout's `.venv/bin/recsys` too
(e.g. /work/main before a change), interleaved, so both sides see the same machine load.

    .venv/bin/python benchmarks/training_time.py [--repeats 5] [--data ml-100k | generated]
    .venv/bin/python benchmarks/training_time.py --batch [--before ../main] [--sets ml-100k gen-10k]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from gensim.models import Word2Vec
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import measure, step_times  # noqa: E402

from training.data import read_movielens  # noqa: E402
from training.evaluation import to_markdown  # noqa: E402
from training.models.als import ALSModel  # noqa: E402
from training.models.item2vec import Item2VecModel, session_sequences  # noqa: E402
from training.train import interactions_from  # noqa: E402

ML100K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k"
RECSYS = str(Path(sys.executable).parent / "recsys")
# The generated set of issue 12: few users, a catalog near EASE's limit (the costly shape).
GENERATED_10K = {"users": 600, "items": 10_000, "events": 100_000}
BATCH_TARGETS = {"ml-100k": 30.0, "gen-10k": 60.0}
ASSETS = ("als_model", "item2vec_model", "item_item_model", "hybrid_ranker")
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


def batch_inputs(name: str, work: Path) -> list[str] | None:
    """The `--events/--catalog` arguments of one data set (None when it is absent)."""
    if name == "ml-100k":
        return ["--events", str(ML100K)] if (ML100K / "u.data").exists() else None
    data = work / name
    gen = [RECSYS, "generate", "--seed", "0", "--out", str(data)]
    gen += [f"--{key}={value}" for key, value in GENERATED_10K.items()]
    subprocess.check_call(gen, stdout=subprocess.DEVNULL)
    return ["--events", str(data / "events.csv"), "--catalog", str(data / "catalog.csv")]


def cpu_seconds(log: Path) -> float:
    """User + system seconds that `/usr/bin/time -v` wrote to the log (nan without it)."""
    text = log.read_text(errors="replace")
    found = re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)
    return sum(float(v) for v in found) if found else float("nan")


def run_batch(sets: list[str], before: Path | None) -> int:
    """batch-recommend per data set with this checkout (and `before`'s), one table row each."""
    sides = {"now": RECSYS} | (
        {"before": str(before / ".venv" / "bin" / "recsys")} if before else {}
    )
    work = Path(tempfile.mkdtemp(prefix="recsys-bench-training-"))
    rows, failed = [], 0
    try:
        for name in sets:
            inputs = batch_inputs(name, work)
            if inputs is None:
                print(f"skipped {name}: MovieLens 100k not found at {ML100K}")
                continue
            for side, recsys in sides.items():
                run = work / f"{name}-{side}"
                log = run.with_suffix(".log")
                cmd = [recsys, "batch-recommend", *inputs, "--k", "10", "--out", str(run / "r.csv")]
                seconds, peak, code = measure(cmd, run / "home", log)
                failed += code != 0
                steps = dict(step_times(log))
                rows.append(
                    {
                        "data set": name,
                        "code": side,
                        "exit": code,
                        "wall_s": seconds,
                        "target_s": BATCH_TARGETS[name],
                        "cpu_s": cpu_seconds(log),
                        "peak_rss_gb": peak,
                        **{f"{asset}_s": steps.get(asset, float("nan")) for asset in ASSETS},
                        "other_steps_s": sum(v for k, v in steps.items() if k not in ASSETS),
                    }
                )
                print(f"{name} {side}: {seconds:.1f} s (log: {log})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n## recsys batch-recommend (k = 10), fresh RECSYS_HOME per run\n")
    print(to_markdown(pl.DataFrame(rows), digits=2))
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", choices=["ml-100k", "generated"], default="ml-100k")
    parser.add_argument("--batch", action="store_true", help="time whole batch-recommend runs")
    parser.add_argument(
        "--sets", nargs="+", choices=list(BATCH_TARGETS), default=list(BATCH_TARGETS)
    )
    parser.add_argument("--before", type=Path, help="a checkout whose .venv to compare against")
    args = parser.parse_args()
    if args.batch:
        return run_batch(args.sets, args.before)
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
