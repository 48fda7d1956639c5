"""Wall time and peak memory of whole commands: batch-recommend on ML-100k, pipeline at scale.

Each command runs in a fresh RECSYS_HOME under `/usr/bin/time -v` (falling back to
resource.getrusage of the child when absent); the table shows elapsed seconds and peak RSS.

    .venv/bin/python benchmarks/scale.py ml100k            # recsys batch-recommend (target <= 30 s)
    .venv/bin/python benchmarks/scale.py scale [--events 5000000 --users 500000 --items 50000]
                                                            # recsys pipeline (<= 20 min, <= 12 GB)
    .venv/bin/python benchmarks/scale.py scale --executors in_process,multiprocess
                                    # the same pipeline per RECSYS_DAGSTER_EXECUTOR, side by side
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "datasets" / "ml-100k"
RECSYS = str(Path(sys.executable).parent / "recsys")


def measure(
    cmd: list[str], home: Path, log: Path, extra_env: dict[str, str] | None = None
) -> tuple[float, float, int]:
    """Run `cmd` with RECSYS_HOME=home; return (seconds, peak RSS in GB, exit code).

    The peak is of the largest single process (GNU time's figure): with the multiprocess
    executor, steps' processes add up beside it.
    """
    env = {**os.environ, "RECSYS_HOME": str(home), **(extra_env or {})}
    timer = shutil.which("time") or "/usr/bin/time"
    wrapped = [timer, "-v", *cmd] if Path(timer).exists() else cmd
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(wrapped, env=env, stdout=out, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - started
    text = log.read_text(errors="replace")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if match:
        peak_gb = int(match.group(1)) / 1024 / 1024
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 / 1024
    return elapsed, peak_gb, code


def step_times(log: Path) -> list[tuple[str, float]]:
    """The per-step seconds the CLI printed (`ok  step (12.3s)`)."""
    pattern = re.compile(r"^\s+ok\s+(\S+) \(([\d.]+)s\)", re.MULTILINE)
    return [(m.group(1), float(m.group(2))) for m in pattern.finditer(log.read_text())]


def print_table(rows: list[tuple[str, str, str]]) -> None:
    print("| measure | value | target |")
    print("| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def run_ml100k(work: Path) -> int:
    if not (ML100K / "u.data").exists():
        print(f"skipped: MovieLens 100k not found at {ML100K}")
        return 0
    out = work / "recs.csv"
    log = work / "batch.log"
    cmd = [RECSYS, "batch-recommend", "--events", str(ML100K), "--k", "10", "--out", str(out)]
    seconds, peak, code = measure(cmd, work / "home", log)
    print("\n## recsys batch-recommend on ML-100k (k = 10)\n")
    print_table(
        [
            ("exit code", str(code), "0"),
            ("wall time (s)", f"{seconds:.1f}", "<= 30"),
            ("peak RSS (GB)", f"{peak:.2f}", ""),
            ("rows written", str(sum(1 for _ in out.open()) - 1 if out.exists() else 0), "9430"),
        ]
    )
    _print_steps(log)
    return code


def run_scale(
    work: Path, users: int, items: int, events: int, data: Path | None, executors: list[str]
) -> int:
    data = data or work / "data"
    if not (data / "events.csv").exists():
        gen = [
            RECSYS,
            "generate",
            "--users",
            str(users),
            "--items",
            str(items),
            "--events",
            str(events),
            "--seed",
            "0",
            "--out",
            str(data),
        ]
        subprocess.check_call(gen)
    cmd = [
        RECSYS,
        "pipeline",
        "--events",
        str(data / "events.csv"),
        "--catalog",
        str(data / "catalog.csv"),
    ]
    runs = []
    for executor in executors:
        log = work / f"pipeline-{executor}.log"
        env = {"RECSYS_DAGSTER_EXECUTOR": executor}
        seconds, peak, code = measure(cmd, work / f"home-{executor}", log, env)
        runs.append((executor, seconds, peak, code, log))
    print(
        f"\n## recsys pipeline on generated data ({events} events, {users} users, {items} items)\n"
    )
    if len(runs) == 1:
        _, seconds, peak, code, log = runs[0]
        print_table(
            [
                ("exit code", str(code), "0"),
                ("wall time (min)", f"{seconds / 60:.1f}", "<= 20"),
                ("peak RSS (GB)", f"{peak:.2f}", "<= 12"),
            ]
        )
        _print_steps(log)
        return code
    base = runs[0][1]
    print("| RECSYS_DAGSTER_EXECUTOR | exit code | wall time (min) | vs first | peak RSS (GB) |")
    print("| --- | --- | --- | --- | --- |")
    for executor, seconds, peak, code, _ in runs:
        print(f"| {executor} | {code} | {seconds / 60:.1f} | {seconds / base:.2f} | {peak:.2f} |")
    steps = {executor: dict(step_times(log)) for executor, *_, log in runs}
    names = list(dict.fromkeys(name for found in steps.values() for name in found))
    print("\n| step | " + " | ".join(steps) + " |")
    print("| --- |" + " --- |" * len(steps))
    for name in names:
        row = [f"{steps[e][name]:.1f}" if name in steps[e] else "" for e in steps]
        print(f"| {name} | " + " | ".join(row) + " |")
    print("\nfull logs: " + ", ".join(str(run[4]) for run in runs))
    return max(run[3] for run in runs)


def _print_steps(log: Path) -> None:
    steps = step_times(log)
    if steps:
        print("\n| step | seconds |\n| --- | --- |")
        for name, secs in steps:
            print(f"| {name} | {secs:.1f} |")
    print(f"\nfull log: {log}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("which", choices=["ml100k", "scale"])
    parser.add_argument("--users", type=int, default=500_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--data", type=Path, help="an existing generated folder to reuse")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (for the log)")
    parser.add_argument(
        "--executors",
        default="",
        help="comma-separated RECSYS_DAGSTER_EXECUTOR values to run the pipeline with, in turn "
        "(default: the environment's)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix=f"recsys-bench-{args.which}-"))
    try:
        if args.which == "ml100k":
            return run_ml100k(work)
        executors = [e for e in args.executors.split(",") if e] or [
            os.environ.get("RECSYS_DAGSTER_EXECUTOR", "multiprocess")
        ]
        return run_scale(work, args.users, args.items, args.events, args.data, executors)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
