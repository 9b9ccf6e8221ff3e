"""Tokenize, mix and pack on Ray Data.

Pretraining: documents are tokenized in parallel (each followed by <|endoftext|>), joined and
cut into fixed ``seq_len`` rows; each batch of ``sequences_per_shard`` rows is written as one
shard by the worker that made it. Packing happens within a batch of documents, so at most one
partial row per batch is dropped (counted in the metrics) — the price of never funnelling
tokens through the driver.

Mixing (source ratios, or ``mix.total_tokens``): the tokenized corpus is materialized once so
per-source token totals are known (Ray Data spills it to disk when it does not fit), then
``plan_mix`` gives each source a token quota under ``mix.policy``. A source's quota is met with
whole documents: every document for each whole epoch, and for the remaining fraction a prefix
of its documents in the order of a hash of (seed, path, line), up to the quota (systematic
selection, ``hash_order_cut``): deterministic, within half a document of the quota, and never
zero documents for a positive ratio, however long the documents. Where documents repeat, each
copy gets a sort key that places copies of one document far apart (``sample_documents``), and
the stream is sorted by it on Ray Data before packing, so copies do not share a row.

SFT: each conversation becomes one row with its loss mask (``steelworks.data.sft``), or,
with ``pack.sft_pack``, several conversations share a row with their boundaries kept in a
segment-id array.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ray.data.expressions import col

from steelworks.core.storage import Remote, dataset_paths, local_dir, uri_of
from steelworks.data.aggregate import totals_by
from steelworks.data.clean import data_context
from steelworks.data.config import MixConfig
from steelworks.data.shards import ShardIndex, ShardInfo, token_dtype, write_shard

PACK_DOCS_PER_BATCH = 2048  # documents tokenized and packed together by one task

log = logging.getLogger("steelworks.data")


@functools.lru_cache(maxsize=4)
def _load(tokenizer_dir: str):
    """(encode: list of texts -> list of id lists, end-of-document id), loaded once per
    worker process. Plain tasks with this cache, not an actor pool: an actor holding the only
    CPU of a 1-CPU cluster starves the read tasks that feed it.

    With a ``tokenizer.json`` (every fast tokenizer, ours included) the Rust ``tokenizers``
    library encodes directly: that is what transformers' fast tokenizer calls for
    ``tok(texts, add_special_tokens=False)``, without importing transformers in every
    worker (about 1 s each, 5 s when torch is loaded). Other directories go through
    transformers."""
    from steelworks.data.tokenizer import document_end_id, load_tokenizer

    # One thread per task: Ray gives each task one CPU and runs one task per CPU. The Rust
    # tokenizer's own thread pool would otherwise oversubscribe the node.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    path = local_dir(tokenizer_dir, TOKENIZER_MARKER)  # a run in a bucket: a URI (_location)
    if (path / "tokenizer.json").exists() and (path / "tokenizer_config.json").exists():
        from tokenizers import Tokenizer

        rust = Tokenizer.from_file(str(path / "tokenizer.json"))
        eod = document_end_id_from_files(path, rust)

        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in rust.encode_batch_fast(texts, add_special_tokens=False)]

        return encode, eod
    tok = load_tokenizer(path)
    return (lambda texts: tok(texts, add_special_tokens=False)["input_ids"]), document_end_id(tok)


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(tokenizer_dir: str):
    """The transformers tokenizer (chat template and all), once per worker process."""
    from steelworks.data.tokenizer import load_tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as in _load
    return load_tokenizer(local_dir(tokenizer_dir, TOKENIZER_MARKER))


# Written last by save_pretrained, and uploaded last (pipeline.run_tokenizer): a worker that
# finds it has the whole tokenizer.
TOKENIZER_MARKER = "tokenizer_config.json"


def _location(path: Path) -> str:
    """How a worker is told of a directory the driver wrote: its URI when the run is in a
    bucket (the worker may be on another node), else its path."""
    return uri_of(path) or str(path)


def document_end_id_from_files(path: Path, rust) -> int:
    """``tokenizer.document_end_id`` read from the directory's files, without transformers:
    <|endoftext|> when the vocabulary has it, else the configured eos token."""
    from steelworks.data.tokenizer import EOS

    tid = rust.token_to_id(EOS)
    if tid is None:
        eos = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        tid = rust.token_to_id(eos) if eos else None
    if tid is None:
        raise ValueError(f"{path}: the tokenizer has neither {EOS!r} nor an eos_token in "
                         "tokenizer_config.json to end documents with")
    return int(tid)


def tokenize_documents(batch: pd.DataFrame, tokenizer_dir: str) -> pd.DataFrame:
    """text -> tokens (int32, ending in <|endoftext|>) and their count, per document."""
    encode, eod = _load(tokenizer_dir)
    ids = encode(list(batch["text"]))
    tokens = [np.array([*doc, eod], dtype=np.int32) for doc in ids]
    out = batch.drop(columns=["text"])
    out["tokens"] = tokens
    out["ntok"] = np.array([len(t) for t in tokens], dtype=np.int64)
    return out


def pack_rows(batch: pd.DataFrame, seq_len: int) -> pd.DataFrame:
    """Concatenate the batch's documents and cut ``seq_len`` rows. Per-batch counters (docs,
    dropped tail tokens, tokens per source) ride on the first row for the driver to sum."""
    stream = np.concatenate(list(batch["tokens"])) if len(batch) else np.zeros(0, np.int32)
    n = len(stream) // seq_len
    rows = stream[: n * seq_len].reshape(n, seq_len)
    docs, dropped = np.zeros(n, np.int64), np.zeros(n, np.int64)
    per_source = [""] * n
    if n:
        docs[0], dropped[0] = len(batch), len(stream) - n * seq_len
        per_source[0] = json.dumps(batch.groupby("source")["ntok"].sum().astype(int).to_dict())
    return pd.DataFrame({"tokens": list(rows), "docs": docs, "dropped": dropped,
                         "source_tokens": per_source})


def pack_documents(batch: pd.DataFrame, tokenizer_dir: str, seq_len: int) -> pd.DataFrame:
    """text -> packed rows in one step (the natural mix: no sampling)."""
    if "source" not in batch:
        batch = batch.assign(source="")
    return pack_rows(tokenize_documents(batch, tokenizer_dir), seq_len)


BUCKET_BITS = 12  # first pass of the hash-order selection: 4096 buckets of the order hash


@dataclass
class SourcePlan:
    """One source's part of the mix, in tokens (each document counted with its end token)."""

    available: int  # tokens of the source after cleaning
    ratio: float  # target share of the total
    target: int  # ratio x total: what the ratio asks for
    quota: int  # what is emitted: the target within the policy's bounds (no repeats, max_epochs)
    capped: bool  # max_epochs cut the target: the source falls short of its share

    @property
    def full_epochs(self) -> int:
        """Passes over every document of the source."""
        return self.quota // self.available if self.available else 0

    @property
    def partial(self) -> int:
        """Tokens of one more, partial pass: whole documents in hash order until met."""
        return self.quota - self.full_epochs * self.available

    @property
    def method(self) -> str:
        """How documents are chosen: every document (whole epochs), or, for a partial pass, a
        prefix of the source's documents in hash order (``hash_order_cut``)."""
        return "hash_order_prefix" if self.partial else "every_document"


@dataclass
class MixPlan:
    total: int  # target total tokens (ratio x total is each source's target)
    limited_by: str | None  # the source whose tokens set the total (None: mix.total_tokens did)
    # The largest total at which every source meets its ratio within max_epochs: what to set
    # mix.total_tokens to when the cap binds and the ratios matter more than the tokens.
    max_total_for_ratios: int
    sources: dict[str, SourcePlan]


def plan_mix(available: dict[str, int], ratios: dict[str, float | None] | None, policy: str,
             total_tokens: int | None, max_epochs: float) -> MixPlan:
    """Token quotas per source (``MixConfig`` describes the policies).

    Each source could carry a total of ``available / ratio`` tokens alone, used once.
    downsample takes the smallest such total (nothing repeats; that source is used whole and
    the rest of the others is discarded), upsample the largest (that source is used whole,
    scarcer ones repeat); ``total_tokens`` overrides both. No source repeats more than
    ``max_epochs`` times, and a source with a positive ratio gets at least one token, so at
    least one whole document (``hash_order_cut``). Without ratios the natural shares apply.
    """
    names = list(dict.fromkeys([*(ratios or {}), *available]))
    if ratios is None or all(r is None for r in ratios.values()):
        whole = sum(available.values())
        if not whole:
            raise ValueError("mix: no pretraining tokens left after cleaning")
        shares = {s: available.get(s, 0) / whole for s in names}
    else:
        missing = [s for s, r in ratios.items() if r and not available.get(s)]
        if missing:
            raise ValueError(f"mix: sources {missing} have a ratio but no tokens left after cleaning")
        shares = {s: ratios.get(s) or 0.0 for s in names}
    supply = {s: available[s] / r for s, r in shares.items() if r > 0}
    limited_by = None
    if total_tokens is not None:
        total: float = total_tokens
    else:
        limited_by = (min if policy == "downsample" else max)(supply, key=supply.__getitem__)
        total = supply[limited_by]
    no_repeat = policy == "downsample" and total_tokens is None
    sources = {}
    for s, r in shares.items():
        a = available.get(s, 0)
        target = max(1, round(r * total)) if r > 0 else 0
        cap = a if no_repeat else math.floor(max_epochs * a)
        sources[s] = SourcePlan(a, r, target, min(target, cap), target > cap)
    exact = min(math.floor(max_epochs * available[s]) / r for s, r in shares.items() if r > 0)
    return MixPlan(round(total), limited_by, math.floor(exact), sources)


def order_hash(seed: int, paths: Iterable[str], lines: Iterable[int]) -> np.ndarray:
    """A 64-bit hash of (seed, path, line) per document: the order in which a source's
    documents are taken. The same on every run, and independent of how Ray split the blocks."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}\0{p}\0{n}".encode(), digest_size=8)
                                    .digest(), "little") for p, n in zip(paths, lines)],
                    dtype=np.uint64)


def _unit(seed: int, path: str, line: int, copy: int) -> float:
    """A uniform number in [0, 1) from (seed, path, line, copy): 53 bits, a float's mantissa."""
    h = hashlib.blake2b(f"{seed}\0{path}\0{line}\0{copy}".encode(), digest_size=8).digest()
    return (int.from_bytes(h, "little") >> 11) / float(1 << 53)


def crossing_bucket(tokens_by_bucket: dict[int, int], need: int) -> tuple[int, int]:
    """The hash bucket (top ``BUCKET_BITS`` of the order hash) holding the document that
    completes ``need`` tokens, and the tokens of the buckets before it."""
    before = 0
    for b in sorted(tokens_by_bucket):
        if before + tokens_by_bucket[b] >= need:
            return b, before
        before += tokens_by_bucket[b]
    raise ValueError(f"mix: {need} tokens asked of a source that holds {before}")


def hash_order_cut(u: np.ndarray, ntok: np.ndarray, need: int, before: int = 0) -> tuple[int, int]:
    """Systematic selection of whole documents: in the order of their hashes ``u``, every
    document before the one that completes ``need`` tokens (``before`` of them in earlier
    buckets) is taken, and that one too when it lands nearer ``need`` than stopping short
    does (its midpoint is short of ``need``). Whole documents cannot meet a quota exactly;
    this misses it by at most half a document either way, so the expected total is the
    quota. One exception: a source's first document is always taken, so a positive quota
    never yields nothing, however long the documents. Returns (tau, tokens taken): the
    documents taken are those with ``u <= tau``."""
    order = np.argsort(u, kind="stable")
    us, lengths = u[order], ntok[order]
    cum = before + np.cumsum(lengths)
    i = int(np.searchsorted(cum, need))  # the document that completes need
    take = cum[i] - lengths[i] / 2 < need or (before == 0 and i == 0)
    # u - 1 excludes exactly the documents with this hash (one, as hashes of distinct paths
    # and lines do not collide); u == 0 would be the first document, which is always taken.
    tau = int(us[i]) if take else int(us[i]) - 1
    return tau, before + int(ntok[u <= np.uint64(tau)].sum())


def sample_documents(batch: pd.DataFrame, full: dict[str, int], tau: dict[str, int],
                     seed: int) -> pd.DataFrame:
    """Copies of each document, each with a sort key in [0, 1) that spreads them apart.

    A document of source s appears ``full[s]`` times, plus once more when its order hash ``u``
    is at most ``tau[s]`` (the partial pass). Copy k of a document with c copies gets the key
    (k + x_k) / c, in [k/c, (k+1)/c): the k-th of c regions of the stream, so each source is
    spread evenly over all of it. x_k = frac(x_(k-1) + 1/2 + h_k / 2) puts copy k at least half
    a region (and less than two) after copy k-1, in a different order in each region. x_0 and
    h_k are hashes of (seed, path, line, k): the keys depend on nothing else, so not on how
    Ray split the blocks. (Copy 0 of every document, then copy 1 of every document, would
    crowd the repeated sources into the end of the stream.)
    """
    copies = np.zeros(len(batch), np.int64)
    u = batch["u"].to_numpy(np.uint64)
    for s, idx in batch.groupby("source", sort=False).indices.items():
        extra = u[idx] <= np.uint64(tau[s]) if s in tau else 0
        copies[idx] = full.get(s, 0) + extra
    keys = np.empty(int(copies.sum()))
    at = 0
    for p, n, c in zip(batch["path"], batch["line"], copies):
        x = _unit(seed, p, n, 0)
        for k in range(c):
            if k:
                x = (x + 0.5 + 0.5 * _unit(seed, p, n, k)) % 1.0
            keys[at + k] = (k + x) / c
        at += c
    out = batch.iloc[np.repeat(np.arange(len(batch)), copies)].reset_index(drop=True)
    out["key"] = keys
    return out


def tokenize_for_mix(batch: pd.DataFrame, tokenizer_dir: str, seed: int) -> pd.DataFrame:
    """``tokenize_documents`` plus each document's order hash ``u``."""
    out = tokenize_documents(batch, tokenizer_dir)
    out["u"] = order_hash(seed, out["path"], out["line"])
    return out


def _bucketed(batch: pd.DataFrame, sources: list[str]) -> pd.DataFrame:
    b = batch[batch["source"].isin(sources)]
    bucket = (b["u"].to_numpy(np.uint64) >> np.uint64(64 - BUCKET_BITS)).astype(np.int64)
    return pd.DataFrame({"source": b["source"].to_numpy(), "bucket": bucket,
                         "u": b["u"].to_numpy(np.uint64), "ntok": b["ntok"].to_numpy()})


def _in_buckets(batch: pd.DataFrame, buckets: dict[str, int]) -> pd.DataFrame:
    return batch[batch["bucket"].to_numpy() == batch["source"].map(buckets).to_numpy()]


def _partial_cuts(docs, need: dict[str, int]) -> dict[str, tuple[int, int]]:
    """``hash_order_cut`` per source over the whole dataset, in two passes that move counts,
    not documents: token totals per (source, hash bucket) find the bucket where each quota is
    met, then only that bucket's (hash, length) pairs reach the driver (~1/4096 of a source)."""
    import ray

    if not need:
        return {}
    meta = docs.select_columns(["source", "u", "ntok"]).map_batches(
        _bucketed, batch_format="pandas", fn_kwargs={"sources": sorted(need)})
    # A few thousand rows: one shuffle partition per CPU, not Ray's default 200 (data_context).
    parts = max(1, int(ray.cluster_resources().get("CPU", 1)))
    hist: dict[str, dict[int, int]] = {}
    for r in (meta.select_columns(["source", "bucket", "ntok"])
              .groupby(["source", "bucket"], num_partitions=parts).sum("ntok").take_all()):
        hist.setdefault(r["source"], {})[int(r["bucket"])] = int(r["sum(ntok)"])
    cut = {s: crossing_bucket(hist[s], n) for s, n in need.items()}
    edge = meta.map_batches(_in_buckets, batch_format="pandas",
                            fn_kwargs={"buckets": {s: b for s, (b, _) in cut.items()}}).to_pandas()
    out = {}
    for s, n in need.items():
        e = edge[edge["source"] == s]
        out[s] = hash_order_cut(e["u"].to_numpy(np.uint64), e["ntok"].to_numpy(np.int64), n,
                                cut[s][1])
    return out


def shares_of(packed: dict[str, int], names: Iterable[str]) -> dict[str, float]:
    """Each source's share of the packed tokens; every named source listed, 0.0 included."""
    total = sum(packed.values())
    names = list(dict.fromkeys([*names, *packed]))
    return {s: round(packed.get(s, 0) / total, 4) if total else 0.0 for s in names}


def mix_report(plan: MixPlan, taken: dict[str, int], packed: dict[str, int], policy: str,
               max_epochs: float) -> dict[str, Any]:
    """The manifest's ``mix``: per source what it had, what it gave once (used), again
    (repeated), and its share of what was packed. ``taken``: tokens of each partial pass;
    ``packed``: tokens per source in the packed stream."""
    shares = shares_of(packed, plan.sources)
    sources = {}
    for s, p in plan.sources.items():
        emitted = p.full_epochs * p.available + taken.get(s, 0)
        used = p.available if p.full_epochs else taken.get(s, 0)
        sources[s] = {"available_tokens": p.available, "target_ratio": round(p.ratio, 6),
                      "target_tokens": p.target, "used_tokens": used,
                      "repeated_tokens": emitted - used, "discarded_tokens": p.available - used,
                      "epochs": round(emitted / p.available, 4) if p.available else 0.0,
                      "achieved_share": shares.get(s, 0.0), "method": p.method,
                      "capped": p.capped}
    return {"policy": policy, "max_epochs": max_epochs, "total_tokens": plan.total,
            "limited_by": plan.limited_by, "max_total_for_ratios": plan.max_total_for_ratios,
            **{k: sum(v[k] for v in sources.values())
               for k in ("available_tokens", "used_tokens", "repeated_tokens", "discarded_tokens")},
            "sources": sources}


def log_mix(report: dict[str, Any], packed: dict[str, int], total_fixed: bool) -> None:
    """Per source, a line of the report; warnings where the mix is not what the ratios say
    or throws most of the corpus away."""
    for s, r in report["sources"].items():
        log.info("mix: %-16s ratio %.3f  available %d  used %d  discarded %d  repeated %d  "
                 "epochs %.2f  share %.4f  (%s)", s, r["target_ratio"], r["available_tokens"],
                 r["used_tokens"], r["discarded_tokens"], r["repeated_tokens"], r["epochs"],
                 r["achieved_share"], r["method"])
    src, avail = report["sources"], report["available_tokens"]
    if report["policy"] == "downsample" and not total_fixed and report["discarded_tokens"] * 2 > avail:
        s = report["limited_by"]
        log.warning("mix: downsample keeps %d of %d available tokens (%.0f%% discarded): source "
                    "%r (ratio %g, %d tokens) limits the total. Set mix.policy: upsample to "
                    "repeat scarce sources instead (at most mix.max_epochs times), or "
                    "mix.total_tokens to choose the total.", report["used_tokens"], avail,
                    100 * report["discarded_tokens"] / avail, s, src[s]["target_ratio"],
                    src[s]["available_tokens"])
    if capped := [s for s, r in src.items() if r["capped"]]:
        log.warning("mix: capped at mix.max_epochs=%g, these sources get fewer tokens than "
                    "their ratios ask, and the shares drift: %s. Raise mix.max_epochs, or set "
                    "mix.total_tokens to at most %d to meet every ratio.", report["max_epochs"],
                    "; ".join(
                        f"{s!r} (needs {src[s]['target_tokens'] / src[s]['available_tokens']:.2f} "
                        f"epochs; share {src[s]['achieved_share']:.4f} for ratio "
                        f"{src[s]['target_ratio']:g})" for s in capped),
                    report["max_total_for_ratios"])
    for s, r in src.items():
        emitted = r["used_tokens"] + r["repeated_tokens"]
        if not r["capped"] and emitted > 1.5 * r["target_tokens"]:
            log.warning("mix: source %r gets %d tokens for a quota of %d (share %.4f, ratio %g): "
                        "whole documents are taken and its documents are long against its "
                        "quota. A larger total (mix.policy: upsample or mix.total_tokens) brings "
                        "the share closer.", s, emitted, r["target_tokens"], r["achieved_share"],
                        r["target_ratio"])
        if r["target_ratio"] > 0 and not packed.get(s):
            # The plan gives it at least one document; only a packing batch shorter than one
            # row (dropped whole) can lose it.
            log.warning("mix: source %r has ratio %g but no tokens in the packed shards",
                        s, r["target_ratio"])


def write_shards(batch: pd.DataFrame, out_dir: str, vocab_size: int,
                 out_uri: str | None = None) -> pd.DataFrame:
    """Writes one shard per batch; the name is the content hash, so it is deterministic.
    ``out_uri``: the run is in a bucket; the shard goes there too (the driver may be on
    another node)."""
    tokens = np.stack(list(batch["tokens"]))
    mask = np.stack(list(batch["mask"])) if "mask" in batch else None
    segments = np.stack(list(batch["segments"])) if "segments" in batch else None
    name = "shard-" + hashlib.sha256(tokens.astype(np.int64).tobytes()).hexdigest()[:16] + ".bin"
    info = write_shard(Path(out_dir) / name, tokens, token_dtype(vocab_size), mask,
                       segments=segments)
    if out_uri is not None:
        for f in (info.file, info.mask_file, info.seg_file):
            if f is not None:
                Remote(out_uri).upload(Path(out_dir) / f, f)
    return pd.DataFrame([{**info.__dict__, "first_row": tokens[0].astype(np.int64).tobytes().hex()}])


def _write(ds, out_dir: Path, vocab_size: int, rows_per_shard: int) -> list[ShardInfo]:
    out_dir.mkdir(parents=True, exist_ok=True)
    out_uri = uri_of(out_dir)
    meta = ds.map_batches(write_shards, fn_kwargs={"out_dir": str(out_dir), "vocab_size": vocab_size,
                                                   "out_uri": out_uri},
                          batch_size=rows_per_shard, batch_format="pandas").take_all()
    if out_uri is not None:  # written on other nodes too: all of them into this one's mirror
        sizes = Remote(out_uri).listing()
        names = {r[k] for r in meta for k in ("file", "mask_file", "seg_file") if isinstance(r[k], str)}
        Remote(out_uri).pull(out_dir, {n: sizes[n] for n in names})
    # Order shards by content (preserve_order makes the set deterministic; this the order).
    meta.sort(key=lambda r: r["first_row"])
    return [ShardInfo(**{k: (None if isinstance(v, float) and math.isnan(v) else v)
                         for k, v in r.items() if k != "first_row"}) for r in meta]


# Blocks of cleaned text to pack. Documents are packed within a batch and batches follow
# blocks, so the count decides which documents share a row: it follows the data, never the
# cluster (2 x CPUs gave other shards on 2 nodes). 8 is what `make demo`'s cluster used.
MIN_PACK_BLOCKS, PACK_BLOCK_BYTES = 8, 16 << 20


def _read_blocks(files: list[Path]) -> int:
    """Blocks to tokenize: a function of the cleaned text's size alone (see above)."""
    size = sum(f.stat().st_size for f in files)
    return max(MIN_PACK_BLOCKS, size // PACK_BLOCK_BYTES)


def pack_pretrain(clean_files: list[Path], tokenizer_dir: Path, out_dir: Path, seq_len: int,
                  rows_per_shard: int, vocab_size: int, pad_id: int,
                  ratios: dict[str, float | None] | None = None,
                  mix: MixConfig | None = None) -> dict[str, Any]:
    """Tokenize, mix (module docstring) and pack; the metrics' ``mix`` reports the mix per
    source (``mix_report``), and ``achieved_shares`` lists every source, 0.0 included.

    A source with a positive ratio is planned at least one whole document. Should packing
    still leave it without tokens (only a batch shorter than one row is dropped whole), that
    is a warning naming it, not an error: the shards are otherwise sound, and the report shows
    its 0.0."""
    import ray

    mix = mix or MixConfig()
    data_context()
    # Re-block after reading: Ray reads a small shard into one block, tokenized by one task.
    blocks = _read_blocks(clean_files)
    paths, fs = dataset_paths(clean_files)  # in the bucket, when the run is there
    ds = (ray.data.read_parquet(paths, filesystem=fs)
          .select_columns(["source", "path", "line", "text"])
          .repartition(blocks))
    tok_kwargs = {"tokenizer_dir": _location(tokenizer_dir)}
    metrics: dict[str, Any] = {}
    plan = None
    if (ratios and any(r is not None for r in ratios.values())) or mix.total_tokens is not None:
        docs = ds.map_batches(tokenize_for_mix, batch_size=PACK_DOCS_PER_BATCH, batch_format="pandas",
                              fn_kwargs={**tok_kwargs, "seed": mix.seed}).materialize()
        available = {s: t["ntok"] for s, t in totals_by(docs, ["source"], ["ntok"]).items()}
        plan = plan_mix(available, ratios, mix.policy, mix.total_tokens, mix.max_epochs)
        cuts = _partial_cuts(docs, {s: p.partial for s, p in plan.sources.items() if p.partial})
        sampled = docs.map_batches(sample_documents, batch_format="pandas", fn_kwargs={
            "full": {s: p.full_epochs for s, p in plan.sources.items()},
            "tau": {s: tau for s, (tau, _) in cuts.items()}, "seed": mix.seed})
        emitted = sum(p.quota for p in plan.sources.values())
        if any(p.quota > p.available for p in plan.sources.values()):
            # Documents repeat: a global sort by each copy's key keeps copies far apart (see
            # sample_documents). The keys are uniform on [0, 1), so even boundaries balance
            # the blocks without a sampling pass; as many blocks as the copies need at the
            # read's block size. Packing then runs per sorted block, in parallel, as before.
            n = max(1, math.ceil(blocks * emitted / max(1, sum(available.values()))))
            sampled = sampled.sort("key", boundaries=[i / n for i in range(1, n)])
        packed = sampled.map_batches(pack_rows, batch_size=PACK_DOCS_PER_BATCH, batch_format="pandas",
                                     fn_kwargs={"seq_len": seq_len})
    else:
        packed = ds.map_batches(pack_documents, batch_size=PACK_DOCS_PER_BATCH, batch_format="pandas",
                                fn_kwargs={**tok_kwargs, "seq_len": seq_len})
    packed = packed.materialize()
    stats = totals_by(packed, [], ["docs", "dropped"]).get(None, {"docs": 0, "dropped": 0})
    per_source: dict[str, int] = {}
    for row in packed.filter(expr=col("source_tokens") != "").select_columns(["source_tokens"]).take_all():
        for s, n in json.loads(row["source_tokens"]).items():
            per_source[s] = per_source.get(s, 0) + int(n)
    shards = _write(packed.select_columns(["tokens"]), out_dir, vocab_size, rows_per_shard)
    index = ShardIndex(seq_len, str(token_dtype(vocab_size)), vocab_size, pad_id, "pretrain", shards)
    index.save(out_dir)
    if plan is not None:
        metrics["mix"] = mix_report(plan, {s: t for s, (_, t) in cuts.items()}, per_source,
                                    mix.policy, mix.max_epochs)
        log_mix(metrics["mix"], per_source, total_fixed=mix.total_tokens is not None)
    metrics.update({
        "sequences": index.num_sequences, "tokens": index.num_sequences * seq_len,
        "documents": stats["docs"], "dropped_tail_tokens": stats["dropped"], "shards": len(shards),
        "source_tokens": per_source, "achieved_shares": shares_of(per_source, ratios or {})})
    return metrics


def encode_conversations(batch: pd.DataFrame, tokenizer_dir: str, seq_len: int,
                         pack: bool = False) -> pd.DataFrame:
    from steelworks.data.sft import encode_conversation, pack_samples

    tok = _hf_tokenizer(tokenizer_dir)
    samples, truncated, types, no_target = [], [], [], 0
    for messages, task_type in zip(batch["messages"], batch["task_type"]):
        msgs = json.loads(messages) if isinstance(messages, str) else list(messages)
        t, m, tr = encode_conversation(tok, [dict(x) for x in msgs], seq_len, pad=not pack)
        if not m.any():  # cut before its first assistant token: nothing to learn from
            no_target += 1
            continue
        samples.append((t, m))
        truncated.append(tr)
        types.append(task_type)
    if not pack:
        # The per-batch count of dropped samples rides on the first row.
        return pd.DataFrame({"tokens": [t for t, _ in samples], "mask": [m for _, m in samples],
                             "truncated": truncated, "task_type": types,
                             "no_target": [no_target] + [0] * (len(samples) - 1)}
                            if samples else {c: [] for c in ("tokens", "mask", "truncated",
                                                             "task_type", "no_target")})
    if not samples:
        return pd.DataFrame({c: [] for c in ("tokens", "mask", "segments", "truncated",
                                             "task_types", "samples", "no_target")})
    tokens, mask, segments = pack_samples(samples, seq_len, tok.pad_token_id)
    # Counters ride on the first row: the task types of this batch's samples.
    n = len(tokens)
    first = [json.dumps(pd.Series(types).value_counts().to_dict())] + [""] * (n - 1)
    return pd.DataFrame({"tokens": list(tokens), "mask": list(mask), "segments": list(segments),
                         "truncated": [sum(truncated)] + [0] * (n - 1),
                         "task_types": first, "samples": [len(samples)] + [0] * (n - 1),
                         "no_target": [no_target] + [0] * (n - 1)})


def build_sft(sft_files: list[Path], tokenizer_dir: Path, out_dir: Path, seq_len: int,
              rows_per_shard: int, vocab_size: int, pad_id: int, pack: bool = False) -> dict[str, Any]:
    import ray

    data_context()
    paths, fs = dataset_paths(sft_files)  # in the bucket, when the run is there
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(["messages", "task_type"])
    ds = ds.map_batches(encode_conversations, batch_size=256, batch_format="pandas",
                        fn_kwargs={"tokenizer_dir": _location(tokenizer_dir), "seq_len": seq_len,
                                   "pack": pack}).materialize()
    by_type: dict[str, int] = {}
    if pack:
        for row in ds.filter(expr=col("task_types") != "").select_columns(["task_types"]).take_all():
            for t, n in json.loads(row["task_types"]).items():
                by_type[t] = by_type.get(t, 0) + int(n)
        samples = totals_by(ds, [], ["samples"]).get(None, {"samples": 0})["samples"]
        columns = ["tokens", "mask", "segments"]
    else:
        by_type = {t: c["count"] for t, c in totals_by(ds, ["task_type"]).items()}
        samples = sum(by_type.values())
        columns = ["tokens", "mask"]
    t = totals_by(ds, [], ["truncated", "no_target"]).get(None, {"truncated": 0, "no_target": 0})
    shards = _write(ds.select_columns(columns), out_dir, vocab_size, rows_per_shard)
    index = ShardIndex(seq_len, str(token_dtype(vocab_size)), vocab_size, pad_id, "sft", shards)
    index.save(out_dir)
    return {"samples": samples, "rows": index.num_sequences, "packed": pack,
            "task_types": dict(sorted(by_type.items())), "truncated": t["truncated"],
            "dropped_no_target": t["no_target"],
            "shards": len(shards)}
