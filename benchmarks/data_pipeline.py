"""Data-pipeline benchmark: steelworks (Ray Data) vs data-juicer and datatrove, same input,
same machine, one run; then per-document agreement with data-juicer, and streaming memory.

Input: the ../shared/corpora text samples (SkyPile, WanJuan, Chinese Wikipedia) repeated to
``--mb`` MB of JSON lines ``{"text", "id"}``. Every copy of a document gets a distinct first
line, except one in ten which is repeated verbatim, so exact dedup has real duplicates.

1. Speed. steelworks runs recipes/steel_text.yaml (run_data: read, normalize, filter, exact
   dedup, write; then run_tokenizer: tokenize + pack, timed apart). data-juicer 1.6.1 runs
   Steel-LLM's own data-juicer recipe (``DJ_PROCESS``, without the perplexity filter, which
   needs a KenLM model from the hub) with np 2, no tracer, greedy op fusion, in its own venv
   (``make bench-dj-env``). datatrove runs its Gopher filters twice: with jieba/spaCy Chinese
   words, and with steelworks' words (every CJK character one word, no segmenter), so the
   second ratio compares like with like. Both datatrove runs use our normalizer (datatrove
   has no NFKC / t2s formatter), its exact dedup and the same BPE tokenizer.
2. Agreement. data-juicer runs a second time (untimed) with every filter bound opened and no
   dedup, exporting each document's stats; they are joined with steelworks' per-document
   stats (runs/.../data/stats/doc_stats.parquet) on the input line.
3. What each keeps, and why data-juicer drops what steelworks keeps, with examples.
4. Memory: read + recipe (the streaming part of the data stage, no dedup shuffle) on one
   ``.jsonl.zst`` file of 200 MB and of 2 GB (uncompressed), under Ray with 2 CPUs; the RSS
   of every ``ray::`` worker is sampled every 0.2 s.

Every run is a fresh subprocess; Ray start-up is excluded and reported apart.

    make bench-dj-env && .venv/bin/python benchmarks/data_pipeline.py --mb 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "corpora"
TEXT_SAMPLES = [("skypile_zh_sample.jsonl", "text", "jsonl"), ("wanjuan_nlp_zh_sample.jsonl", "content", "jsonl"),
                ("wikipedia_cn_sample.json", "completion", "json")]
DJ_VENV = ROOT / "benchmarks" / ".work" / "venv-dj"


def load_samples() -> tuple[list[str], list[tuple[str, int]]]:
    """Every sample document's text, and (sample name, document count) in that order."""
    docs, counts = [], []
    for name, field, kind in TEXT_SAMPLES:
        path = SHARED / name
        records = json.loads(path.read_text()) if kind == "json" else \
            [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        docs += [r[field] for r in records]
        counts.append((name.split("_")[0], len(records)))
    return docs, counts


def _lines(docs: list[str]):
    """JSON lines without end: copy 0 is the samples; a later copy of a document gets a
    distinct first line, except one in ten, which repeats verbatim."""
    # json.dumps({"text", "id"}, ensure_ascii=False), with each text escaped once (2 GB of
    # memory-test input is ~750k lines)
    escaped = [json.dumps(text, ensure_ascii=False) for text in docs]
    copy = 0
    while True:
        for i, esc in enumerate(escaped):
            if copy and (i + copy) % 10:
                esc = f'"第{copy}份 样本{i}\\n{esc[1:]}'
            yield f'{{"text": {esc}, "id": "{copy}-{i}"}}\n'.encode()
        copy += 1


def make_input(work: Path, mb: float, files: int) -> dict:
    """``mb`` megabytes of JSON lines ``{"text", "id"}`` in ``files`` files."""
    docs, counts = load_samples()
    out = work / "input"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    handles = [open(out / f"part-{i:03d}.jsonl", "wb") for i in range(files)]
    written, n = 0, 0
    for line in _lines(docs):
        handles[n % files].write(line)
        written += len(line)
        n += 1
        if written >= mb * 1e6:
            break
    for h in handles:
        h.close()
    return {"docs": n, "bytes": written, "files": files, "samples": counts}


def make_zst(path: Path, mb: float) -> dict:
    """One ``.jsonl.zst`` of ``mb`` MB uncompressed, streamed through a multi-threaded zstd
    compressor; kept and reused while its size is the same."""
    import zstandard

    meta = path.with_suffix(".json")
    if path.exists() and meta.exists() and json.loads(meta.read_text())["mb"] == mb:
        return json.loads(meta.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    docs, _ = load_samples()
    written, n, tmp = 0, 0, path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f, zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(f) as w:
        for line in _lines(docs):
            w.write(line)
            written += len(line)
            n += 1
            if written >= mb * 1e6:
                break
    tmp.rename(path)
    info = {"mb": mb, "docs": n, "bytes": written, "zst_bytes": path.stat().st_size}
    meta.write_text(json.dumps(info))
    return info


def train_tokenizer(work: Path) -> Path:
    from steelworks.data.tokenizer import train_tokenizer as train

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        texts = [json.loads(line)["text"] for line in (work / "input" / "part-000.jsonl").open()][:5000]
        train(texts, vocab_size=16000, out_dir=tok_dir, min_frequency=2)
    return tok_dir


# --- steelworks ---------------------------------------------------------------------------

def loose_recipe(work: Path) -> Path:
    """steel_text with every threshold opened up: the same operators and statistics (the
    same work per document), but nearly every document kept, like datatrove's Gopher
    filters here, so both sides tokenize about the same amount of text."""
    import yaml

    from steelworks.data.recipe import load_recipe

    recipe = load_recipe("steel_text").to_dict()
    process = [{n["op"]: n["params"]} for n in recipe["normalizers"]]
    # Bounds no document reaches: every stat is computed, every document passes.
    process += [{f["op"]: {**f["params"], "min": -1e18, "max": 1e18}} for f in recipe["filters"]]
    path = work / "steel_text_loose.yaml"
    path.write_text(yaml.safe_dump({"name": "steel_text_loose", "process": process}))
    return path


def sw_runs_dir(work: Path, cpus: int, recipe: str = "steel_text") -> Path:
    return work / f"runs-sw-{cpus}-{Path(recipe).stem}"


def run_steelworks(work: Path, cpus: int, tok_dir: Path, recipe: str = "steel_text") -> dict:
    from steelworks.core.config import load
    from steelworks.platform.connect import connect
    from steelworks.platform.pipeline import run_data, run_tokenizer
    from steelworks.platform.settings import PipelineConfig

    os.environ.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    connect(None, num_cpus=cpus)
    startup = time.perf_counter() - t0
    runs = sw_runs_dir(work, cpus, recipe)
    shutil.rmtree(runs, ignore_errors=True)
    cfg = load(PipelineConfig, None, [
        f"runs_dir={runs}", "run=bench", "data.source=files", f"data.recipe={recipe}",
        f"data.sources=[{{name: bench, path: {work / 'input'}, format: jsonl}}]",
        "data.dedup.exact=true", "data.dedup.minhash.enabled=false", f"data.num_shards={cpus}",
        f"tokenizer.pretrained_dir={tok_dir}", "pack.seq_len=2048"])
    t0 = time.perf_counter()
    data = run_data(cfg, force=True)
    t1 = time.perf_counter()
    tok = run_tokenizer(cfg, force=True)
    t2 = time.perf_counter()
    totals = data["metrics"]["totals"]
    return {"startup_s": startup, "seconds": t2 - t0, "clean_s": t1 - t0, "pack_s": t2 - t1,
            "kept": totals.get("kept", 0), "read": totals["read"],
            "duplicates": totals.get("duplicate", 0), "tokens": tok["metrics"]["pretrain"]["tokens"]}


# --- datatrove ----------------------------------------------------------------------------

def _text(doc) -> bytes:  # exact-dedup content getter; datatrove reads its return annotation
    return doc.text.encode("utf-8")  # bytes: xxhash 4 no longer hashes str


_text.__annotations__["return"] = bytes  # a real type, not the string `from __future__` leaves


def run_datatrove(work: Path, workers: int, tok_dir: Path, segment: bool = True) -> dict:
    """``segment``: Gopher filters on jieba/spaCy words (``cmn_Hani``); else on steelworks'
    words (``filters.words_of``: a CJK character is a word), passed to datatrove as its own
    WordTokenizer, so its Gopher statistics need no segmenter, as ours."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters.base import BaseFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    from steelworks.data.filters import words_of
    from steelworks.data.recipe import load_recipe

    recipe = load_recipe("steel_text")

    class Normalize(BaseFormatter):
        name = "steel normalizers"

        def format(self, text: str) -> str:
            return recipe.normalize(text)

    class CharWords(WordTokenizer):  # only word_tokenize is used by the Gopher filters
        def word_tokenize(self, text: str) -> list[str]:
            return words_of(text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    # Chinese-aware Gopher ("cmn_Hani": spaCy + jieba words; datatrove maps "zh" to a blank
    # multilingual tokenizer that does not split Chinese). Jieba words are 1-3 chars, so the
    # average-word-length and stop-word rules are relaxed; character words keep them.
    language = "cmn_Hani" if segment else CharWords()
    out = work / ("datatrove" if segment else "datatrove-noseg")
    shutil.rmtree(out, ignore_errors=True)
    files = len(list((work / "input").glob("*.jsonl")))
    dedup = ExactDedupConfig(content_getter=_text)
    kw = {"tasks": files, "workers": workers, "start_method": "fork"}
    stage1 = LocalPipelineExecutor([
        JsonlReader(str(work / "input")),
        Normalize(),
        GopherRepetitionFilter(language=language, top_n_grams=(), dup_n_grams=((10, 0.5),)),
        GopherQualityFilter(language=language, min_doc_words=5, max_doc_words=100_000,
                            min_avg_word_length=1, max_avg_word_length=10,
                            max_non_alpha_words_ratio=None, min_stop_words=None),
        # The writer passes documents on; the signature step consumes them (last).
        JsonlWriter(str(out / "filtered"), output_filename="${rank}.jsonl.gz"),
        ExactDedupSignature(str(out / "sigs"), dedup),
    ], logging_dir=str(out / "logs1"), **kw)
    stage2 = LocalPipelineExecutor([ExactFindDedups(str(out / "sigs"), str(out / "dups"), dedup)],
                                   tasks=1, workers=1, logging_dir=str(out / "logs2"),
                                   start_method="fork", depends=stage1)
    stage3 = LocalPipelineExecutor([
        JsonlReader(str(out / "filtered")),
        ExactDedupFilter(str(out / "dups"), dedup),
        DocumentTokenizer(str(out / "tokens"), tokenizer_name_or_path=str(tok_dir / "tokenizer.json"),
                          eos_token="<|endoftext|>"),
    ], logging_dir=str(out / "logs3"), depends=stage2, **kw)
    t0 = time.perf_counter()
    stage3.run()
    seconds = time.perf_counter() - t0
    # <file>.metadata: "tokenizer|token size", token count, human-readable count
    tokens = sum(int(p.read_text().splitlines()[1]) for p in (out / "tokens").rglob("*.metadata"))
    kept = sum(1 for f in (out / "filtered").glob("*.jsonl.gz") for _ in __import__("gzip").open(f))
    return {"seconds": seconds, "kept_after_filters": kept, "token_files": len(list((out / "tokens").rglob("*.ds"))),
            "tokens": tokens}


# --- data-juicer --------------------------------------------------------------------------

# Steel-LLM's data-juicer recipe, data/pretrain_data_prepare/step2/steel_project_txt.yaml at
# github.com/zhanshijinwat/Steel-LLM commit 5736c178eec6752fa72d3256f42d5c2498dcf910 (the one
# run_step2.sh runs), its `process` list verbatim except perplexity_filter (lang zh, max_ppl
# 1500: it needs a KenLM model from the hub). Its global settings are in dj_config.
DJ_RECIPE = "zhanshijinwat/Steel-LLM@5736c17:data/pretrain_data_prepare/step2/steel_project_txt.yaml"
DJ_PROCESS = """
- chinese_convert_mapper: {mode: t2s}
- clean_email_mapper:
- clean_html_mapper:
- clean_ip_mapper:
- clean_links_mapper:
- clean_copyright_mapper:
- expand_macro_mapper:
- fix_unicode_mapper:
- punctuation_normalization_mapper:
- remove_repeat_sentences_mapper: {lowercase: false, ignore_special_character: true, min_repeat_sentence_length: 2}
- remove_specific_chars_mapper: {chars_to_remove: '◆●■►▼▲▴∆▻▷❖♡□'}
- whitespace_normalization_mapper:
- alphanumeric_filter: {tokenization: false, min_ratio: 0.0, max_ratio: 0.9}
- average_line_length_filter: {min_len: 10, max_len: 150}
- character_repetition_filter: {min_ratio: 0.0, max_ratio: 0.4}
- maximum_line_length_filter: {max_len: 1000}
# - perplexity_filter: {lang: zh, max_ppl: 1500}
- special_characters_filter: {min_ratio: 0.0, max_ratio: 0.25}
- text_length_filter: {min_len: 10, max_len: 100000}
- words_num_filter: {lang: zh, tokenization: false, min_num: 10, max_num: 10000}
- word_repetition_filter: {lang: zh, tokenization: false, min_ratio: 0.0, max_ratio: 0.5}
- document_simhash_deduplicator: {tokenization: space, window_size: 6, num_blocks: 6, hamming_distance: 4, lowercase: true, ignore_pattern: null}
"""
# filter op -> (its key in __dj__stats__, min param, max param, data-juicer's default min, max)
# (data_juicer/ops/filter/*.py in 1.6.1; None: unbounded, sys.maxsize there)
DJ_FILTERS = {
    "alphanumeric_filter": ("alnum_ratio", "min_ratio", "max_ratio", 0.25, None),
    "average_line_length_filter": ("avg_line_length", "min_len", "max_len", 10, None),
    "character_repetition_filter": ("char_rep_ratio", "min_ratio", "max_ratio", 0.0, 0.5),
    "maximum_line_length_filter": ("max_line_length", "min_len", "max_len", 10, None),
    "special_characters_filter": ("special_char_ratio", "min_ratio", "max_ratio", 0.0, 0.25),
    "text_length_filter": ("text_len", "min_len", "max_len", 10, None),
    "words_num_filter": ("num_words", "min_num", "max_num", 10, None),
    "word_repetition_filter": ("word_rep_ratio", "min_ratio", "max_ratio", 0.0, 0.5),
}


def dj_process(open_bounds: bool = False) -> list[dict]:
    """The recipe's ops; ``open_bounds``: every filter keeps everything (its stats are still
    computed) and no dedup, for the per-document stats of every document."""
    import yaml

    ops = [{op: params or {}} for item in yaml.safe_load(DJ_PROCESS) for op, params in item.items()]
    if open_bounds:
        ops = [{op: {**p, **({DJ_FILTERS[op][1]: 0, DJ_FILTERS[op][2]: sys.maxsize}
                             if op in DJ_FILTERS else {})}}
               for o in ops for op, p in o.items() if "deduplicator" not in op]
    return ops


def dj_bounds() -> dict[str, tuple[str, float, float]]:
    """filter op -> (stat key, min, max) as the recipe sets them (defaults filled in)."""
    out = {}
    for o in dj_process():
        for op, p in o.items():
            if op in DJ_FILTERS:
                key, lo, hi, dlo, dhi = DJ_FILTERS[op]
                out[op] = (key, p.get(lo, dlo), p.get(hi, dhi) if p.get(hi, dhi) is not None else float("inf"))
    return out


def run_dj(work: Path, venv: Path, np_: int, stats_pass: bool = False) -> dict:
    """dj-process on work/input. Settings: Steel-LLM's (one export file, no cache), with the
    lean ones of the comparison: np, no tracer, greedy op fusion."""
    import yaml

    exe = venv / "bin" / "dj-process"
    if not exe.exists():
        raise SystemExit(f"{exe} is missing: run `make bench-dj-env` (or pass --skip-dj)")
    out = work / "dj" / ("stats" if stats_pass else "run")
    shutil.rmtree(out, ignore_errors=True)
    (out / "tmp").mkdir(parents=True)
    cfg = {"project_name": "steel-bench", "dataset_path": str(work / "input"),
           "export_path": str(out / "processed.jsonl"), "export_shard_size": 0,
           "export_in_parallel": False, "np": np_, "text_keys": "text", "suffixes": [],
           "use_cache": False, "ds_cache_dir": str(out / "hf-cache"), "temp_dir": str(out / "tmp"),
           "use_checkpoint": False, "open_tracer": False, "op_fusion": True,
           "fusion_strategy": "greedy", "work_dir": str(out / "work"),
           # stats pass: every document's stats exported; timed run: the simhash of each kept
           # document (what the dedup finding below checks), a column it would drop otherwise
           "keep_stats_in_res_ds": stats_pass, "keep_hashes_in_res_ds": not stats_pass,
           "process": dj_process(open_bounds=stats_pass)}
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    # data-juicer pip/uv-installs any module it misses at run time (utils/lazy_loader.py):
    # offline, such an install fails at once instead of pulling GBs (ray, CUDA torch, av).
    env = {**os.environ, "PIP_NO_INDEX": "1", "UV_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(exe), "--config", str(out / "config.yaml")]
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(out / "dj.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out).returncode
    wall = time.perf_counter() - t0
    text = (out / "dj.log").read_text(errors="replace")
    if rc:
        hint = "\n(it tried to install a module: run `make bench-dj-env`)" if "Installing " in text else ""
        raise RuntimeError(f"dj-process failed ({rc}); log {out / 'dj.log'}:\n{text[-4000:]}{hint}")
    m = re.search(r"Running executor took ([\d.]+) seconds", text)
    ops = [{"op": op, "seconds": float(s), "left": int(n)} for op, s, n in
           re.findall(r"OP \[(.+?)\] Done in ([\d.]+)s\. Left (\d+) samples", text)]
    with open(out / "processed.jsonl", "rb") as f:
        kept = sum(1 for _ in f)
    return {"seconds": float(m.group(1)) if m else wall, "wall_s": wall, "kept": kept, "ops": ops,
            "out": str(out / "processed.jsonl")}


# --- per-document agreement ---------------------------------------------------------------

# (our stat, data-juicer's, tolerance kind, tolerance, same definition?)
STAT_PAIRS = [
    ("text_length", "text_len", "rel", 0.01, True),
    ("alnum_ratio", "alnum_ratio", "abs", 0.01, True),
    ("avg_line_length", "avg_line_length", "rel", 0.01, True),
    ("max_line_length", "max_line_length", "rel", 0.01, True),
    ("special_char_ratio", "special_char_ratio", "abs", 0.01, True),
    ("char_rep_ratio", "char_rep_ratio", "abs", 0.01, True),
    # different words: ours every CJK character; dj's (tokenization false) whitespace chunks
    ("word_rep_ratio", "word_rep_ratio", "abs", 0.01, False),
]


def _space_tokens(text: str) -> int:
    """What document_simhash_deduplicator (tokenization: space, lowercase) shingles:
    ``split_on_whitespace`` splits on " " only, not newlines."""
    return sum(1 for t in text.lower().split(" ") if t)


def compare(work: Path, inp: dict, sw_run: Path, dj_run: dict, dj_stats: dict) -> dict:
    """Join steelworks' and data-juicer's per-document stats and decisions on the input id."""
    import numpy as np
    import pandas as pd

    from steelworks.data.filters import compute_stats
    from steelworks.data.recipe import load_recipe

    ids, raw = {}, {}
    for f in sorted((work / "input").glob("*.jsonl")):
        with open(f, "rb") as fh:
            for n, line in enumerate(fh, start=1):
                rec = json.loads(line)
                ids[(f.name, n)], raw[rec["id"]] = rec["id"], rec["text"]
    bounds = [0]
    for _, c in inp["samples"]:
        bounds.append(bounds[-1] + c)

    def sample(doc_id: str) -> str:
        i = int(doc_id.split("-")[1])
        return next(name for (name, _), hi in zip(inp["samples"], bounds[1:]) if i < hi)

    sw = pd.read_parquet(sw_run / "bench" / "data" / "stats" / "doc_stats.parquet")
    sw["id"] = [ids[(Path(p).name, int(n))] for p, n in zip(sw["path"], sw["line"])]
    sw = sw.set_index("id")
    sw_pass = sw["status"].isin(["kept", "duplicate"])  # passed every filter
    sw_kept = sw["status"] == "kept"

    rows = []
    with open(dj_stats["out"], encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            rows.append({"id": r["id"], "dj_text": r["text"], **r["__dj__stats__"]})
    dj = pd.DataFrame(rows).set_index("id")
    fails = pd.DataFrame({op: ~dj[key].between(lo, hi) for op, (key, lo, hi) in dj_bounds().items()})
    dj_pass = ~fails.any(axis=1)
    with open(dj_run["out"], encoding="utf-8") as fh:
        dj_out = [json.loads(line) for line in fh]
    dj_kept = dj.index.isin([r["id"] for r in dj_out])
    dj_kept = pd.Series(dj_kept, index=dj.index)
    common = sw.index.intersection(dj.index)

    # Stats: our pipeline vs theirs, and our definitions applied to their (mapped) text.
    specs = {f.stat: f.params for f in load_recipe("steel_text").filters}
    ours_on_dj = pd.DataFrame([compute_stats(t, specs) for t in dj.loc[common, "dj_text"]], index=common)
    stats = []
    for ours, theirs, kind, tol, same in STAT_PAIRS:
        b = dj.loc[common, theirs].astype(float)

        def agree(a, b=b, kind=kind, tol=tol):
            d = (a - b).abs()
            ok = d <= (tol * np.maximum(b.abs(), 1.0) if kind == "rel" else tol)
            return float(ok.mean()), float((d < 1e-9).mean()), float(d.median())

        share, exact, med = agree(sw.loc[common, f"stat_{ours}"].astype(float))
        d_share, d_exact, _ = agree(ours_on_dj[ours].astype(float))
        stats.append({"ours": ours, "dj": theirs, "tolerance": f"±{tol:g}{' relative' if kind == 'rel' else ''}",
                      "same_definition": same, "agree": share, "exact": exact, "median_abs_diff": med,
                      "agree_same_text": d_share, "exact_same_text": d_exact})

    def matrix(a: pd.Series, b: pd.Series) -> dict:
        a, b = a.loc[common].to_numpy(bool), b.loc[common].to_numpy(bool)
        return {"both_keep": int((a & b).sum()), "only_dj_keeps": int((b & ~a).sum()),
                "only_we_keep": int((a & ~b).sum()), "both_drop": int((~a & ~b).sum())}

    # Why data-juicer drops what we keep: every dj filter it fails, else its simhash dedup.
    only_we = [i for i in common if sw_kept[i] and not dj_kept[i]]
    reasons: dict[str, int] = {}
    why = {}
    for i in only_we:
        failed = [op for op in fails.columns if fails.at[i, op]]
        why[i] = failed or ["document_simhash_deduplicator"]
        for op in why[i]:
            reasons[op] = reasons.get(op, 0) + 1
    alone = {}
    for i in only_we:
        if len(why[i]) == 1:
            alone[why[i][0]] = alone.get(why[i][0], 0) + 1
    examples, seen = [], set()
    for i in sorted(only_we, key=lambda i: (i.split("-")[0] != "0", int(i.split("-")[1]))):
        key = tuple(why[i])
        if key in seen or len(examples) >= 5:
            continue
        seen.add(key)
        bnd = dj_bounds()
        examples.append({
            "id": i, "sample": sample(i), "chars": len(raw[i]), "start": raw[i][:80].replace("\n", "⏎"),
            "dj_drops_by": [f"{op}: {bnd[op][0]}={dj.at[i, bnd[op][0]]:.4g} not in [{bnd[op][1]:g}, {bnd[op][2]:g}]"
                            if op in bnd else f"{op} (space tokens: {_space_tokens(dj.at[i, 'dj_text'])})"
                            for op in why[i]],
            "ours": {c[5:]: round(float(sw.at[i, c]), 4) for c in sw.columns if c.startswith("stat_")}})

    # The two findings to verify: words_num_filter's words, the simhash of short-token docs.
    dj["lines"] = [sum(1 for ln in t.splitlines() if ln.strip()) for t in dj["dj_text"]]
    dj["space_tokens"] = [_space_tokens(t) for t in dj["dj_text"]]
    first = [i for i in dj.index if i.split("-")[0] == "0"]
    sky = [i for i in first if sample(i) == "skypile"]
    reach = dj.index[dj_pass]
    short = dj.loc[reach, "space_tokens"] < 6
    hashes = {r["id"]: r.get("__dj__simhash") for r in dj_out}
    findings = {
        "docs": len(dj), "num_words_lt_10": float((dj["num_words"] < 10).mean()),
        "fail_words_num": int(fails["words_num_filter"].sum()),
        "fail_only_words_num": int((fails["words_num_filter"] & (fails.sum(axis=1) == 1)).sum()),
        "median_num_words": float(dj["num_words"].median()),
        "median_nonempty_lines": float(dj["lines"].median()),
        "num_words_le_lines": float((dj["num_words"] <= dj["lines"]).mean()),
        "space_lt6_all": int((dj["space_tokens"] < 6).sum()),
        "space_lt6_skypile_copy0": int((dj.loc[sky, "space_tokens"] < 6).sum()), "skypile_copy0": len(sky),
        "space_lt6_skypile_raw": sum(_space_tokens(raw[i]) < 6 for i in sky),  # before the mappers
        "reach_dedup": int(len(reach)), "reach_dedup_lt6": int(short.sum()),
        "kept_lt6": int(dj_kept[reach[short.to_numpy()]].sum()),
        "kept_lt6_hashes": sorted({str(hashes.get(i)) for i in reach[short.to_numpy()] if dj_kept[i]}),
        "reach_dedup_ge6": int((~short).sum()), "kept_ge6": int(dj_kept[reach[~short.to_numpy()]].sum()),
    }
    return {
        "docs": {"input": inp["docs"], "steelworks_stats": len(sw), "dj_stats": len(dj), "joined": len(common)},
        "kept": {"steelworks_filters": int(sw_pass.sum()), "steelworks": int(sw_kept.sum()),
                 "dj_filters": int(dj_pass.sum()), "dj": int(dj_kept.sum()),
                 "dj_kept_but_fails_filter": int((dj_kept & ~dj_pass).sum())},
        "stats": stats, "matrix_filters": matrix(sw_pass, dj_pass), "matrix_final": matrix(sw_kept, dj_kept),
        "dj_fail_counts": {op: int(fails[op].sum()) for op in fails.columns},
        "sw_status_counts": {k: int(v) for k, v in sw["status"].value_counts().items()},
        "only_we_keep_reasons": reasons, "only_we_keep_single_reason": alone,
        "only_dj_keeps_our_status": {k: int(v) for k, v in
                                     sw.loc[[i for i in common if dj_kept[i] and not sw_kept[i]], "status"].value_counts().items()},
        "examples": examples, "findings": findings,
    }


# --- memory -------------------------------------------------------------------------------

def _sample_workers(stop: threading.Event, peaks: dict, interval: float = 0.2) -> None:
    """Every ``interval`` s, the RSS of every ``ray::`` process below this one (the workers
    of the private cluster this driver started; other Ray sessions on the machine are not
    descendants): pid -> peak rss, peak rss minus shared pages, title at the peak."""
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        for p in [me, *me.children(recursive=True)]:
            try:
                cmd = p.cmdline()
                title = (cmd[0] if cmd else p.name()).strip()
                if p is not me and not title.startswith("ray::"):
                    continue
                mi = p.memory_info()
            except psutil.Error:
                continue
            rec = peaks.setdefault("driver" if p is me else p.pid, {"rss": 0, "private": 0, "title": title})
            if mi.rss > rec["rss"]:
                rec.update(rss=mi.rss, title=title if p is not me else "driver")
            rec["private"] = max(rec["private"], mi.rss - mi.shared)
        stop.wait(interval)


def run_memory(work: Path, cpus: int, path: Path) -> dict:
    """read_source + apply_recipe (the data stage up to the dedup shuffle), consumed with
    iter_batches, under a fresh Ray with ``cpus`` CPUs, sampling every worker's RSS."""
    from steelworks.data.clean import data_context, read_and_filter
    from steelworks.data.config import SourceConfig
    from steelworks.data.recipe import load_recipe
    from steelworks.platform.connect import connect

    os.environ.pop("RAY_ADDRESS", None)
    connect(None, num_cpus=cpus)
    ctx = data_context()
    recipe = load_recipe("steel_text")
    counts = work / "memory" / "counts"
    shutil.rmtree(counts, ignore_errors=True)
    ds = read_and_filter(SourceConfig(name="mem", path=str(path)), recipe,
                         sorted(f.column for f in recipe.filters), 8 * cpus, counts_dir=counts)
    peaks: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_workers, args=(stop, peaks), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    rows = kept = blocks = max_rows = 0
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None):  # one per block
        rows += len(batch)
        kept += int((batch["status"] == "kept").sum())
        blocks, max_rows = blocks + 1, max(max_rows, len(batch))
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    driver = peaks.pop("driver", {})
    workers = sorted(({"pid": k, **v} for k, v in peaks.items()), key=lambda r: -r["rss"])
    return {"seconds": seconds, "rows": rows, "kept": kept, "blocks": blocks, "max_block_rows": max_rows,
            "target_max_block_size": ctx.target_max_block_size, "driver_rss": driver.get("rss", 0),
            "peak_worker_rss": workers[0]["rss"] if workers else 0,
            "peak_worker_private": max((w["private"] for w in workers), default=0), "workers": workers}


# --- runs and the report ------------------------------------------------------------------

def _child(args) -> None:
    work, tok = Path(args.work), Path(args.work) / "tokenizer"
    if args.child in ("datatrove", "datatrove_noseg"):
        result = run_datatrove(work, args.cpus, tok, segment=args.child == "datatrove")
    elif args.child == "memory":
        result = run_memory(work, args.cpus, Path(args.mem_file))
    else:
        recipe = str(loose_recipe(work)) if args.child == "steelworks_loose" else "steel_text"
        result = run_steelworks(work, args.cpus, tok, recipe)
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(kind: str, work: Path, cpus: int, pin: bool = False, extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--cpus", str(cpus), "--work", str(work), *extra]
    if pin:  # the run and every Ray process it starts get exactly `cpus` cores
        cmd = ["taskset", "-c", ",".join(str(c) for c in range(cpus)), *cmd]
    print(f"$ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def report_speed(inp: dict, results: dict) -> str:
    docs, mb = inp["docs"], inp["bytes"] / 1e6
    out = [f"### Throughput: {docs:,} docs, {mb:.1f} MB in {inp['files']} files", ""]
    rows = []

    def row(name: str, s: float, notes: str) -> None:
        rows.append([name, f"{s:.1f}", f"{docs / s:,.0f}", f"{mb / s:.2f}", notes])

    for name, r in results.items():
        if name.startswith("steelworks"):
            row(f"{name} clean (data stage)", r["clean_s"], f"kept {r['kept']:,}, dup {r['duplicates']:,}; Ray start {r['startup_s']:.1f} s")
            row(f"{name} pack", r["pack_s"], f"{r['tokens']:,} tokens")
            row(f"{name} total", r["seconds"], "")
        elif name.startswith("data_juicer"):
            row(name, r["seconds"], f"kept {r['kept']:,}; process wall {r['wall_s']:.1f} s (imports, config)")
        else:
            row(name, r["seconds"], f"kept after filters {r['kept_after_filters']:,}, {r['tokens']:,} tokens")
    out.append(_table(["run", "s", "docs/s", "MB/s", "notes"], rows))
    sw = results.get("steelworks_2")
    ratios = []
    if sw and "data_juicer_2" in results:
        ratios.append(["steelworks clean vs data-juicer (executor time)", f"{results['data_juicer_2']['seconds'] / sw['clean_s']:.2f}x"])
        ratios.append(["steelworks clean vs data-juicer (process wall)", f"{results['data_juicer_2']['wall_s'] / sw['clean_s']:.2f}x"])
    for dt, label in (("datatrove_2", "jieba words"), ("datatrove_2_noseg", "character words, no segmenter")):
        if sw and dt in results:
            ratios.append([f"steelworks total vs datatrove, {label}", f"{results[dt]['seconds'] / sw['seconds']:.2f}x"])
            if "steelworks_2_loose" in results:
                ratios.append([f"steelworks loose total vs datatrove, {label}",
                               f"{results[dt]['seconds'] / results['steelworks_2_loose']['seconds']:.2f}x"])
    if sw and "steelworks_1" in results:
        ratios.append(["steelworks 1 -> 2 Ray CPUs", f"{results['steelworks_1']['seconds'] / sw['seconds']:.2f}x"])
    if ratios:
        out += ["", _table(["ratio (throughput, higher: steelworks faster)", "x"], ratios)]
    if "data_juicer_2" in results:
        out += ["", "data-juicer per op (s, docs left): " + ", ".join(
            f"{o['op']} {o['seconds']:.1f} ({o['left']:,})" for o in results["data_juicer_2"]["ops"])]
    return "\n".join(out)


def report_agreement(c: dict) -> str:
    out = [f"### Per-document statistics ({c['docs']['joined']:,} documents joined on input line)", "",
           "agree: |ours - dj| within the tolerance, our normalizers + stats vs data-juicer's mappers + "
           "stats; same text: our stat functions on data-juicer's mapped text.", ""]
    out.append(_table(["stat (ours / dj)", "same definition", "tolerance", "agree", "exact", "median |diff|", "agree, same text", "exact, same text"],
                      [[f"{s['ours']} / {s['dj']}", "yes" if s["same_definition"] else "no (words)", s["tolerance"],
                        _pct(s["agree"]), _pct(s["exact"]), f"{s['median_abs_diff']:.4g}", _pct(s["agree_same_text"]),
                        _pct(s["exact_same_text"])] for s in c["stats"]]))
    k = c["kept"]
    out += ["", "### Keep / drop", "",
            _table(["", "both keep", "only dj keeps", "only we keep", "both drop"],
                   [[name, m["both_keep"], m["only_dj_keeps"], m["only_we_keep"], m["both_drop"]]
                    for name, m in (("filters only (before dedup)", c["matrix_filters"]),
                                    ("final (after each side's dedup)", c["matrix_final"]))]),
            "", f"kept: steelworks {k['steelworks']:,} ({k['steelworks_filters']:,} pass the filters, then exact dedup); "
            f"data-juicer {k['dj']:,} ({k['dj_filters']:,} pass the filters, then simhash dedup); "
            f"kept by dj but failing a dj bound in the stats pass (should be 0): {k['dj_kept_but_fails_filter']}",
            "", "documents each data-juicer filter rejects (all documents; a document can fail several): "
            + ", ".join(f"{op} {n:,}" for op, n in c["dj_fail_counts"].items()),
            "", "steelworks statuses: " + ", ".join(f"{s} {n:,}" for s, n in c["sw_status_counts"].items()),
            "", "dropped by data-juicer, kept by steelworks, by dj step (any / the only one): " + ", ".join(
                f"{op} {n:,} / {c['only_we_keep_single_reason'].get(op, 0):,}" for op, n in
                sorted(c["only_we_keep_reasons"].items(), key=lambda x: -x[1])),
            "", "kept by data-juicer, dropped by steelworks, by our status: " + ", ".join(
                f"{k} {n:,}" for k, n in c["only_dj_keeps_our_status"].items()),
            "", "Examples (data-juicer drops, steelworks keeps):", ""]
    for e in c["examples"]:
        out.append(f"- `{e['id']}` ({e['sample']}, {e['chars']:,} chars) \"{e['start']}...\": dj: "
                   f"{'; '.join(e['dj_drops_by'])}. ours: {e['ours']}")
    f = c["findings"]
    out += ["", "### data-juicer findings (measured)", "",
            f"- words_num_filter, tokenization false: words are whitespace/newline chunks. Median "
            f"{f['median_num_words']:.0f} words vs {f['median_nonempty_lines']:.0f} non-empty lines per document; "
            f"num_words <= lines for {_pct(f['num_words_le_lines'])}; num_words < 10 (min_num) for "
            f"{_pct(f['num_words_lt_10'])} of {f['docs']:,} documents; the filter rejects {f['fail_words_num']:,} "
            f"({f['fail_only_words_num']:,} fail no other filter).",
            f"- document_simhash_deduplicator, tokenization space, window 6: fewer than 6 space-separated "
            f"tokens (no shingle, simhash of nothing) for {f['space_lt6_all']:,} of {f['docs']:,} documents, "
            f"{f['space_lt6_skypile_copy0']:,} of the {f['skypile_copy0']:,} SkyPile sample documents "
            f"({f['space_lt6_skypile_raw']:,} on their raw text, before the mappers). Of the "
            f"{f['reach_dedup']:,} documents that pass dj's filters, {f['reach_dedup_lt6']:,} have < 6 tokens and "
            f"dj keeps {f['kept_lt6']:,} of them (simhash {', '.join(f['kept_lt6_hashes']) or '-'}); "
            f"it keeps {f['kept_ge6']:,} of the {f['reach_dedup_ge6']:,} with >= 6."]
    return "\n".join(out)


def report_memory(mem: dict) -> str:
    mib = 1 << 20
    rows = []
    for name, m in mem.items():
        r = m["result"]
        top = ", ".join(f"{w['rss'] / mib:.0f} ({w['title'][:40]})" for w in r["workers"][:3])
        rows.append([name, f"{m['input']['bytes'] / 1e6:,.0f}", f"{m['input']['zst_bytes'] / 1e6:,.0f}",
                     f"{r['rows']:,}", f"{r['blocks']} (≤ {r['max_block_rows']:,} rows)",
                     f"{r['seconds']:.1f}", f"{m['input']['bytes'] / 1e6 / r['seconds']:.2f}", len(r["workers"]),
                     f"{r['peak_worker_rss'] / mib:.0f}", f"{r['peak_worker_private'] / mib:.0f}",
                     f"{r['driver_rss'] / mib:.0f}", top])
    out = ["### Memory: read + recipe on one .jsonl.zst, Ray 2 CPUs, RSS sampled every 0.2 s", "",
           _table(["input", "MB", "zst MB", "docs", "output blocks", "s", "MB/s", "ray:: workers", "peak worker RSS MiB",
                   "peak RSS-shared MiB", "driver MiB", "top workers MiB (title)"], rows)]
    names = list(mem)
    if len(names) >= 2:
        a, b = mem[names[0]]["result"], mem[names[-1]]["result"]
        out += ["", f"peak worker RSS {names[-1]} / {names[0]}: **{b['peak_worker_rss'] / a['peak_worker_rss']:.2f}x** "
                f"(RSS minus shared: {b['peak_worker_private'] / max(a['peak_worker_private'], 1):.2f}x; target < 1.25x)"]
    out += ["", "One .zst file is one streaming read task; it and the recipe run fused in one "
            "worker, in batches of steelworks.data.clean.RECIPE_BATCH_ROWS documents."]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50.0, help="input size in MB (speed, agreement)")
    ap.add_argument("--files", type=int, default=8, help="input files (datatrove tasks)")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / ".work" / "data"))
    ap.add_argument("--child", choices=["steelworks", "steelworks_loose", "datatrove", "datatrove_noseg", "memory"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--mem-file", help=argparse.SUPPRESS)
    ap.add_argument("--no-datatrove", "--skip-datatrove", dest="no_datatrove", action="store_true",
                    help="no datatrove runs (and no loose steelworks run)")
    ap.add_argument("--skip-dj", action="store_true", help="no data-juicer runs, no agreement report")
    ap.add_argument("--skip-memory", action="store_true", help="no memory runs")
    ap.add_argument("--memory-only", action="store_true", help="only the memory runs")
    ap.add_argument("--memory-mb", default="200,2000",
                    help="uncompressed sizes (MB) of the .jsonl.zst memory inputs, comma-separated")
    ap.add_argument("--dj-venv", default=str(DJ_VENV), help="data-juicer's venv (make bench-dj-env)")
    ap.add_argument("--pin", action="store_true",
                    help="pin each steelworks run to as many cores as Ray CPUs (taskset), so the "
                         "1-CPU run cannot borrow the second core for Ray's own processes")
    ap.add_argument("--cpus", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    if not SHARED.exists():
        sys.exit(f"{SHARED} is absent: this benchmark needs the shared corpus samples")
    work = Path(args.work).resolve()  # data-juicer runs in its output directory
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    report, out = [], {"machine": f"{platform.node()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
                       "command": " ".join([Path(sys.executable).name, *sys.argv])}
    if not args.memory_only:
        inp = make_input(work, args.mb, args.files)
        train_tokenizer(work)
        print(f"input: {inp['docs']} docs, {inp['bytes'] / 1e6:.1f} MB in {inp['files']} files", flush=True)
        results: dict = {}
        if not args.no_datatrove:
            results["datatrove_2"] = _spawn("datatrove", work, 2)
            results["datatrove_2_noseg"] = _spawn("datatrove_noseg", work, 2)
        results["steelworks_1"] = _spawn("steelworks", work, 1, args.pin)
        results["steelworks_2"] = _spawn("steelworks", work, 2, args.pin)
        if not args.no_datatrove:
            results["steelworks_2_loose"] = _spawn("steelworks_loose", work, 2)
        if not args.skip_dj:
            results["data_juicer_2"] = run_dj(work, Path(args.dj_venv), 2)
            dj_stats = run_dj(work, Path(args.dj_venv), 2, stats_pass=True)  # untimed
            out["agreement"] = compare(work, inp, sw_runs_dir(work, 2), results["data_juicer_2"], dj_stats)
        out.update(input=inp, results=results)
        report.append(report_speed(inp, results))
        if "agreement" in out:
            report.append(report_agreement(out["agreement"]))
    if not args.skip_memory:
        mem = {}
        for mb in (float(x) for x in args.memory_mb.split(",")):
            path = work / "memory" / f"input-{mb:g}mb.jsonl.zst"
            info = make_zst(path, mb)
            mem[f"{mb:g} MB"] = {"input": info, "result": _spawn("memory", work, 2, extra=("--mem-file", str(path)))}
        out["memory"] = mem
        report.append(report_memory(mem))
    out["total_s"] = time.perf_counter() - t_start
    text = (f"## Data pipeline benchmark\n\nmachine: {out['machine']}; date {out['date']}; "
            f"`{out['command']}`; whole run {out['total_s'] / 60:.1f} min\n\n" + "\n\n".join(report))
    print("\n" + text)
    name = "memory" if args.memory_only else f"{args.mb:g}mb{'-pinned' if args.pin else ''}"
    (work / f"results-{name}.json").write_text(json.dumps(out, indent=1, ensure_ascii=False))
    (work / f"report-{name}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
