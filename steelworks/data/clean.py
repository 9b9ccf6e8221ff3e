"""The cleaning job on Ray Data: read -> normalize -> quality-filter -> exact dedup -> MinHash.

Every input record ends in exactly one bucket (``kept``, ``filtered:<op>``, ``duplicate``,
``near_duplicate``, ``contaminated``, ``quarantined``), so read = kept + filtered +
duplicates + contaminated + quarantined holds per source; malformed records go to
``quarantine.jsonl`` with file, line and reason.

Pretraining text goes through its source's recipe (``steelworks.data.recipe``) and the
deduplication steps; SFT conversations are validated by their reader and filtered by
language (``SourceConfig.languages``). Both then go through benchmark decontamination when
``data.decontam`` enables it (``steelworks.data.decontam``). Exact dedup is a distributed
group-by on the normalized-text hash (no global set in the driver); within a group the
record with the smallest (path, line) wins, so the same input always keeps the same
representative.
Aggregations are per-block partial counts summed in the driver (``aggregate.totals_by``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ray.data.expressions import col

from steelworks.core import faults
from steelworks.core.storage import Remote, uri_of
from steelworks.data.config import DataConfig, SourceConfig

KEPT, DUPLICATE, QUARANTINED = "kept", "duplicate", "quarantined"
CLEAN_COLUMNS = ["source", "path", "line", "text"]
SFT_COLUMNS = ["source", "path", "line", "messages", "task_type"]
# Rows per parquet row group of the written shards: ~32 MB of typical 4 KB documents, what
# a reader holds at once (Arrow's default cap is 1Mi rows).
PARQUET_ROW_GROUP_ROWS = 8192
DATA_BLOCK_BYTES = 32 << 20  # Ray Data's block size cap in the data jobs (data_context)
RECIPE_BATCH_ROWS = 2048  # documents normalized and filtered together (~8 MB of text)


def recipe_ref(cfg: DataConfig, src: SourceConfig) -> str | None:
    """The recipe a pretraining source is cleaned with: its own, else ``data.recipe``; None:
    the built-in ``Recipe.default``."""
    return src.recipe or cfg.recipe


def recipe_for(cfg: DataConfig, src: SourceConfig):
    from steelworks.data.recipe import Recipe, load_recipe

    ref = recipe_ref(cfg, src)
    return load_recipe(ref) if ref else Recipe.default(cfg.min_chars, cfg.max_chars)


def files_read(cfg: DataConfig) -> tuple[list[Path], list[str]]:
    """What the data stage reads besides its config, for its cache key
    (``steelworks.core.rundir``): the recipe files of the pretraining sources (each
    recipe's YAML and the flagged-word lists it names, resolved as ``load_recipe`` does),
    and the raw input files of every source (SFT ones too). The demo corpus is generated
    from the config, so the demo has its recipe only. Loading the recipes here also reports
    a broken one before any work starts."""
    from steelworks.data.formats import expand_paths
    from steelworks.data.recipe import load_recipe

    if cfg.source == "demo":  # as pipeline.run_data: one generated source, data.recipe
        refs, raw_sources = [cfg.recipe], []
    else:
        refs, raw_sources = [recipe_ref(cfg, s) for s in cfg.sources], cfg.sources + cfg.sft_sources
    recipes: list[Path] = []
    for ref in dict.fromkeys(r for r in refs if r):  # each recipe once, in source order
        recipes += [f for f in load_recipe(ref).files() if f not in recipes]
    return recipes, [f for s in raw_sources for f in expand_paths(s.path, s.format)]


def apply_recipe(batch: pd.DataFrame, recipe, stat_columns: list[str], dedup_shards: int,
                 armed: list[dict] | None = None) -> pd.DataFrame:
    """Ray Data batch function: normalize + filter with one recipe, then hash for dedup.
    Every recipe's stat columns are present (NaN where another recipe applies), so the
    datasets of sources with different recipes can be unioned."""
    faults.fire(armed, "data.clean")  # tests only: a worker killed mid-task (core.faults)
    batch = recipe.apply_batch(batch)
    for name in stat_columns:
        if name not in batch:
            batch[name] = np.nan
    # Quarantined/filtered rows get a unique key so they never group with kept text.
    batch["hash"] = [
        hashlib.sha1(t.encode("utf-8")).hexdigest() if s == KEPT else f"{p}:{n}"
        for t, s, p, n in zip(batch["text"], batch["status"], batch["path"], batch["line"])
    ]
    batch["dedup_shard"] = [int(hashlib.sha1(h.encode()).hexdigest()[:8], 16) % dedup_shards
                            for h in batch["hash"]]
    return batch


def filter_languages(batch: pd.DataFrame, allowed: list[str]) -> pd.DataFrame:
    """SFT: records whose ``lang`` tag is not allowed become ``filtered:language``."""
    from steelworks.data.sft_builders import filter_languages as keep

    batch = batch.copy()
    drop = (batch["status"] == KEPT) & ~batch["lang"].map(lambda x: keep(x, allowed))
    batch.loc[drop, "status"] = "filtered:language"
    return batch


def mark_duplicates(group: pd.DataFrame) -> pd.DataFrame:
    """One dedup shard (every row whose hash falls in it): within each hash, keep the kept
    record with the smallest (path, line) and mark the other kept ones. Grouping by shard
    rather than by hash keeps the group count small: Ray's per-group overhead is high."""
    g = group.sort_values(["hash", "path", "line"], kind="stable")
    kept = g["status"] == KEPT
    dup = kept & g["hash"].where(kept).duplicated(keep="first")
    g.loc[dup, "status"] = DUPLICATE
    return g.drop(columns=["dedup_shard"])


def data_context(partitions: int | None = None):
    """Ray Data settings for the data jobs: deterministic block order, and no per-operator
    resource reservation. Ray reserves a share of the cluster for each operator by default,
    which on a 2-CPU cluster leaves the map before a shuffle one CPU while the shuffle's
    share sits idle until the map is done (measured: no 1 -> 2 CPU speedup with it on)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic outputs, run after run
    ctx.op_resource_reservation_enabled = False
    # Blocks of at most 32 MiB (Ray's default: 128 MiB). A worker builds an output block whole
    # before handing it on, so this bounds what a read-and-filter task holds besides its
    # batch; measured: peak worker RSS 726 -> 1,434 MiB from a 200 MB to a 2 GB input at
    # 128 MiB, the larger input reaching the cap more often.
    ctx.target_max_block_size = DATA_BLOCK_BYTES
    if partitions:
        ctx.default_hash_shuffle_parallelism = partitions
    return ctx


def _partitions(sources: list[SourceConfig]) -> int:
    """Ray's default of 200 shuffle partitions costs minutes of task overhead on small inputs;
    use one partition per ~128 MB of input, at least one per CPU in the cluster."""
    import ray

    from steelworks.data.formats import expand_paths

    in_bytes = sum(Path(f).stat().st_size for s in sources for f in expand_paths(s.path, s.format))
    return max(int(ray.cluster_resources().get("CPU", 1)), int(in_bytes // (128 << 20)))


def read_and_filter(src: SourceConfig, recipe, stat_columns: list[str], dedup_shards: int,
                    block_bytes: int = 64 << 20, counts_dir: Path | None = None):
    """The streaming part of the text pipeline for one source: read, normalize, filter, hash.
    Batches of RECIPE_BATCH_ROWS, not whole blocks (up to 128 MiB): a worker holds a few MB of
    documents and their stats at a time, whatever the block and file sizes
    (benchmarks/data_pipeline.py --memory-only measures it)."""
    from steelworks.data.readers import read_source

    return read_source(src, block_bytes, _str(counts_dir)).map_batches(
        apply_recipe, batch_format="pandas", batch_size=RECIPE_BATCH_ROWS,
        fn_kwargs={"recipe": recipe, "stat_columns": stat_columns, "dedup_shards": dedup_shards,
                   # Read here, in the driver: a Ray worker's environment is the raylet's,
                   # fixed when the cluster started, so the tasks get the faults as an argument.
                   "armed": faults.from_env()})


def clean_text(cfg: DataConfig, sources: list[SourceConfig], partitions: int,
               counts_dir: Path | None = None):
    """-> (dataset of every record with its final status and stats, {source: recipe}).
    The readers write their own record counts to ``counts_dir`` (``readers.read_counts``)."""

    recipes = {s.name: recipe_for(cfg, s) for s in sources}
    stat_columns = sorted({f.column for r in recipes.values() for f in r.filters})
    parts = [read_and_filter(s, recipes[s.name], stat_columns, 8 * partitions,
                             _block_bytes(cfg), counts_dir) for s in sources]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if cfg.dedup.exact:
        ds = ds.groupby("dedup_shard", num_partitions=partitions).map_groups(
            mark_duplicates, batch_format="pandas")
    else:
        ds = ds.drop_columns(["dedup_shard"])
    if cfg.dedup.minhash.enabled:
        from steelworks.data.minhash import minhash_dedup

        ds = minhash_dedup(ds, cfg.dedup.minhash, partitions)
    return ds, recipes


def clean_sft(sources: list[SourceConfig], block_bytes: int = 64 << 20,
              counts_dir: Path | None = None):
    from steelworks.data.readers import read_source

    parts = []
    for s in sources:
        ds = read_source(s, block_bytes, _str(counts_dir))
        if s.languages:
            ds = ds.map_batches(filter_languages, batch_format="pandas",
                                fn_kwargs={"allowed": list(s.languages)})
        parts.append(ds)
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _block_bytes(cfg: DataConfig) -> int:
    return max(1, int(cfg.read_block_mb * (1 << 20)))


def _str(path: Path | None) -> str | None:
    """A directory the readers write into: its URI when the run is in a bucket (a read task
    may run on another node), else its path."""
    return None if path is None else uri_of(path) or str(path)


def count_statuses(ds) -> dict[str, dict[str, int]]:
    """{source: {status: n, ...}}; only these counts reach the driver."""
    from steelworks.data.aggregate import totals_by

    counts: dict[str, dict[str, int]] = {}
    for (source, status), t in sorted(totals_by(ds, ["source", "status"]).items()):
        counts.setdefault(source, {})[status] = t["count"]
    return counts


def add_read_counts(counts: dict[str, dict[str, int]], counts_dir: Path) -> None:
    """Put the readers' own counts into ``counts``: ``read`` (input records) and, when one
    record gave several rows (``wanjuan_exam`` both), ``rows``. A source the readers read
    and no status mentions gets an entry too, so ``check_accounting`` sees it lost."""
    from steelworks.data.readers import read_counts

    for source, rc in read_counts(_str(counts_dir)).items():
        c = counts.setdefault(source, {})
        c["read"] = rc.records
        if rc.rows != rc.records:
            c["rows"] = rc.rows


def run_clean(cfg: DataConfig, sources: list[SourceConfig], sft_sources: list[SourceConfig],
              out_dir: Path) -> dict[str, Any]:
    """Run the cleaning job. Writes ``clean/`` (pretraining text), ``sft/`` (conversations),
    ``stats/`` + ``plots/`` (per-document filter stats and their histograms) and
    ``quarantine.jsonl``. Returns the outputs, the ``reports`` among them (stats and plots:
    for people, read by no later stage, and not reproducible when the corpus has more than
    ``stats_sample`` documents, see ``write_stats``), and the counts."""

    import shutil

    from steelworks.core.atomic import atomic_open

    partitions = _partitions(sources + sft_sources)
    data_context(partitions)
    counts_dir = out_dir / ".read_counts"  # the readers' own record counts, per task
    shutil.rmtree(counts_dir, ignore_errors=True)
    if (counts_uri := uri_of(counts_dir)) is not None:
        Remote(counts_uri).delete("")
    outputs: list[str] = []
    counts: dict[str, dict[str, int]] = {}
    quarantined: list[dict[str, Any]] = []
    plots: list[str] = []
    decontam = None
    if cfg.decontam.enabled:
        from steelworks.data.decontam import Step

        decontam = Step(cfg.decontam)  # the benchmarks' n-grams, built once, shared by tasks

    if sources:
        ds, recipes = clean_text(cfg, sources, partitions, counts_dir)
        if decontam:  # after dedup: only the kept copy of a document is checked and counted
            ds = decontam.apply(ds, "text")
        ds = ds.materialize()
        counts.update(count_statuses(ds))
        # Back to input order (the dedup shuffle left hash order): packed sequences then
        # join documents the way the corpus had them, whatever the partitioning.
        kept = (ds.filter(expr=col("status") == KEPT).select_columns(CLEAN_COLUMNS)
                  .sort(["path", "line"]).repartition(cfg.num_shards))
        outputs += write_parquet_dir(kept, out_dir, "clean")
        plots = write_stats(ds, recipes, sources, out_dir, cfg.stats_sample)
        outputs += plots
        quarantined += ds.filter(expr=col("status") == QUARANTINED).take_all()
        if decontam:
            decontam.collect(ds)
    if sft_sources:
        sft = clean_sft(sft_sources, _block_bytes(cfg), counts_dir)
        if decontam:
            sft = decontam.apply(sft, "sft")
        sft = sft.materialize()
        counts.update(count_statuses(sft))
        kept = sft.filter(expr=col("status") == KEPT).select_columns(SFT_COLUMNS).repartition(1)
        outputs += write_parquet_dir(kept, out_dir, "sft")
        quarantined += sft.filter(expr=col("status") == QUARANTINED).take_all()
        if decontam:
            decontam.collect(sft)

    quarantined.sort(key=lambda r: (r["path"], r["line"]))
    with atomic_open(out_dir / "quarantine.jsonl") as f:
        for r in quarantined:
            f.write(json.dumps({"source": r["source"], "path": r["path"], "line": int(r["line"]),
                                "reason": r["reason"], "raw": r["raw"]}, ensure_ascii=False) + "\n")
    outputs.append("quarantine.jsonl")
    add_read_counts(counts, counts_dir)
    shutil.rmtree(counts_dir, ignore_errors=True)
    if counts_uri is not None:
        Remote(counts_uri).delete("")
    totals: dict[str, int] = {}
    for c in counts.values():
        for k, v in c.items():
            totals[k] = totals.get(k, 0) + v
    result = {"outputs": outputs, "reports": plots, "counts": counts, "totals": totals}
    if decontam:
        report, result["decontam"] = decontam.finish(out_dir)
        outputs.append(report)
    return result


def write_stats(ds, recipes: dict[str, Any], sources: list[SourceConfig], out_dir: Path,
                sample: int) -> list[str]:
    """Per-document filter stats of (a sample of) the records that reached the filters,
    saved as parquet and drawn as one histogram per stat with its thresholds marked."""
    from steelworks.core.atomic import atomic_open
    from steelworks.data.stats_plots import plot_stat_histograms

    cols = sorted({f.column for r in recipes.values() for f in r.filters})
    rows = (ds.filter(expr=col("status") != QUARANTINED)
              .select_columns(["source", "path", "line", "status", *cols]).limit(sample))
    # Rows come in the order the dedup shuffle's partitions finished, which varies with
    # timing (a retried task, a slower node); sorted, the file is the same bytes every run
    # (when the corpus has more rows than ``sample``, which rows are kept still varies).
    stats = rows.to_pandas().sort_values(["source", "path", "line"], kind="stable",
                                         ignore_index=True)
    (out_dir / "stats").mkdir(parents=True, exist_ok=True)
    with atomic_open(out_dir / "stats" / "doc_stats.parquet", "wb") as f:
        stats.to_parquet(f, index=False)
    files = ["stats/doc_stats.parquet"]
    by_recipe: dict[str, list[str]] = {}
    for s in sources:
        by_recipe.setdefault(recipes[s.name].name, []).append(s.name)
    for name, names in by_recipe.items():
        recipe = recipes[names[0]]
        sub = stats[stats["source"].isin(names)]
        plot_dir = out_dir / "plots" / name
        files += [f"plots/{name}/{f}" for f in plot_stat_histograms(sub, recipe, plot_dir)]
    return files


def write_parquet_dir(ds, out_dir: Path, name: str) -> list[str]:
    """Workers write the shards into ``<name>.tmp/``; the driver renames them to
    deterministic ``part-i-of-n`` names (Ray's names carry a per-run uuid) and then moves
    the whole directory into place, so readers never see a half-written set."""
    import shutil

    tmp, final = out_dir / f"{name}.tmp", out_dir / name
    shutil.rmtree(tmp, ignore_errors=True)
    # Fixed-size row groups: by default each block a write task receives becomes a row
    # group, and block boundaries follow the sort's sampled ranges, which vary from run to
    # run (a retried task is enough), so the same rows would give different bytes.
    if (uri := uri_of(tmp)) is None:
        ds.write_parquet(str(tmp), row_group_size=PARQUET_ROW_GROUP_ROWS)
    else:
        # The run is in a bucket: write tasks on any node write there, and this node fetches
        # the files to name them; the stage's manifest later uploads them under those names.
        remote = Remote(uri)
        remote.delete("")
        ds.write_parquet(remote.root, filesystem=remote.fs, row_group_size=PARQUET_ROW_GROUP_ROWS)
        remote.pull(tmp, remote.listing())
        remote.delete("")
    files = sorted(tmp.glob("*.parquet"))  # Ray names them <uuid>_<task:06>_<block:06>
    for i, f in enumerate(files):
        f.rename(tmp / f"part-{i:05d}-of-{len(files):05d}.parquet")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return [f"{name}/{f.name}" for f in sorted(final.glob("*.parquet"))]


def check_accounting(counts: dict[str, dict[str, int]]) -> None:
    """Per source, the rows the readers emitted (``rows``, else ``read``: counted by the
    readers themselves, not from the rows that arrived) = the rows in the final buckets
    (kept + filtered:* + duplicate + near_duplicate + quarantined + any other status). A row
    dropped on the way (a step that loses data) makes the run fail, naming the source."""
    for source, c in counts.items():
        if "read" not in c:
            raise RuntimeError(f"data accounting: source {source!r} has rows but no reader "
                               f"count: {c}")
        emitted = c.get("rows", c["read"])
        buckets = {k: v for k, v in c.items() if k not in ("read", "rows")}
        if sum(buckets.values()) != emitted:
            raise RuntimeError(
                f"data accounting does not add up for source {source!r}: its readers emitted "
                f"{emitted} rows ({c['read']} input records), but {sum(buckets.values())} "
                f"reached a bucket {buckets}: {emitted - sum(buckets.values())} lost on the way")
