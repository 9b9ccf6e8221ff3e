"""Small aggregations over Ray datasets without a shuffle.

``Dataset.groupby(...).count()`` and ``Dataset.sum()`` run a hash shuffle, which costs
seconds of fixed overhead per call on a small cluster even for a few rows. Counters need
no shuffle: each block reduces itself with pandas and the driver adds up one small table
per block (only counts reach the driver, never records).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd


def _partial(batch: pd.DataFrame, keys: list[str], values: list[str]) -> pd.DataFrame:
    if not len(batch):
        return pd.DataFrame(columns=[*keys, *values, "_n"])
    if not keys:
        out = batch[values].sum().to_frame().T
        out["_n"] = len(batch)
        return out
    g = batch.groupby(keys, sort=False)
    out = g[values].sum() if values else g.size().to_frame("_n")
    if values:
        out["_n"] = g.size()
    return out.reset_index()


def totals_by(ds, keys: Sequence[str] = (), values: Sequence[str] = ()) -> dict[Any, dict[str, int]]:
    """{key (a value, or a tuple for several keys; None without keys): {value column: sum,
    "count": rows}} over the whole dataset."""
    keys, values = list(keys), list(values)
    parts = ds.select_columns([*keys, *values]).map_batches(
        _partial, batch_format="pandas", fn_kwargs={"keys": keys, "values": values}).take_all()
    result: dict[Any, dict[str, int]] = {}
    for row in parts:
        key = None if not keys else row[keys[0]] if len(keys) == 1 else tuple(row[k] for k in keys)
        acc = result.setdefault(key, {v: 0 for v in values} | {"count": 0})
        for v in values:
            acc[v] += int(row[v])
        acc["count"] += int(row["_n"])
    return result
