"""MinHash-LSH near-duplicate detection: signatures, the pure-Python reference, the Ray job.

The corpus is synthetic and seeded: random CJK characters and random "words", so distinct
documents really are distinct (pairwise Jaccard ~0.03), plus planted near-duplicates.
"""

from __future__ import annotations

import functools
import os
import random
import string
import subprocess
import sys
import time

import numpy as np
import pytest

from steelworks.data.config import MinHashConfig
from steelworks.data.minhash import (
    _star_step,
    band_keys,
    find_near_duplicates,
    shingles,
    signature,
    signatures,
)

CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
SAMPLE = "北京是中国的首都。 The quick brown fox."
# Pinned once: a change here changes every dedup decision, so it must be deliberate.
SAMPLE_SIG = [29429114, 559464343, 34949353, 117223161, 606325488, 318181635]
SAMPLE_BANDS = [4824835385881249458, -8628816221343991144]


class Gen:
    """Seeded text generator: Chinese (no spaces) and English-like documents, edits."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vocab = ["".join(self.rng.choices(string.ascii_lowercase, k=self.rng.randint(2, 9)))
                      for _ in range(3000)]

    def zh(self, n: int) -> str:
        out: list[str] = []
        while sum(map(len, out)) < n:
            out.append("".join(self.rng.choices(CJK, k=self.rng.randint(8, 20)))
                       + self.rng.choice("，。。\n"))
        return "".join(out)

    def en(self, n: int) -> str:
        out: list[str] = []
        while sum(map(len, out)) < n:
            out.append(" ".join(self.rng.choices(self.vocab, k=self.rng.randint(5, 12)))
                       + self.rng.choice([". ", ".\n", ", "]))
        return "".join(out)

    def edit(self, text: str, rate: float) -> str:
        """Replace a share ``rate`` of the characters (same script as the text)."""
        chars = list(text)
        pool = CJK if text[0] in CJK else string.ascii_lowercase
        for i in self.rng.sample(range(len(chars)), max(1, int(rate * len(chars)))):
            chars[i] = self.rng.choice(pool)
        return "".join(chars)


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[list[str], list[int]]:
    """300 distinct docs, 60 planted near-duplicates (edits / appended sentence / whitespace)
    and a chain of 5 (each 2.5% edited from the previous one); family id per doc."""
    g = Gen(0)
    docs = [(g.zh if i % 2 else g.en)(g.rng.randint(300, 800)) for i in range(300)]
    family = list(range(300))
    for j in range(60):
        base = g.rng.randrange(300)
        text = docs[base]
        if j % 3 == 0:
            text = g.edit(text, g.rng.uniform(0.01, 0.03))
        elif j % 3 == 1:
            text += (g.zh if base % 2 else g.en)(40)
        else:
            text = "  " + text.replace(" ", "   ").replace("\n", " \n\t") + "\n"
        docs.append(text)
        family.append(base)
    chain = [g.zh(600)]
    for _ in range(4):
        chain.append(g.edit(chain[-1], 0.025))
    docs += chain
    family += [10_000] * len(chain)
    order = list(range(len(docs)))  # interleave, so a copy sometimes precedes its original
    g.rng.shuffle(order)
    return [docs[i] for i in order], [family[i] for i in order]


def jaccard(a: str, b: str, k: int = 5) -> float:
    x, y = set(shingles(a, k).tolist()), set(shingles(b, k).tolist())
    return len(x & y) / len(x | y)


def estimated(a: str, b: str, cfg: MinHashConfig) -> float:
    return float(np.mean(signature(a, cfg) == signature(b, cfg)))


def test_shingles() -> None:
    assert np.array_equal(shingles("a  b\n\tc ", 3), shingles("a b c", 3))  # whitespace collapsed
    assert len(shingles("短文", 5)) == 1 and len(shingles("", 5)) == 1  # shorter than k: one
    assert len(shingles("abcabc", 3)) == 3  # abc, bca, cab: a set
    assert shingles("中文字符串很长", 5).max() < 2**32


def test_signature_is_stable_across_processes() -> None:
    cfg = MinHashConfig()
    sig = signature(SAMPLE, cfg)
    assert sig.dtype == np.uint32 and sig.shape == (cfg.num_perm,)
    assert sig[:6].tolist() == SAMPLE_SIG and band_keys(sig, cfg)[:2] == SAMPLE_BANDS
    code = ("from steelworks.data.config import MinHashConfig as C\n"
            "from steelworks.data.minhash import signature as s\n"
            f"print(s({SAMPLE!r}, C()).tolist())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # hash() would differ; ours must not
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert out.strip() == str(sig.tolist())
    assert np.array_equal(signatures([SAMPLE, "x"], cfg)[0], sig)
    assert signatures([], cfg).shape == (0, cfg.num_perm) and find_near_duplicates([], cfg) == []


def test_estimated_jaccard_tracks_true_jaccard() -> None:
    cfg = MinHashConfig(num_perm=256)
    g = Gen(1)
    for make in (g.zh, g.en):
        base = make(600)
        for rate in (0.0, 0.01, 0.03, 0.06, 0.12):
            other = g.edit(base, rate) if rate else base + make(300)
            assert abs(estimated(base, other, cfg) - jaccard(base, other)) < 0.1


def quality(reps: list[int], family: list[int]) -> tuple[float, float]:
    """Recall: planted copies grouped with their family's first doc. Precision: flagged docs
    whose representative is of their own family."""
    first: dict[int, int] = {}
    for i, f in enumerate(family):
        first.setdefault(f, i)
    planted = [i for i, f in enumerate(family) if first[f] != i]
    recall = float(np.mean([reps[i] == reps[first[family[i]]] for i in planted]))
    flagged = [i for i, r in enumerate(reps) if r != i]
    precision = float(np.mean([family[reps[i]] == family[i] for i in flagged]))
    return recall, precision


def test_planted_near_duplicates_reference() -> None:
    docs, family = corpus()
    reps = find_near_duplicates(docs, MinHashConfig())
    recall, precision = quality(reps, family)
    assert recall >= 0.9 and precision >= 0.95, (recall, precision)
    assert all(reps[r] == r and r <= i for i, r in enumerate(reps))  # reps are component minima
    distinct = [i for i, f in enumerate(family) if family.index(f) == i]
    assert len({reps[i] for i in distinct}) == len(distinct)  # no two originals merged


def test_chain_is_one_component() -> None:
    """A~B and B~C but not A~C (B is a text, A and C drop 18% at either end): transitivity
    through components puts all three under A, the first."""
    cfg = MinHashConfig()
    text = Gen(2).zh(800)
    cut = int(0.18 * len(text))
    a, b, c = text[cut:], text, text[:-cut]
    assert estimated(a, b, cfg) >= cfg.threshold and estimated(b, c, cfg) >= cfg.threshold
    assert estimated(a, c, cfg) < cfg.threshold  # the premise: A and C are not similar
    keys = [set(band_keys(signature(t, cfg), cfg)) for t in (a, b, c)]
    assert keys[0] & keys[1] and keys[1] & keys[2]  # and LSH makes both pairs candidates
    assert find_near_duplicates([a, b, c], cfg) == [0, 0, 0]
    assert find_near_duplicates([c, b, a], cfg) == [0, 0, 0]


def test_star_step_converges_to_component_minimum() -> None:
    """Hash-to-Min rounds without Ray: a shuffled path of 64 nodes plus a separate pair."""
    rng = random.Random(3)
    names = [f"n{i:03d}" for i in range(64)]
    rng.shuffle(names)  # path order unrelated to key order
    pairs = list(zip(names, names[1:])) + [("x1", "x0")]
    src, dst = (np.array(p, dtype=object) for p in zip(*pairs))
    edges = {"node": np.r_[src, dst], "nbr": np.r_[dst, src]}
    rounds = 0
    while rounds < 20:
        table, rounds = _star_step(edges, shards=4), rounds + 1
        edges = {k: np.asarray(v) for k, v in table.to_pydict().items()}
        if edges["unstable"].sum() == 0:
            break
    assert rounds <= 12  # O(log diameter), not O(diameter) = 63 (it takes 10)
    own = edges["own"] == 1
    labels = dict(zip(edges["node"][own], edges["nbr"][own]))
    assert labels == {**{n: "n000" for n in names if n != "n000"}, "x1": "x0"}


@pytest.mark.ray
def test_minhash_dedup_on_ray_matches_reference(ray_local) -> None:
    from steelworks.data.minhash import minhash_dedup

    ray = ray_local
    docs, _ = corpus()
    cfg = MinHashConfig()
    reps = find_near_duplicates(docs, cfg)
    rows = [{"path": "corpus.jsonl", "line": i + 1, "status": "kept", "text": t,
             "source": "web", "meta": [i, -i]} for i, t in enumerate(docs)]
    # Not kept: never flagged, never a representative, even when the text is a copy.
    rows += [{"path": "a.jsonl", "line": n, "status": s, "text": docs[0], "source": "x",
              "meta": [n]} for n, s in enumerate(["duplicate", "filtered:too_short"], 1)]
    want = {(r["path"], r["line"]): (r["status"], "") for r in rows}
    for i, r in enumerate(reps):
        if r != i:
            want["corpus.jsonl", i + 1] = ("near_duplicate", f"corpus.jsonl:{r + 1}")
    by_key = {(r["path"], r["line"]): r for r in rows}

    timings = []
    # Shuffled rows over 3 partitions and 7 blocks: the result must not depend on order or
    # parallelism, so it is compared with the single-process reference (one configuration:
    # each Ray Data run costs ~20 s of this suite's 15-minute budget).
    for partitions, blocks, seed in [(3, 7, 5)]:
        shuffled = list(rows)
        if seed is not None:
            random.Random(seed).shuffle(shuffled)
        start = time.perf_counter()
        out = minhash_dedup(ray.data.from_items(shuffled, override_num_blocks=blocks), cfg,
                            partitions).take_all()
        timings.append(time.perf_counter() - start)
        assert len(out) == len(rows)
        got = {(r["path"], r["line"]): (r["status"], r["dup_of"]) for r in out}
        assert got == want
        for r in out:  # every other column passes through unchanged
            orig = by_key[r["path"], r["line"]]
            assert {k: (list(v) if k == "meta" else v) for k, v in r.items()
                    if k not in ("status", "dup_of")} == {k: v for k, v in orig.items()
                                                           if k != "status"}
    print(f"minhash_dedup on {len(rows)} rows: {', '.join(f'{t:.1f}s' for t in timings)}")

    # No near-duplicates at all: the short path still adds dup_of.
    alone = [rows[i] for i, r in enumerate(reps) if r == i][:5]  # minima of 5 components
    out = minhash_dedup(ray.data.from_items(alone), cfg, 1).take_all()
    assert [r["dup_of"] for r in out] == [""] * 5
