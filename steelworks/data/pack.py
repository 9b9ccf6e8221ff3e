"""Tokenize and pack on Ray Data.

Pretraining: documents are tokenized in parallel, joined with <|endoftext|> and cut into
fixed ``seq_len`` rows; each batch of ``sequences_per_shard`` rows is written as one shard
by the worker that made it. Packing happens within a batch of documents, so at most one
partial row per batch is dropped (counted in the metrics) — the price of never funnelling
tokens through the driver.

SFT: each conversation becomes one row with its loss mask (``steelworks.data.sft``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steelworks.data.shards import ShardIndex, ShardInfo, token_dtype, write_shard

PACK_DOCS_PER_BATCH = 2048  # documents tokenized and packed together by one task


class _Tokenizing:
    """Ray Data callable class: loads the tokenizer once per worker."""

    def __init__(self, tokenizer_dir: str) -> None:
        from steelworks.data.tokenizer import document_end_id, load_tokenizer

        self.tok = load_tokenizer(tokenizer_dir)
        self.eod = document_end_id(self.tok)


class PackDocuments(_Tokenizing):
    def __init__(self, tokenizer_dir: str, seq_len: int) -> None:
        super().__init__(tokenizer_dir)
        self.seq_len = seq_len

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        ids = self.tok(list(batch["text"]), add_special_tokens=False)["input_ids"]
        stream = np.fromiter((t for doc in ids for t in (*doc, self.eod)), dtype=np.int64)
        n = len(stream) // self.seq_len
        rows = stream[: n * self.seq_len].reshape(n, self.seq_len)
        # Per-batch counters ride on the first row so the driver can sum them.
        docs, dropped = np.zeros(n, np.int64), np.zeros(n, np.int64)
        if n:
            docs[0], dropped[0] = len(ids), len(stream) - n * self.seq_len
        return pd.DataFrame({"tokens": list(rows), "docs": docs, "dropped": dropped})


class EncodeConversations(_Tokenizing):
    def __init__(self, tokenizer_dir: str, seq_len: int) -> None:
        super().__init__(tokenizer_dir)
        self.seq_len = seq_len

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from steelworks.data.sft import encode_conversation

        tokens, masks, truncated = [], [], []
        for messages in batch["messages"]:
            msgs = json.loads(messages) if isinstance(messages, str) else list(messages)
            t, m, tr = encode_conversation(self.tok, [dict(x) for x in msgs], self.seq_len)
            tokens.append(t)
            masks.append(m)
            truncated.append(tr)
        return pd.DataFrame({"tokens": tokens, "mask": masks, "truncated": truncated,
                             "task_type": list(batch["task_type"])})


class WriteShards:
    """Writes one shard per batch; the name is the content hash, so it is deterministic."""

    def __init__(self, out_dir: str, vocab_size: int) -> None:
        self.out_dir, self.dtype = Path(out_dir), token_dtype(vocab_size)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        tokens = np.stack(list(batch["tokens"]))
        mask = np.stack(list(batch["mask"])) if "mask" in batch else None
        name = "shard-" + hashlib.sha256(tokens.astype(np.int64).tobytes()).hexdigest()[:16] + ".bin"
        info = write_shard(self.out_dir / name, tokens, self.dtype, mask)
        return pd.DataFrame([{**info.__dict__, "first_row": tokens[0].astype(np.int64).tobytes().hex()}])


def _write(ds, out_dir: Path, vocab_size: int, rows_per_shard: int) -> list[ShardInfo]:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = ds.map_batches(WriteShards, fn_constructor_kwargs={"out_dir": str(out_dir),
                          "vocab_size": vocab_size}, batch_size=rows_per_shard,
                          batch_format="pandas", concurrency=2).take_all()
    # Order shards by content (preserve_order makes the set deterministic; this the order).
    meta.sort(key=lambda r: r["first_row"])
    return [ShardInfo(**{k: (None if isinstance(v, float) and np.isnan(v) else v)
                         for k, v in r.items() if k != "first_row"}) for r in meta]


def pack_pretrain(clean_files: list[Path], tokenizer_dir: Path, out_dir: Path, seq_len: int,
                  rows_per_shard: int, vocab_size: int, pad_id: int) -> dict[str, Any]:
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.read_parquet([str(f) for f in clean_files], columns=["text"])
    packed = ds.map_batches(PackDocuments, batch_size=PACK_DOCS_PER_BATCH, batch_format="pandas",
                            fn_constructor_kwargs={"tokenizer_dir": str(tokenizer_dir),
                                                   "seq_len": seq_len}, concurrency=2).materialize()
    stats = packed.select_columns(["docs", "dropped"]).sum(["docs", "dropped"])
    shards = _write(packed.select_columns(["tokens"]), out_dir, vocab_size, rows_per_shard)
    index = ShardIndex(seq_len, str(token_dtype(vocab_size)), vocab_size, pad_id, "pretrain", shards)
    index.save(out_dir)
    return {"sequences": index.num_sequences, "tokens": index.num_sequences * seq_len,
            "documents": int(stats["sum(docs)"] or 0),
            "dropped_tail_tokens": int(stats["sum(dropped)"] or 0), "shards": len(shards)}


def build_sft(records: list[dict[str, Any]], tokenizer_dir: Path, out_dir: Path, seq_len: int,
              rows_per_shard: int, vocab_size: int, pad_id: int) -> dict[str, Any]:
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    rows = [{"messages": json.dumps(r["messages"], ensure_ascii=False),
             "task_type": r.get("task_type", "chat")} for r in records]
    ds = ray.data.from_items(rows).map_batches(
        EncodeConversations, batch_size=256, batch_format="pandas", concurrency=2,
        fn_constructor_kwargs={"tokenizer_dir": str(tokenizer_dir), "seq_len": seq_len}).materialize()
    by_type: dict[str, int] = {}
    for r in ds.groupby("task_type").count().take_all():
        by_type[r["task_type"]] = int(r["count()"])
    truncated = int(ds.sum("truncated") or 0)
    shards = _write(ds.select_columns(["tokens", "mask"]), out_dir, vocab_size, rows_per_shard)
    index = ShardIndex(seq_len, str(token_dtype(vocab_size)), vocab_size, pad_id, "sft", shards)
    index.save(out_dir)
    return {"samples": index.num_sequences, "task_types": by_type, "truncated": truncated,
            "shards": len(shards)}
