"""Plots of the analytics assets (top movers, segment shares), embedded in Dagster metadata."""

import base64
from pathlib import Path
from types import ModuleType

import dagster as dg
import polars as pl

from training.trends import TREND_TYPES

TREND_COLORS = {
    "stable": "#9e9e9e",
    "rising": "#2e7d32",
    "falling": "#c62828",
    "volatile": "#ef6c00",
}


def _pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend, imported on first use rather than at import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def movers_plot(items: pl.DataFrame, movers: pl.DataFrame, path: Path) -> Path:
    """Items per trend type beside the top movers' fitted log change, as a PNG at `path`."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    counts = [int((items["trend_type"] == t).sum()) for t in TREND_TYPES]
    left.bar(TREND_TYPES, counts, color=[TREND_COLORS[t] for t in TREND_TYPES])
    left.set_title("Items per trend type")
    if movers.height:
        shown = movers.reverse()
        labels = [f"{i} ({c})" for i, c in zip(shown["item_id"], shown["category"], strict=True)]
        colors = [TREND_COLORS[t] for t in shown["trend_type"]]
        right.barh(labels, shown["log_change"].to_numpy(), color=colors)
        right.axvline(0.0, color="black", linewidth=0.8)
        right.set_xlabel("fitted log change across the window (0.7 = about 2x)")
        right.tick_params(axis="y", labelsize=8)
    else:
        right.text(0.5, 0.5, "no rising, falling, volatile or bursting item", ha="center")
        right.set_axis_off()
    right.set_title(f"Top {movers.height} movers (strength x confidence)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def shares_plot(profile: pl.DataFrame, path: Path) -> Path:
    """The share of users per segment (a `segment_profile` frame), as a PNG at `path`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    shown = profile.sort("share")
    ax.barh(shown["segment"].to_list(), shown["share"].to_numpy(), color="#1565c0")
    ax.set_xlabel("share of users")
    ax.set_title("User segments")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def inline_png(path: Path, alt: str) -> dg.MetadataValue:
    """A PNG embedded in Markdown metadata, so the Dagster UI shows the plot itself."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})")
