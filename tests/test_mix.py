"""Explicit mixing (``mix.policy``): quotas, whole-document selection in hash order, copies
spread over the stream, and the report, first as pure functions, then once through Ray Data."""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from steelworks.data.config import MixConfig
from steelworks.data.pack import (
    BUCKET_BITS,
    crossing_bucket,
    hash_order_cut,
    order_hash,
    pack_rows,
    plan_mix,
    sample_documents,
)

RATIOS = {"a": 0.5, "b": 0.25, "c": 0.25}


def test_downsample_the_scarcest_source_sets_the_total():
    plan = plan_mix({"a": 1000, "b": 100, "c": 500}, RATIOS, "downsample", None, 4.0)
    assert plan.total == 400 and plan.limited_by == "b"  # b: 100 / 0.25
    a, b, c = (plan.sources[s] for s in "abc")
    assert (a.quota, b.quota, c.quota) == (200, 100, 100)
    assert (b.full_epochs, b.partial, b.method) == (1, 0, "every_document")
    assert (a.full_epochs, a.partial, a.method) == (0, 200, "hash_order_prefix")
    assert all(p.quota <= p.available and not p.capped for p in plan.sources.values())


def test_upsample_the_largest_source_sets_the_total_and_max_epochs_caps_the_rest():
    plan = plan_mix({"a": 1000, "b": 100, "c": 400}, RATIOS, "upsample", None, 4.0)
    assert plan.total == 2000 and plan.limited_by == "a"  # a: 1000 / 0.5
    a, b, c = (plan.sources[s] for s in "abc")
    assert (a.quota, a.full_epochs, a.partial) == (1000, 1, 0)
    # b would need 500 tokens (5 epochs): capped at 4 epochs, its share falls short.
    assert (b.target, b.quota, b.full_epochs, b.partial, b.capped) == (500, 400, 4, 0, True)
    assert (c.target, c.quota, c.full_epochs, c.partial, c.capped) == (500, 500, 1, 100, False)
    assert plan.max_total_for_ratios == 1600  # b's 4 epochs: 400 / 0.25 (the total to set)
    # A fractional cap: 2.5 epochs of b is two full passes and half of a third.
    b = plan_mix({"a": 1000, "b": 100, "c": 400}, RATIOS, "upsample", None, 2.5).sources["b"]
    assert (b.quota, b.full_epochs, b.partial, b.capped) == (250, 2, 50, True)


@pytest.mark.parametrize("policy", ["downsample", "upsample"])
def test_total_tokens_sets_the_total_under_either_policy(policy):
    plan = plan_mix({"a": 1000, "b": 100, "c": 400}, RATIOS, policy, 600, 4.0)
    assert plan.total == 600 and plan.limited_by is None
    assert [plan.sources[s].quota for s in "abc"] == [300, 150, 150]
    assert (plan.sources["b"].full_epochs, plan.sources["b"].partial) == (1, 50)
    big = plan_mix({"a": 1000, "b": 100, "c": 400}, RATIOS, policy, 100_000, 4.0)
    assert big.sources["b"].quota == 400 and big.sources["b"].capped  # max_epochs holds


def test_natural_mix_with_total_tokens_keeps_the_natural_shares():
    for ratios in (None, {"a": None, "b": None}):
        plan = plan_mix({"a": 300, "b": 100}, ratios, "downsample", 800, 4.0)
        assert {s: p.ratio for s, p in plan.sources.items()} == {"a": 0.75, "b": 0.25}
        assert [(p.quota, p.full_epochs, p.partial) for p in plan.sources.values()] == [
            (600, 2, 0), (200, 2, 0)]


def test_a_positive_ratio_never_plans_zero_tokens():
    plan = plan_mix({"a": 10**9, "b": 50}, {"a": 0.999, "b": 0.001}, "downsample", 100, 4.0)
    assert plan.sources["b"].quota >= 1 and plan.sources["b"].partial >= 1


def test_a_source_with_a_ratio_but_no_tokens_is_an_error():
    with pytest.raises(ValueError, match="'b'"):
        plan_mix({"a": 10}, {"a": 0.5, "b": 0.5}, "downsample", None, 4.0)


def _take_until(u: np.ndarray, ntok: np.ndarray, need: int) -> set[int]:
    """The reference: documents in hash order while their midpoint is short of need (the
    total lands nearest need), the first one always."""
    order = np.argsort(u, kind="stable")
    cum = np.cumsum(ntok[order])
    take = cum - ntok[order] / 2 < need
    take[0] = True
    return set(order[take].tolist())


def _two_pass(u: np.ndarray, ntok: np.ndarray, need: int) -> tuple[set[int], int]:
    """What pack_pretrain does on Ray: a token histogram over hash buckets, then an exact cut
    inside the one bucket where the quota is met."""
    bucket = (u >> np.uint64(64 - BUCKET_BITS)).astype(np.int64)
    hist = pd.Series(ntok).groupby(bucket).sum().to_dict()
    b, before = crossing_bucket(hist, need)
    tau, taken = hash_order_cut(u[bucket == b], ntok[bucket == b], need, before)
    return set(np.flatnonzero(u <= np.uint64(tau)).tolist()), taken


def test_hash_order_selection_takes_whole_documents_until_the_quota():
    rng = np.random.default_rng(0)
    u = order_hash(7, [f"f{i % 3}" for i in range(5000)], list(range(5000)))
    ntok = rng.integers(1, 500, 5000)
    for need in [1, 37, 12_345, int(ntok.sum()) - 1, *rng.integers(1, ntok.sum(), 200)]:
        picked, taken = _two_pass(u, ntok, need)
        assert picked == _take_until(u, ntok, need)
        assert taken == ntok[list(picked)].sum()
        assert abs(taken - need) <= ntok.max() / 2 or len(picked) == 1  # within half a document


def test_documents_longer_than_the_quota_still_give_one():
    u = order_hash(0, ["x.jsonl"] * 3, [1, 2, 3])
    picked, taken = _two_pass(u, np.array([1000, 1000, 1000]), 10)
    assert len(picked) == 1 and taken == 1000


def _docs(n: int, source: str) -> pd.DataFrame:
    ntok = np.arange(n) % 7 + 3
    return pd.DataFrame({"source": source, "path": f"{source}.jsonl", "line": np.arange(n),
                         "tokens": [np.full(k, i, np.int32) for i, k in enumerate(ntok)],
                         "ntok": ntok})


def test_copies_are_spread_apart_and_independent_of_block_splits():
    batch = pd.concat([_docs(200, "a"), _docs(30, "b")], ignore_index=True)
    batch["u"] = order_hash(3, batch["path"], batch["line"])
    tau = {"b": int(np.sort(batch["u"][batch["source"] == "b"])[10])}  # 11 docs: one more pass
    out = sample_documents(batch, full={"a": 1, "b": 3}, tau=tau, seed=3)
    copies = out.groupby(["source", "line"]).size()
    assert (copies["a"] == 1).all() and sorted(Counter(copies["b"]).items()) == [(3, 19), (4, 11)]
    for (_, _), keys in out.groupby(["source", "line"])["key"]:
        c = len(keys)
        assert ((0 <= keys) & (keys < 1)).all()
        # Copy k sits in the k-th c-th of the stream, at least half a region after copy k-1.
        assert (np.diff(np.sort(keys)) >= 0.5 / c - 1e-12).all()
    split = pd.concat([sample_documents(batch.iloc[:77], {"a": 1, "b": 3}, tau, 3),
                       sample_documents(batch.iloc[77:], {"a": 1, "b": 3}, tau, 3)])
    key = ["source", "line", "key"]
    pd.testing.assert_frame_equal(split.sort_values(key)[key].reset_index(drop=True),
                                  out.sort_values(key)[key].reset_index(drop=True))
    # Packed in key order, no row holds two copies of one document: each document's tokens
    # are its own id, so a row with two copies shows the id in two runs, or in one run longer
    # than the document (copies back to back).
    stream = out.sort_values("key", kind="stable")
    ids = np.where(stream["source"] == "b", 1000, 0) + stream["line"].to_numpy() + 1
    stream = stream.assign(tokens=[np.full(n, i, np.int32) for i, n in zip(ids, stream["ntok"])])
    ntok = dict(zip(ids, stream["ntok"]))
    for row in pack_rows(stream, 32)["tokens"]:
        starts = np.flatnonzero(np.diff(np.concatenate([[-1], row])) != 0)
        runs = np.diff(np.concatenate([starts, [len(row)]]))
        assert len(set(row[starts])) == len(starts), row
        assert all(n <= ntok[i] for i, n in zip(row[starts], runs)), row


def test_mix_config_is_validated():
    assert MixConfig().policy == "downsample" and MixConfig().max_epochs == 4.0
    with pytest.raises(ValueError, match="policy"):
        MixConfig(policy="both")
    for bad in (0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="max_epochs"):
            MixConfig(max_epochs=bad)
    with pytest.raises(ValueError, match="total_tokens"):
        MixConfig(total_tokens=0)


# --- once through Ray Data ---------------------------------------------------------------

FILLER = "The quick brown fox jumps over the lazy dog."
MIX_RATIOS = {"big": 0.6, "small": 0.3, "long": 0.1}
MARK = re.compile(r"qz(\d+)qz")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """300 short documents, 10 short ones (scarce for their ratio), 2 long ones (each longer
    than its source's downsample quota). Each starts with a unique marker."""
    rows = [("big", 300, 1), ("small", 10, 1), ("long", 2, 25)]
    records, i = [], 0
    for source, n, repeat in rows:
        for line in range(n):
            records.append({"source": source, "path": f"/corpus/{source}.jsonl", "line": line,
                            "text": f"qz{i:03d}qz " + " ".join([FILLER] * repeat)})
            i += 1
    path = tmp_path_factory.mktemp("mix") / "clean-0.parquet"
    pd.DataFrame(records).to_parquet(path)
    return path


def _pack(corpus: Path, tok_dir: Path, out: Path, policy: str) -> dict:
    from steelworks.data.pack import pack_pretrain
    from steelworks.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    return pack_pretrain([corpus], tok_dir, out, seq_len=64, rows_per_shard=100_000,
                         vocab_size=len(tok), pad_id=tok.pad_token_id, ratios=MIX_RATIOS,
                         mix=MixConfig(policy=policy, max_epochs=4.0))


def _check_accounting(m: dict) -> None:
    mix = m["mix"]
    assert set(m["achieved_shares"]) == set(MIX_RATIOS)
    for s, src in mix["sources"].items():
        assert src["used_tokens"] > 0, s  # never zero for a positive ratio
        assert m["source_tokens"][s] == src["used_tokens"] + src["repeated_tokens"], s
        assert src["achieved_share"] == m["achieved_shares"][s]
        assert src["target_ratio"] == MIX_RATIOS[s]


@pytest.mark.ray
def test_downsample_reports_and_warns_about_discarded_tokens(ray_local, tiny_tokenizer_dir,
                                                             corpus, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="steelworks.data"):
        m = _pack(corpus, tiny_tokenizer_dir, tmp_path / "down", "downsample")
    mix = m["mix"]
    _check_accounting(m)
    assert mix["policy"] == "downsample" and mix["limited_by"] == "small"
    assert all(s["repeated_tokens"] == 0 for s in mix["sources"].values())
    long = mix["sources"]["long"]
    # Each long document is longer than the source's quota: it still gets one, whole.
    assert long["available_tokens"] / 2 > long["target_tokens"]
    assert long["target_tokens"] < long["used_tokens"] < long["available_tokens"]
    assert long["method"] == "hash_order_prefix"
    assert mix["sources"]["small"]["method"] == "every_document"
    assert mix["discarded_tokens"] > mix["available_tokens"] / 2
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'small'" in w and "mix.policy: upsample" in w and "mix.total_tokens" in w
               for w in warned), warned
    assert any("'long'" in w and "whole documents" in w for w in warned), warned
    assert any("big" in r.getMessage() and "discarded" in r.getMessage()
               for r in caplog.records if r.levelno == logging.INFO)


@pytest.mark.ray
def test_upsample_repeats_scarce_sources_far_apart(ray_local, tiny_tokenizer_dir, corpus,
                                                    tmp_path, caplog):
    from steelworks.data.shards import ShardIndex, open_shard
    from steelworks.data.tokenizer import load_tokenizer

    with caplog.at_level(logging.INFO, logger="steelworks.data"):
        m = _pack(corpus, tiny_tokenizer_dir, tmp_path / "up", "upsample")
    mix = m["mix"]
    _check_accounting(m)
    big, small = mix["sources"]["big"], mix["sources"]["small"]
    assert mix["policy"] == "upsample" and mix["limited_by"] == "big"
    assert big["epochs"] == 1.0 and big["repeated_tokens"] == 0
    assert small["capped"] and small["epochs"] == 4.0
    assert small["achieved_share"] < small["target_ratio"]  # said, not hidden
    assert any("'small'" in r.getMessage() and "max_epochs" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    # Every copy of a document in its own row, far from the others.
    tok = load_tokenizer(tiny_tokenizer_dir)
    out = tmp_path / "up"
    index = ShardIndex.load(out)
    rows = np.concatenate([np.asarray(open_shard(out, index, info)[0]) for info in index.shards])
    seen: dict[int, list[int]] = {}
    for r, row in enumerate(rows):
        marks = [int(x) for x in MARK.findall(tok.decode(row.tolist()))]
        assert max(Counter(marks).values(), default=1) == 1, (r, marks)
        for x in marks:
            seen.setdefault(x, []).append(r)
    small_ids = range(300, 310)
    assert sum(len(seen.get(i, [])) for i in small_ids) >= 30  # most of the 40 copies found
    for rs in seen.values():
        assert all(d >= len(rows) // 16 for d in np.diff(rs)), rs


@pytest.mark.ray
def test_shards_do_not_depend_on_the_cluster_size(ray_local, tiny_tokenizer_dir, tmp_path, monkeypatch):
    """Each block packs its own rows, so the block count decides which documents share a row.
    It was twice the cluster's CPUs: the same data packed on a 2-node cluster gave other shards
    (and another model) than on one node. Packing must see only the data."""
    import hashlib

    import ray

    from steelworks.data.pack import PACK_DOCS_PER_BATCH, pack_pretrain
    from steelworks.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    # More documents than one task packs (PACK_DOCS_PER_BATCH): a corpus that fits one batch
    # packs the same whatever the blocks.
    n = 3 * PACK_DOCS_PER_BATCH
    many = tmp_path / "clean-0.parquet"
    pd.DataFrame({"source": "big", "path": "/corpus/big.jsonl", "line": range(n),
                  "text": [f"qz{i}qz " + " ".join([FILLER] * (1 + i % 3)) for i in range(n)]}
                 ).to_parquet(many)
    real = ray.cluster_resources
    digests = []
    for cpus in (4, 64):  # this session's local cluster, and a cluster 16 times its size
        monkeypatch.setattr(ray, "cluster_resources", lambda c=cpus: {**real(), "CPU": float(c)})
        out = tmp_path / f"cpus{cpus}"
        pack_pretrain([many], tiny_tokenizer_dir, out, seq_len=64, rows_per_shard=100_000,
                      vocab_size=len(tok), pad_id=tok.pad_token_id)
        files = sorted(p for p in out.rglob("*") if p.is_file())
        assert files, sorted(out.rglob("*"))
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    assert digests[0] == digests[1]
