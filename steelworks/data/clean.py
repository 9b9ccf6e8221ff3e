"""The cleaning job on Ray Data: read JSON lines -> normalize -> filter -> exact dedup.

Every input line ends in exactly one bucket (kept, filtered:<name>, duplicate, quarantined),
so read = kept + filtered + duplicate + quarantined always holds; malformed lines go to
``quarantine.jsonl`` with file, line and reason. Exact dedup is a distributed group-by on
the normalized-text hash (no global set in the driver); within a group the record with the
smallest (path, line) wins, so the same input always keeps the same representative.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steelworks.data.config import DataConfig, SourceConfig

KEPT, DUPLICATE, QUARANTINED = "kept", "duplicate", "quarantined"
_WS = re.compile(r"[ \t\u3000]+")
_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def expand_paths(pattern: str) -> list[str]:
    """A file, a glob or a directory (all *.jsonl below it), sorted for determinism."""
    p = Path(pattern)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*.jsonl"))
    else:
        files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no input files match {pattern!r}")
    return files


def normalize(text: str) -> str:
    """NFKC, drop control characters, collapse runs of spaces, trim each line."""
    text = unicodedata.normalize("NFKC", text)
    text = _CTRL.sub("", text)
    lines = [_WS.sub(" ", line).strip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(line for line in lines if line)


def parse_file(row: dict[str, Any], source: SourceConfig) -> list[dict[str, Any]]:
    """One input file -> one record per line (ok or quarantined, with the reason)."""
    path = row["path"]
    out = []
    raw = row["bytes"].decode("utf-8", errors="replace")
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        rec = {"source": source.name, "path": path, "line": lineno, "text": "", "status": KEPT,
               "reason": "", "raw": ""}
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            text = obj.get(source.text_field)
            if not isinstance(text, str):
                raise ValueError(f"field {source.text_field!r} missing or not a string")
            rec["text"] = text
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            rec.update(status=QUARANTINED, reason=str(e), raw=line[:2000])
        out.append(rec)
    return out


def normalize_and_filter(batch: pd.DataFrame, min_chars: int, max_chars: int) -> pd.DataFrame:
    """Normalize kept rows and mark those outside the length bounds as filtered."""
    batch = batch.copy()
    ok = batch["status"] == KEPT
    batch.loc[ok, "text"] = batch.loc[ok, "text"].map(normalize)
    lengths = batch["text"].str.len()
    batch.loc[ok & (lengths < min_chars), "status"] = "filtered:too_short"
    batch.loc[ok & (lengths > max_chars), "status"] = "filtered:too_long"
    batch["hash"] = [
        hashlib.sha1(t.encode("utf-8")).hexdigest() if s == KEPT else f"{p}:{n}"
        for t, s, p, n in zip(batch["text"], batch["status"], batch["path"], batch["line"])
    ]
    return batch


def mark_duplicates(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Within one hash group, keep the first kept record by (path, line); mark the rest.
    Numpy, with a fast path for the common singleton group: this runs once per document."""
    if len(group["status"]) == 1:
        return group
    order = np.lexsort((group["line"], group["path"]))
    group = {k: v[order] for k, v in group.items()}
    kept = np.flatnonzero(group["status"] == KEPT)
    if len(kept) > 1:
        status = group["status"].astype(object)
        status[kept[1:]] = DUPLICATE
        group["status"] = status
    return group


def run_clean(cfg: DataConfig, sources: list[SourceConfig], out_dir: Path) -> dict[str, Any]:
    """Run the cleaning job; writes ``clean/part-*.parquet`` and ``quarantine.jsonl``."""
    import ray

    from steelworks.platform.atomic import atomic_open

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic outputs, run after run
    # Ray's default of 200 shuffle partitions costs minutes of task overhead on small inputs;
    # use one partition per ~128 MB of input, at least one per CPU in the cluster.
    in_bytes = sum(Path(f).stat().st_size for s in sources for f in expand_paths(s.path))
    partitions = max(int(ray.cluster_resources().get("CPU", 1)), in_bytes // (128 << 20))
    ctx.default_hash_shuffle_parallelism = partitions
    datasets = []
    for src in sources:
        files = expand_paths(src.path)
        ds = ray.data.read_binary_files(files, include_paths=True)
        datasets.append(ds.flat_map(parse_file, fn_kwargs={"source": src}))
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    ds = ds.map_batches(normalize_and_filter, batch_format="pandas",
                        fn_kwargs={"min_chars": cfg.min_chars, "max_chars": cfg.max_chars})
    if cfg.dedup == "exact":
        ds = ds.groupby("hash", num_partitions=partitions).map_groups(mark_duplicates, batch_format="numpy")
    ds = ds.materialize()

    # Accounting: counts per (source, status); totals must add up.
    counts: dict[str, dict[str, int]] = {}
    for row in ds.groupby(["source", "status"], num_partitions=partitions).count().take_all():
        counts.setdefault(row["source"], {})[row["status"]] = int(row["count()"])
    for c in counts.values():
        c["read"] = sum(v for k, v in c.items())

    kept = (ds.filter(lambda r: r["status"] == KEPT)
              .select_columns(["source", "path", "line", "text"])
              .sort(["path", "line"])
              .repartition(cfg.num_shards))
    outputs = write_parquet_dir(kept, out_dir, "clean")
    quarantine = ds.filter(lambda r: r["status"] == QUARANTINED).sort(["path", "line"]).take_all()
    with atomic_open(out_dir / "quarantine.jsonl") as f:
        for r in quarantine:
            f.write(json.dumps({"path": r["path"], "line": r["line"], "reason": r["reason"],
                                "raw": r["raw"]}, ensure_ascii=False) + "\n")
    outputs.append("quarantine.jsonl")
    totals: dict[str, int] = {}
    for c in counts.values():
        for k, v in c.items():
            totals[k] = totals.get(k, 0) + v
    return {"outputs": outputs, "counts": counts, "totals": totals}


def write_parquet_dir(ds, out_dir: Path, name: str) -> list[str]:
    """Workers write the shards into ``<name>.tmp/``; the driver renames them to
    deterministic ``part-i-of-n`` names (Ray's names carry a per-run uuid) and then moves
    the whole directory into place, so readers never see a half-written set."""
    import shutil

    tmp, final = out_dir / f"{name}.tmp", out_dir / name
    shutil.rmtree(tmp, ignore_errors=True)
    ds.write_parquet(str(tmp))
    files = sorted(tmp.glob("*.parquet"))  # Ray names them <uuid>_<task:06>_<block:06>
    for i, f in enumerate(files):
        f.rename(tmp / f"part-{i:05d}-of-{len(files):05d}.parquet")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return [f"{name}/{f.name}" for f in sorted(final.glob("*.parquet"))]


def check_accounting(totals: dict[str, int]) -> None:
    """read = kept + filtered:* + duplicate + quarantined, or the run is wrong."""
    parts = sum(v for k, v in totals.items() if k != "read")
    if parts != totals.get("read", 0):
        raise AssertionError(f"data accounting does not add up: {totals}")
