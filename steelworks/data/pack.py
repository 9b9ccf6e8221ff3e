"""Tokenize, mix and pack on Ray Data.

Pretraining: documents are tokenized in parallel (each followed by <|endoftext|>), sampled
to the configured source ratios (``mix_weights``), joined and cut into fixed ``seq_len``
rows; each batch of ``sequences_per_shard`` rows is written as one shard by the worker that
made it. Packing happens within a batch of documents, so at most one partial row per batch
is dropped (counted in the metrics) — the price of never funnelling tokens through the
driver. With ratios set, the tokenized corpus is materialized once so per-source token
totals are known before sampling (Ray Data spills it to disk when it does not fit).

SFT: each conversation becomes one row with its loss mask (``steelworks.data.sft``), or,
with ``pack.sft_pack``, several conversations share a row with their boundaries kept in a
segment-id array.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steelworks.data.shards import ShardIndex, ShardInfo, token_dtype, write_shard

PACK_DOCS_PER_BATCH = 2048  # documents tokenized and packed together by one task


def _actors():
    """Actor pool for tokenizing: up to one actor per CPU of the cluster (a fixed pool
    larger than the cluster would never start on a 1-CPU cluster)."""
    import ray

    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 1))))


class _Tokenizing:
    """Ray Data callable class: loads the tokenizer once per worker."""

    def __init__(self, tokenizer_dir: str) -> None:
        from steelworks.data.tokenizer import document_end_id, load_tokenizer

        self.tok = load_tokenizer(tokenizer_dir)
        self.eod = document_end_id(self.tok)


class TokenizeDocuments(_Tokenizing):
    """text -> tokens (int32, ending in <|endoftext|>) and their count, per document."""

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        ids = self.tok(list(batch["text"]), add_special_tokens=False)["input_ids"]
        tokens = [np.array([*doc, self.eod], dtype=np.int32) for doc in ids]
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


class PackDocuments(TokenizeDocuments):
    """text -> packed rows in one step (the natural mix: no sampling)."""

    def __init__(self, tokenizer_dir: str, seq_len: int) -> None:
        super().__init__(tokenizer_dir)
        self.seq_len = seq_len

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if "source" not in batch:
            batch = batch.assign(source="")
        return pack_rows(super().__call__(batch), self.seq_len)


def mix_weights(tokens: dict[str, int], ratios: dict[str, float | None],
                total: int | None) -> dict[str, float]:
    """Expected copies of each document of a source so that source s contributes
    ``ratio_s * T`` tokens. T is ``total`` when given (sources may then repeat, weight > 1),
    else the largest T that needs no repetition: min_s(tokens_s / ratio_s)."""
    if all(r is None for r in ratios.values()):
        scale = 1.0 if total is None else total / max(1, sum(tokens.values()))
        return {s: scale for s in tokens}
    missing = [s for s, r in ratios.items() if r and not tokens.get(s)]
    if missing:
        raise ValueError(f"mix: sources {missing} have a ratio but no tokens left after cleaning")
    t = total if total is not None else min(tokens[s] / r for s, r in ratios.items() if r)
    return {s: (ratios[s] or 0.0) * t / tokens[s] if tokens.get(s) else 0.0 for s in ratios}


def sample_documents(batch: pd.DataFrame, weights: dict[str, float], seed: int) -> pd.DataFrame:
    """Each document appears floor(w) times, plus once more with probability frac(w). The
    coin is a hash of (seed, path, line), so the sample is the same on every run and does
    not depend on how Ray split the blocks."""
    w = batch["source"].map(weights).to_numpy(dtype=np.float64)
    u = np.array([int.from_bytes(hashlib.blake2b(f"{seed}\0{p}\0{n}".encode(), digest_size=8)
                                 .digest(), "little") / 2.0**64
                  for p, n in zip(batch["path"], batch["line"])])
    copies = np.floor(w).astype(np.int64) + (u < w - np.floor(w))
    return batch.iloc[np.repeat(np.arange(len(batch)), copies)].reset_index(drop=True)


class WriteShards:
    """Writes one shard per batch; the name is the content hash, so it is deterministic."""

    def __init__(self, out_dir: str, vocab_size: int) -> None:
        self.out_dir, self.dtype = Path(out_dir), token_dtype(vocab_size)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        tokens = np.stack(list(batch["tokens"]))
        mask = np.stack(list(batch["mask"])) if "mask" in batch else None
        segments = np.stack(list(batch["segments"])) if "segments" in batch else None
        name = "shard-" + hashlib.sha256(tokens.astype(np.int64).tobytes()).hexdigest()[:16] + ".bin"
        info = write_shard(self.out_dir / name, tokens, self.dtype, mask, segments=segments)
        return pd.DataFrame([{**info.__dict__, "first_row": tokens[0].astype(np.int64).tobytes().hex()}])


def _write(ds, out_dir: Path, vocab_size: int, rows_per_shard: int) -> list[ShardInfo]:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = ds.map_batches(WriteShards, fn_constructor_kwargs={"out_dir": str(out_dir),
                          "vocab_size": vocab_size}, batch_size=rows_per_shard,
                          batch_format="pandas", compute=_actors()).take_all()
    # Order shards by content (preserve_order makes the set deterministic; this the order).
    meta.sort(key=lambda r: r["first_row"])
    return [ShardInfo(**{k: (None if isinstance(v, float) and math.isnan(v) else v)
                         for k, v in r.items() if k != "first_row"}) for r in meta]


def pack_pretrain(clean_files: list[Path], tokenizer_dir: Path, out_dir: Path, seq_len: int,
                  rows_per_shard: int, vocab_size: int, pad_id: int,
                  ratios: dict[str, float | None] | None = None, total_tokens: int | None = None,
                  seed: int = 0) -> dict[str, Any]:
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.read_parquet([str(f) for f in clean_files], columns=["source", "path", "line", "text"])
    tok_kwargs = {"tokenizer_dir": str(tokenizer_dir)}
    metrics: dict[str, Any] = {}
    if ratios and (any(r is not None for r in ratios.values()) or total_tokens is not None):
        docs = ds.map_batches(TokenizeDocuments, batch_size=PACK_DOCS_PER_BATCH, batch_format="pandas",
                              fn_constructor_kwargs=tok_kwargs, compute=_actors()).materialize()
        available = {r["source"]: int(r["sum(ntok)"])
                     for r in docs.groupby("source", num_partitions=1).sum("ntok").take_all()}
        weights = mix_weights(available, ratios, total_tokens)
        metrics["mix"] = {"available_tokens": available, "weights": weights,
                          "target_ratios": ratios}
        packed = (docs.map_batches(sample_documents, batch_format="pandas",
                                   fn_kwargs={"weights": weights, "seed": seed})
                      .map_batches(pack_rows, batch_size=PACK_DOCS_PER_BATCH, batch_format="pandas",
                                   fn_kwargs={"seq_len": seq_len}))
    else:
        packed = ds.map_batches(PackDocuments, batch_size=PACK_DOCS_PER_BATCH, batch_format="pandas",
                                fn_constructor_kwargs={**tok_kwargs, "seq_len": seq_len},
                                compute=_actors())
    packed = packed.materialize()
    stats = packed.select_columns(["docs", "dropped"]).sum(["docs", "dropped"])
    per_source: dict[str, int] = {}
    for row in packed.filter(expr="source_tokens != ''").select_columns(["source_tokens"]).take_all():
        for s, n in json.loads(row["source_tokens"]).items():
            per_source[s] = per_source.get(s, 0) + int(n)
    total = sum(per_source.values())
    shards = _write(packed.select_columns(["tokens"]), out_dir, vocab_size, rows_per_shard)
    index = ShardIndex(seq_len, str(token_dtype(vocab_size)), vocab_size, pad_id, "pretrain", shards)
    index.save(out_dir)
    metrics.update({
        "sequences": index.num_sequences, "tokens": index.num_sequences * seq_len,
        "documents": int(stats["sum(docs)"] or 0),
        "dropped_tail_tokens": int(stats["sum(dropped)"] or 0), "shards": len(shards),
        "source_tokens": per_source,
        "achieved_shares": {s: round(n / total, 4) for s, n in per_source.items()} if total else {}})
    return metrics


class EncodeConversations(_Tokenizing):
    def __init__(self, tokenizer_dir: str, seq_len: int, pack: bool = False) -> None:
        super().__init__(tokenizer_dir)
        self.seq_len, self.pack = seq_len, pack

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from steelworks.data.sft import encode_conversation, pack_samples

        samples, truncated = [], []
        for messages in batch["messages"]:
            msgs = json.loads(messages) if isinstance(messages, str) else list(messages)
            t, m, tr = encode_conversation(self.tok, [dict(x) for x in msgs], self.seq_len,
                                           pad=not self.pack)
            samples.append((t, m))
            truncated.append(tr)
        types = list(batch["task_type"])
        if not self.pack:
            return pd.DataFrame({"tokens": [t for t, _ in samples], "mask": [m for _, m in samples],
                                 "truncated": truncated, "task_type": types})
        tokens, mask, segments = pack_samples(samples, self.seq_len, self.tok.pad_token_id)
        # Counters ride on the first row: the task types of this batch's samples.
        n = len(tokens)
        first = [json.dumps(pd.Series(types).value_counts().to_dict())] + [""] * (n - 1)
        return pd.DataFrame({"tokens": list(tokens), "mask": list(mask), "segments": list(segments),
                             "truncated": [sum(truncated)] + [0] * (n - 1),
                             "task_types": first, "samples": [len(samples)] + [0] * (n - 1)})


def build_sft(sft_files: list[Path], tokenizer_dir: Path, out_dir: Path, seq_len: int,
              rows_per_shard: int, vocab_size: int, pad_id: int, pack: bool = False) -> dict[str, Any]:
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.read_parquet([str(f) for f in sft_files], columns=["messages", "task_type"])
    ds = ds.map_batches(EncodeConversations, batch_size=256, batch_format="pandas", compute=_actors(),
                        fn_constructor_kwargs={"tokenizer_dir": str(tokenizer_dir),
                                               "seq_len": seq_len, "pack": pack}).materialize()
    by_type: dict[str, int] = {}
    if pack:
        for row in ds.filter(expr="task_types != ''").select_columns(["task_types"]).take_all():
            for t, n in json.loads(row["task_types"]).items():
                by_type[t] = by_type.get(t, 0) + int(n)
        samples = int(ds.sum("samples") or 0)
        columns = ["tokens", "mask", "segments"]
    else:
        for r in ds.groupby("task_type", num_partitions=1).count().take_all():
            by_type[r["task_type"]] = int(r["count()"])
        samples = ds.count()
        columns = ["tokens", "mask"]
    truncated = int(ds.sum("truncated") or 0)
    shards = _write(ds.select_columns(columns), out_dir, vocab_size, rows_per_shard)
    index = ShardIndex(seq_len, str(token_dtype(vocab_size)), vocab_size, pad_id, "sft", shards)
    index.save(out_dir)
    return {"samples": samples, "rows": index.num_sequences, "packed": pack,
            "task_types": dict(sorted(by_type.items())), "truncated": truncated,
            "shards": len(shards)}
