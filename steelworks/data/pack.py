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

import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ray.data.expressions import col

from steelworks.data.aggregate import totals_by
from steelworks.data.clean import data_context
from steelworks.data.shards import ShardIndex, ShardInfo, token_dtype, write_shard

PACK_DOCS_PER_BATCH = 2048  # documents tokenized and packed together by one task


@functools.lru_cache(maxsize=4)
def _load(tokenizer_dir: str):
    """The tokenizer and its end-of-document id, loaded once per worker process. Plain
    tasks with this cache, not an actor pool: an actor holding the only CPU of a 1-CPU
    cluster starves the read tasks that feed it."""
    from steelworks.data.tokenizer import document_end_id, load_tokenizer

    # One thread per task: Ray gives each task one CPU and runs one task per CPU. The Rust
    # tokenizer's own thread pool would otherwise oversubscribe the node.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(tokenizer_dir)
    return tok, document_end_id(tok)


def tokenize_documents(batch: pd.DataFrame, tokenizer_dir: str) -> pd.DataFrame:
    """text -> tokens (int32, ending in <|endoftext|>) and their count, per document."""
    tok, eod = _load(tokenizer_dir)
    ids = tok(list(batch["text"]), add_special_tokens=False)["input_ids"]
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


def write_shards(batch: pd.DataFrame, out_dir: str, vocab_size: int) -> pd.DataFrame:
    """Writes one shard per batch; the name is the content hash, so it is deterministic."""
    tokens = np.stack(list(batch["tokens"]))
    mask = np.stack(list(batch["mask"])) if "mask" in batch else None
    segments = np.stack(list(batch["segments"])) if "segments" in batch else None
    name = "shard-" + hashlib.sha256(tokens.astype(np.int64).tobytes()).hexdigest()[:16] + ".bin"
    info = write_shard(Path(out_dir) / name, tokens, token_dtype(vocab_size), mask,
                       segments=segments)
    return pd.DataFrame([{**info.__dict__, "first_row": tokens[0].astype(np.int64).tobytes().hex()}])


def _write(ds, out_dir: Path, vocab_size: int, rows_per_shard: int) -> list[ShardInfo]:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = ds.map_batches(write_shards, fn_kwargs={"out_dir": str(out_dir), "vocab_size": vocab_size},
                          batch_size=rows_per_shard, batch_format="pandas").take_all()
    # Order shards by content (preserve_order makes the set deterministic; this the order).
    meta.sort(key=lambda r: r["first_row"])
    return [ShardInfo(**{k: (None if isinstance(v, float) and math.isnan(v) else v)
                         for k, v in r.items() if k != "first_row"}) for r in meta]


def _read_blocks(files: list[Path]) -> int:
    """Blocks to tokenize: enough for every CPU to work in parallel (one per ~16 MB of
    cleaned text, at least two per CPU)."""
    import ray

    size = sum(f.stat().st_size for f in files)
    return max(2 * int(ray.cluster_resources().get("CPU", 1)), size // (16 << 20), 1)


def pack_pretrain(clean_files: list[Path], tokenizer_dir: Path, out_dir: Path, seq_len: int,
                  rows_per_shard: int, vocab_size: int, pad_id: int,
                  ratios: dict[str, float | None] | None = None, total_tokens: int | None = None,
                  seed: int = 0) -> dict[str, Any]:
    import ray

    data_context()
    # Re-block after reading: a cleaned shard is one block, and the tokenizing map would
    # otherwise fuse with the read into one task per shard (no parallelism with 1-2 shards).
    # Split into blocks after reading: Ray reads small shards into one block, and one block
    # is tokenized by one task, one CPU.
    ds = (ray.data.read_parquet([str(f) for f in clean_files])
          .select_columns(["source", "path", "line", "text"])
          .repartition(_read_blocks(clean_files)))
    tok_kwargs = {"tokenizer_dir": str(tokenizer_dir)}
    metrics: dict[str, Any] = {}
    if ratios and (any(r is not None for r in ratios.values()) or total_tokens is not None):
        docs = ds.map_batches(tokenize_documents, batch_size=PACK_DOCS_PER_BATCH, batch_format="pandas",
                              fn_kwargs=tok_kwargs).materialize()
        available = {s: t["ntok"] for s, t in totals_by(docs, ["source"], ["ntok"]).items()}
        weights = mix_weights(available, ratios, total_tokens)
        metrics["mix"] = {"available_tokens": available, "weights": weights,
                          "target_ratios": ratios}
        packed = (docs.map_batches(sample_documents, batch_format="pandas",
                                   fn_kwargs={"weights": weights, "seed": seed})
                      .map_batches(pack_rows, batch_size=PACK_DOCS_PER_BATCH, batch_format="pandas",
                                   fn_kwargs={"seq_len": seq_len}))
    else:
        packed = ds.map_batches(pack_documents, batch_size=PACK_DOCS_PER_BATCH, batch_format="pandas",
                                fn_kwargs={**tok_kwargs, "seq_len": seq_len})
    packed = packed.materialize()
    stats = totals_by(packed, [], ["docs", "dropped"]).get(None, {"docs": 0, "dropped": 0})
    per_source: dict[str, int] = {}
    for row in packed.filter(expr=col("source_tokens") != "").select_columns(["source_tokens"]).take_all():
        for s, n in json.loads(row["source_tokens"]).items():
            per_source[s] = per_source.get(s, 0) + int(n)
    total = sum(per_source.values())
    shards = _write(packed.select_columns(["tokens"]), out_dir, vocab_size, rows_per_shard)
    index = ShardIndex(seq_len, str(token_dtype(vocab_size)), vocab_size, pad_id, "pretrain", shards)
    index.save(out_dir)
    metrics.update({
        "sequences": index.num_sequences, "tokens": index.num_sequences * seq_len,
        "documents": stats["docs"], "dropped_tail_tokens": stats["dropped"], "shards": len(shards),
        "source_tokens": per_source,
        "achieved_shares": {s: round(n / total, 4) for s, n in per_source.items()} if total else {}})
    return metrics


def encode_conversations(batch: pd.DataFrame, tokenizer_dir: str, seq_len: int,
                         pack: bool = False) -> pd.DataFrame:
    from steelworks.data.sft import encode_conversation, pack_samples

    tok, _ = _load(tokenizer_dir)
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
    ds = ray.data.read_parquet([str(f) for f in sft_files]).select_columns(["messages", "task_type"])
    ds = ds.map_batches(encode_conversations, batch_size=256, batch_format="pandas",
                        fn_kwargs={"tokenizer_dir": str(tokenizer_dir), "seq_len": seq_len,
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
