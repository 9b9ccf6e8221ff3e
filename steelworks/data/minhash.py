"""Near-duplicate detection with MinHash-LSH on Ray Data; deterministic, no driver-side set.

Signatures (Broder 1997; the permutation scheme of ``datasketch``): whitespace is collapsed,
the text is cut into character k-shingles (CJK has no spaces; for Latin text character
shingles also work, they just cover a word and a half at k=5), each shingle is hashed to 32
bits with seeded xxh32 (Python's ``hash()`` is salted per process), and slot i keeps
``min((a_i * h + b_i) mod p & 0xffffffff)`` with p = 2^61-1 and a, b from
``np.random.default_rng(cfg.seed)``. As in datasketch the uint64 product wraps mod 2^64
before the mod p; that is still a good hash family and is what makes it one numpy expression.

Matching (MMDS ch. 3): a signature is cut into ``bands`` bands of ``num_perm // bands`` rows;
docs sharing a band key are candidates. Within a bucket each member is compared with the
bucket's *smallest* doc key only (star edges) and linked when at least ``threshold`` of their
slots agree. Linked docs form connected components; each component's representative is its
smallest doc key, i.e. the first by (path, line). Trade-off (standard, e.g. text-dedup): a
pair similar to each other but not to their bucket min is not linked by that bucket (usually
another band catches it), and components are transitive: A~B, B~C joins A and C even when
A and C are not similar. Everything is a function of the *set* of kept rows, so block order
and ``num_partitions`` never change the representatives.

Ray plan (2 shuffles + 1 per components round, usually 1-4; the driver only sees counts):
  1. map: kept rows -> one row per (band key, doc key, signature bytes).
  2. shuffle by band-key shard: star edges confirmed by the threshold.
  3. components, Hash-to-Min on edges (Rastogi et al. 2013): each node u with neighbours
     N links every v in N+{u} to m = min(N+{u}). That keeps components and reaches stars
     centred on the component min in O(log diameter) rounds; a round is stable when no
     non-min node has more than one neighbour (summed with a Ray aggregation).
  4. shuffle rows and labels together by doc-key shard (all cast to one unified schema:
     the shuffle's concat takes no other); rows with a label become ``near_duplicate``
     with ``dup_of`` = "path:line" of the representative.
``Dataset.join`` needs polars (not installed), hence the union + group in step 4. Groups are
shards (hash % (num_partitions * 8)), not single keys: ``map_groups`` costs a lot per group,
so each call handles a whole shard with vectorised numpy.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from steelworks.data.config import MinHashConfig

if TYPE_CHECKING:
    import ray

KEPT, NEAR_DUPLICATE = "kept", "near_duplicate"
_MERSENNE = np.uint64((1 << 61) - 1)
_MAX_HASH = np.uint64((1 << 32) - 1)
_SHARDS_PER_PARTITION = 8  # several groups per partition evens out hash-partition skew
_MAX_ROUNDS = 40  # Hash-to-Min needs O(log diameter); 40 means something is wrong
_HELPERS = ["_key", "_shard", "_label"]
_REQUIRED = ["path", "line", "status", "text"]
# Stage outputs carry explicit Arrow types: an empty numpy batch would become a null-typed
# column, and the shuffle's pyarrow concat rejects blocks whose schemas differ.
_BANDS = pa.schema([("_shard", pa.int64()), ("band", pa.int64()), ("doc", pa.string()),
                    ("sig", pa.binary())])
_EDGES = pa.schema([("_shard", pa.int64()), ("node", pa.string()), ("nbr", pa.string()),
                    ("own", pa.int8()), ("unstable", pa.int8())])
log = logging.getLogger(__name__)


def shingles(text: str, k: int, seed: int = 0) -> np.ndarray:
    """Sorted unique 32-bit xxh32 hashes (as uint64) of the character k-shingles of ``text``
    after collapsing whitespace; a text shorter than k is one shingle."""
    text = " ".join(text.split())
    grams = {text} if len(text) <= k else {text[i:i + k] for i in range(len(text) - k + 1)}
    return np.unique(np.fromiter((xxhash.xxh32_intdigest(g.encode(), seed) for g in grams),
                                 dtype=np.uint64, count=len(grams)))


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _MERSENNE, size=num_perm, dtype=np.uint64)  # a != 0: a permutation
    b = rng.integers(0, _MERSENNE, size=num_perm, dtype=np.uint64)
    return a, b


def signature(text: str, cfg: MinHashConfig) -> np.ndarray:
    """MinHash signature, ``uint32[num_perm]`` (values are masked to 32 bits anyway)."""
    hv = shingles(text, cfg.shingle_size, cfg.seed)
    a, b = _permutations(cfg.num_perm, cfg.seed)
    phv = (np.outer(hv, a) + b) % _MERSENNE & _MAX_HASH  # (shingles, num_perm); wraps like datasketch
    return phv.min(axis=0).astype(np.uint32)


def signatures(texts: Sequence[str], cfg: MinHashConfig) -> np.ndarray:
    """``uint32[len(texts), num_perm]``."""
    sigs = [signature(text, cfg) for text in texts]
    return np.array(sigs, dtype=np.uint32).reshape(len(texts), cfg.num_perm)


def _band_keys(sigs: np.ndarray, bands: int) -> np.ndarray:
    """``int64[n, bands]``: xxh3-64 of each band's bytes, seeded with the band index so equal
    values in different bands never share a bucket."""
    n, num_perm = sigs.shape
    raw = np.ascontiguousarray(sigs, dtype="<u4").reshape(n, bands, num_perm // bands)
    keys = [xxhash.xxh3_64_intdigest(raw[i, j].tobytes(), seed=j)
            for i in range(n) for j in range(bands)]
    return np.array(keys, dtype=np.uint64).reshape(n, bands).view(np.int64)


def band_keys(sig: np.ndarray, cfg: MinHashConfig) -> list[int]:
    """LSH bucket keys of one signature, one per band."""
    return _band_keys(np.asarray(sig)[None], cfg.bands)[0].tolist()


def _min_equal(cfg: MinHashConfig) -> int:
    """Equal slots needed for estimated Jaccard >= threshold; an int, so the reference and
    the Ray job cannot disagree on a float rounding."""
    return math.ceil(cfg.threshold * cfg.num_perm - 1e-9)


def doc_key(path: str, line: int) -> str:
    """Sorts like (path, line): \\x01 sorts before every printable path character and lines
    are padded. Not NUL: pyarrow cuts numpy unicode strings at a NUL."""
    return f"{path}\x01{line:012d}"


def _ref(key: str) -> str:
    path, line = key.rsplit("\x01", 1)
    return f"{path}:{int(line)}"


def _shard_of(keys: Iterable[str], shards: int) -> np.ndarray:
    return np.array([xxhash.xxh3_64_intdigest(k.encode()) % shards for k in keys], dtype=np.int64)


def find_near_duplicates(texts: list[str], cfg: MinHashConfig) -> list[int]:
    """Single-process reference with the Ray job's semantics: representative index per text
    (the smallest index of its component; itself when it has no near-duplicate)."""
    sigs, need = signatures(texts, cfg), _min_equal(cfg)
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bucket_min: dict[int, int] = {}  # docs are visited in index order: the first is the min
    for i, keys in enumerate(_band_keys(sigs, cfg.bands).tolist()):
        for key in keys:
            m = bucket_min.setdefault(key, i)
            if m != i and np.count_nonzero(sigs[i] == sigs[m]) >= need:
                ri, rm = find(i), find(m)
                parent[max(ri, rm)] = min(ri, rm)  # roots stay component minima
    return [find(i) for i in range(len(texts))]


# --------------------------------------------------------------------------- Ray stages


def _edge_rows(src: np.ndarray, dst: np.ndarray, shards: int,
               own: np.ndarray | None = None, unstable: np.ndarray | None = None,
               ) -> pa.Table:
    """Undirected edges as rows in both directions, keyed by the shard of ``node``.
    ``own`` marks the row a node emits about itself (its label); ``unstable`` rides on it."""
    node = np.concatenate([src, dst]).tolist()
    flags = np.zeros((2, len(node)), dtype=np.int8)
    if own is not None:
        flags[0, :len(src)], flags[1, :len(src)] = own, unstable
    return pa.Table.from_pydict({"_shard": _shard_of(node, shards), "node": node,
                                 "nbr": np.concatenate([dst, src]).tolist(), "own": flags[0],
                                 "unstable": flags[1]}, schema=_EDGES)


def _emit_bands(batch: dict[str, np.ndarray], cfg: MinHashConfig, shards: int) -> pa.Table:
    kept = batch["status"] == KEPT
    sigs = signatures(list(batch["text"][kept]), cfg)
    keys = _band_keys(sigs, cfg.bands)
    sig_bytes = np.array([s.astype("<u4").tobytes() for s in sigs], dtype=object)
    return pa.Table.from_pydict({
        "_shard": (keys.view(np.uint64) % np.uint64(shards)).astype(np.int64).ravel(),
        "band": keys.ravel(), "doc": np.repeat(batch["_key"][kept], cfg.bands).tolist(),
        "sig": np.repeat(sig_bytes, cfg.bands).tolist()}, schema=_BANDS)


def _bucket_edges(group: dict[str, np.ndarray], need: int, shards: int) -> pa.Table:
    """Star edges (member, bucket min) of every bucket in a shard, threshold-confirmed."""
    order = np.lexsort((group["doc"], group["band"]))
    band, doc, sig = group["band"][order], group["doc"][order].astype(str), group["sig"][order]
    start = np.r_[True, band[1:] != band[:-1]]
    head = np.maximum.accumulate(np.where(start, np.arange(len(band)), 0))  # bucket min row
    idx = np.flatnonzero(~start)  # fast path: singleton buckets (almost all) drop out here
    idx = idx[doc[idx] != doc[head[idx]]]
    if len(idx):
        mine = np.frombuffer(b"".join(sig[idx]), dtype="<u4").reshape(len(idx), -1)
        mins = np.frombuffer(b"".join(sig[head[idx]]), dtype="<u4").reshape(len(idx), -1)
        idx = idx[(mine == mins).sum(axis=1) >= need]
    return _edge_rows(doc[idx], doc[head[idx]], shards)


def _star_step(group: dict[str, np.ndarray], shards: int) -> pa.Table:
    """One Hash-to-Min round for the nodes of a shard (see the module docstring)."""
    node, nbr = group["node"].astype(str), group["nbr"].astype(str)
    order = np.lexsort((nbr, node))
    node, nbr = node[order], nbr[order]
    fresh = np.r_[True, (node[1:] != node[:-1]) | (nbr[1:] != nbr[:-1])]  # edges repeat
    node, nbr = node[fresh], nbr[fresh]
    starts = np.flatnonzero(np.r_[True, node[1:] != node[:-1]])
    degree = np.diff(np.r_[starts, len(node)])
    u, first = node[starts], nbr[starts]  # nbr is sorted per node: the first is the least
    m = np.where(first < u, first, u)
    m_row = np.repeat(m, degree)
    other = nbr != m_row
    moved = u != m  # a non-min node points at m ("own" row); unstable if it saw several
    return _edge_rows(np.concatenate([nbr[other], u[moved]]),
                      np.concatenate([m_row[other], m[moved]]), shards,
                      own=np.r_[np.zeros(other.sum(), np.int8), np.ones(moved.sum(), np.int8)],
                      unstable=np.r_[np.zeros(other.sum(), np.int8), degree[moved] > 1])


def _add_keys(t: pa.Table, shards: int) -> pa.Table:
    # Checked here, on the workers: asking the lazy dataset for its columns could run it twice.
    wrong = [c for c in _REQUIRED + ["dup_of", *_HELPERS]
             if (c in t.column_names) != (c in _REQUIRED)]
    if wrong:
        raise ValueError(f"minhash_dedup: rows need columns {_REQUIRED} and must not have "
                         f"{['dup_of', *_HELPERS]}; wrong: {wrong} (got {t.column_names})")
    keys = [doc_key(p, n) for p, n in zip(t["path"].to_pylist(), t["line"].to_pylist())]
    return t.append_column("_key", pa.array(keys, pa.string())).append_column(
        "_shard", pa.array(_shard_of(keys, shards)))


def _schema_of(t: pa.Table) -> pa.Table:
    return pa.table({"schema": [t.schema.serialize().to_pybytes()]})


def _unified_schema(ds: ray.data.Dataset) -> pa.Schema:
    """All blocks' schemas, unified (a column all null in one block is string in another).
    ``Dataset.schema()`` is only the first block's. One small row per block comes back."""
    rows = ds.map_batches(_schema_of, batch_format="pyarrow", batch_size=None).take_all()
    schemas = [pa.ipc.read_schema(pa.py_buffer(r["schema"])) for r in rows]
    return pa.unify_schemas(schemas, promote_options="permissive")


def _as_rows(t: pa.Table, schema: pa.Schema) -> pa.Table:
    # Every block of the co-group must have one schema (same order too): the shuffle's
    # pyarrow concat refuses anything else, e.g. a block where a column is all null.
    t = t.append_column("_label", pa.nulls(t.num_rows, pa.string()))
    return t.select(schema.names).cast(schema)


def _as_labels(batch: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    n = len(batch["node"])
    cols = {"_key": pa.array(batch["node"].tolist(), pa.string()),
            "_shard": pa.array(batch["_shard"], pa.int64()),
            "_label": pa.array([_ref(k) for k in batch["nbr"]], pa.string())}
    return pa.Table.from_arrays([cols.get(f.name, pa.nulls(n, f.type)) for f in schema],
                                schema=schema)


def _apply_labels(t: pa.Table) -> pa.Table:
    is_label = pc.is_valid(t["_label"])
    labels, rows = t.filter(is_label), t.filter(pc.invert(is_label))
    dup = pc.take(labels["_label"], pc.index_in(rows["_key"], value_set=labels["_key"]))
    status = rows["status"]
    near = pc.fill_null(pc.and_(pc.is_valid(dup), pc.equal(status, KEPT)), False)
    status = pc.if_else(near, pa.scalar(NEAR_DUPLICATE, status.type), status)
    rows = rows.set_column(rows.schema.get_field_index("status"), "status", status)
    rows = rows.append_column("dup_of", pc.fill_null(pc.if_else(near, dup, ""), ""))
    return rows.drop_columns(_HELPERS)


def _no_labels(t: pa.Table) -> pa.Table:
    t = t.drop_columns(["_key", "_shard"])
    return t.append_column("dup_of", pa.array([""] * t.num_rows, pa.string()))


def minhash_dedup(ds: ray.data.Dataset, cfg: MinHashConfig,
                  num_partitions: int) -> ray.data.Dataset:
    """Mark near-duplicates among rows with status "kept" (see the module docstring).

    Rows need ``path``, ``line``, ``status`` and ``text``; other columns pass through. (path,
    line) must identify a row. Output: the same rows (in no particular order) with a new
    ``dup_of`` column. The input is materialized once, since it is read twice.
    """
    if num_partitions < 1:
        raise ValueError(f"minhash_dedup: num_partitions must be >= 1, got {num_partitions}")
    shards = num_partitions * _SHARDS_PER_PARTITION
    ds = ds.map_batches(_add_keys, batch_format="pyarrow", fn_kwargs={"shards": shards})
    ds = ds.materialize()
    edges = (ds.select_columns(["_key", "status", "text"])
             .map_batches(_emit_bands, batch_format="numpy",
                          fn_kwargs={"cfg": cfg, "shards": shards})
             .groupby("_shard", num_partitions=num_partitions)
             .map_groups(_bucket_edges, batch_format="numpy",
                         fn_kwargs={"need": _min_equal(cfg), "shards": shards})
             .materialize())
    if edges.count() == 0:  # nothing near-duplicated: skip the components and the co-group
        return ds.map_batches(_no_labels, batch_format="pyarrow")
    for rounds in range(1, _MAX_ROUNDS + 1):
        edges = (edges.groupby("_shard", num_partitions=num_partitions)
                 .map_groups(_star_step, batch_format="numpy", fn_kwargs={"shards": shards})
                 .materialize())
        unstable = int(edges.sum("unstable"))  # only this number reaches the driver
        if unstable == 0:
            log.info("minhash: components stable after %d round(s)", rounds)
            break
    else:
        raise RuntimeError(f"minhash: connected components did not converge in {_MAX_ROUNDS} "
                           f"rounds ({unstable} nodes still unstable)")
    from ray.data.expressions import col

    schema = _unified_schema(ds).append(pa.field("_label", pa.string()))
    labels = (edges.filter(expr=col("own") == 1)
              .map_batches(_as_labels, batch_format="numpy", fn_kwargs={"schema": schema}))
    rows = ds.map_batches(_as_rows, batch_format="pyarrow", fn_kwargs={"schema": schema})
    return (rows.union(labels).groupby("_shard", num_partitions=num_partitions)
            .map_groups(_apply_labels, batch_format="pyarrow"))
