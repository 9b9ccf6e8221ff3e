"""Histograms of the filter statistics, with the recipe's thresholds drawn on them.

The point is to judge thresholds on one's own corpus, as Steel-LLM did with data-juicer's
analyzer (its code recipe sets most bounds at 3 sigma of the corpus): each plot shows the
whole distribution (stats are computed for every document, also the ones an earlier
filter dropped) and what share falls outside the bounds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from steelworks.data.recipe import FilterSpec, Recipe

_BINS = 50


def _bins(values: np.ndarray, f: FilterSpec) -> tuple[np.ndarray, bool]:
    """Bin edges, and whether the x axis is logarithmic: lengths span decades, so positive
    stats with a range over 100x get log-spaced bins."""
    lo, hi = float(values.min()), float(values.max())
    for b in (f.min, f.max):  # keep the thresholds in view
        if b is not None and np.isfinite(b):
            lo, hi = min(lo, b), max(hi, b)
    if lo > 0 and hi / lo > 100:
        return np.geomspace(lo, hi, _BINS + 1), True
    if hi == lo:
        hi = lo + 1.0
    return np.linspace(lo, hi, _BINS + 1), False


def _outside(values: np.ndarray, f: FilterSpec) -> np.ndarray:
    out = np.zeros(len(values), dtype=bool)
    if f.min is not None:
        out |= values < f.min
    if f.max is not None:
        out |= values > f.max
    return out


def plot_stat_histograms(stats: pd.DataFrame, recipe: Recipe, out_dir: Path) -> list[str]:
    """One PNG per filter of ``recipe`` whose ``stat_<name>`` column is in ``stats``
    (NaN rows skipped), stacked by ``source`` when that column exists. Each file is written
    to a temporary name and renamed into place. Returns the file names, in recipe order."""
    # Figures made directly on the Agg canvas, not through pyplot: pyplot keeps global
    # state, and the data stage draws these in a thread while Ray writes the shards.
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for f in recipe.filters:
        if f.column not in stats.columns:
            continue
        frame = stats[stats[f.column].notna()]
        values = frame[f.column].to_numpy(dtype=float)
        if len(values) == 0:
            continue
        edges, log_x = _bins(values, f)
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        if "source" in frame.columns and frame["source"].nunique() > 1:
            groups = sorted(frame["source"].astype(str).unique())
            data = [frame.loc[frame["source"].astype(str) == g, f.column].to_numpy(dtype=float)
                    for g in groups]
            ax.hist(data, bins=edges, stacked=True, label=groups)
            ax.legend(fontsize=8)
        else:
            ax.hist(values, bins=edges, color="tab:blue")
        for bound, label in ((f.min, "min"), (f.max, "max")):
            if bound is not None:
                ax.axvline(bound, color="tab:red", linestyle="--", linewidth=1.2,
                           label=f"{label} {bound:g}")
        if log_x:
            ax.set_xscale("log")
        share = 100.0 * _outside(values, f).mean()
        label = f.stat if f.op == f.stat else f"{f.stat} ({f.op})"
        ax.set_title(f"{label}: n={len(values):,} docs, {share:.1f}% outside bounds")
        ax.set_xlabel(f.stat)
        ax.set_ylabel("documents")
        fig.tight_layout()
        name = f"{f.column}.png"
        tmp = out_dir / f".{name}.tmp"
        fig.savefig(tmp, format="png", dpi=90)
        os.replace(tmp, out_dir / name)
        written.append(name)
    return written
