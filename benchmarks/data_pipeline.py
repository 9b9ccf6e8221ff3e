"""Data-pipeline throughput: steelworks (Ray Data) vs datatrove, same input, same machine.

The workload is the Steel text recipe: normalize + quality filters + exact dedup + tokenize
+ pack, on the ../shared/corpora text samples (SkyPile, WanJuan, Chinese Wikipedia)
repeated to ~100 MB. Every copy of a document gets a distinct first line, except one in
ten which is repeated verbatim, so exact dedup has real duplicates to find and the rest of
the pipeline sees ~100 MB of distinct text.

Both sides use the same BPE tokenizer (trained once here, untimed) and the same normalizer
functions (datatrove has no NFKC / traditional->simplified formatter, so it calls ours).
Filters: steelworks runs recipes/steel_text.yaml; datatrove runs its native Gopher
repetition and quality filters configured for Chinese (language "cmn_Hani", word thresholds
relaxed for 1-3 character words), its 3-stage exact dedup, and its DocumentTokenizer.
Timings exclude starting Ray (reported separately). Each configuration runs in a fresh
subprocess.

    .venv/bin/python benchmarks/data_pipeline.py --mb 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "corpora"
TEXT_SAMPLES = [("skypile_zh_sample.jsonl", "text", "jsonl"), ("wanjuan_nlp_zh_sample.jsonl", "content", "jsonl"),
                ("wikipedia_cn_sample.json", "completion", "json")]


def make_input(work: Path, mb: float, files: int) -> dict:
    """Repeat the samples to ``mb`` megabytes of JSON lines ``{"text"}`` in ``files`` files."""
    docs = []
    for name, field, kind in TEXT_SAMPLES:
        path = SHARED / name
        records = json.loads(path.read_text()) if kind == "json" else \
            [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        docs += [r[field] for r in records]
    out = work / "input"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    handles = [open(out / f"part-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(files)]
    target, written, n, copy = mb * 1e6, 0, 0, 0
    while written < target:
        for i, text in enumerate(docs):
            if copy and (i + copy) % 10:
                text = f"第{copy}份 样本{i}\n{text}"
            line = json.dumps({"text": text, "id": f"{copy}-{i}"}, ensure_ascii=False) + "\n"
            handles[n % files].write(line)
            written += len(line.encode())
            n += 1
            if written >= target:
                break
        copy += 1
    for h in handles:
        h.close()
    return {"docs": n, "bytes": written, "files": files}


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


def run_steelworks(work: Path, cpus: int, tok_dir: Path, recipe: str = "steel_text") -> dict:
    from steelworks.platform.config import load
    from steelworks.platform.pipeline import run_data, run_tokenizer
    from steelworks.platform.ray_cluster import connect
    from steelworks.platform.settings import PipelineConfig

    os.environ.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    connect(None, num_cpus=cpus)
    startup = time.perf_counter() - t0
    runs = work / f"runs-sw-{cpus}"
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


def run_datatrove(work: Path, workers: int, tok_dir: Path) -> dict:
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

    from steelworks.data.recipe import load_recipe

    recipe = load_recipe("steel_text")

    class Normalize(BaseFormatter):
        name = "steel normalizers"

        def format(self, text: str) -> str:
            return recipe.normalize(text)

    out = work / "datatrove"
    shutil.rmtree(out, ignore_errors=True)
    files = len(list((work / "input").glob("*.jsonl")))
    dedup = ExactDedupConfig(content_getter=_text)
    kw = {"tasks": files, "workers": workers, "start_method": "fork"}
    stage1 = LocalPipelineExecutor([
        JsonlReader(str(work / "input")),
        Normalize(),
        # Chinese-aware Gopher ("cmn_Hani": spaCy + jieba words; datatrove maps "zh" to a
        # blank multilingual tokenizer that does not split Chinese). Jieba words are 1-3 chars,
        # so the average-word-length and stop-word rules are relaxed.
        GopherRepetitionFilter(language="cmn_Hani", top_n_grams=(), dup_n_grams=((10, 0.5),)),
        GopherQualityFilter(language="cmn_Hani", min_doc_words=5, max_doc_words=100_000,
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


def _child(args) -> None:
    work, tok = Path(args.work), Path(args.work) / "tokenizer"
    if args.child == "datatrove":
        result = run_datatrove(work, args.cpus, tok)
    else:
        recipe = str(loose_recipe(work)) if args.child == "steelworks_loose" else "steel_text"
        result = run_steelworks(work, args.cpus, tok, recipe)
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(kind: str, work: Path, cpus: int, pin: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--cpus", str(cpus), "--work", str(work)]
    if pin:  # the run and every Ray process it starts get exactly `cpus` cores
        cmd = ["taskset", "-c", ",".join(str(c) for c in range(cpus)), *cmd]
    print(f"$ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=100.0, help="input size in MB")
    ap.add_argument("--files", type=int, default=8, help="input files (datatrove tasks)")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / ".work" / "data"))
    ap.add_argument("--child", choices=["steelworks", "steelworks_loose", "datatrove"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--no-datatrove", action="store_true",
                    help="only the steelworks runs (1 -> 2 CPU scaling on larger inputs)")
    ap.add_argument("--pin", action="store_true",
                    help="pin each steelworks run to as many cores as Ray CPUs (taskset), so the "
                         "1-CPU run cannot borrow the second core for Ray's own processes")
    ap.add_argument("--cpus", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    if not SHARED.exists():
        sys.exit(f"{SHARED} is absent: this benchmark needs the shared corpus samples")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    inp = make_input(work, args.mb, args.files)
    train_tokenizer(work)
    mb = inp["bytes"] / 1e6
    print(f"input: {inp['docs']} docs, {mb:.1f} MB in {inp['files']} files", flush=True)
    results = {} if args.no_datatrove else {"datatrove_2": _spawn("datatrove", work, 2)}
    results["steelworks_1"] = _spawn("steelworks", work, 1, args.pin)
    results["steelworks_2"] = _spawn("steelworks", work, 2, args.pin)
    if not args.no_datatrove:
        results["steelworks_2_loose"] = _spawn("steelworks_loose", work, 2)
    print(f"\nmachine: {platform.node()} {os.cpu_count()} cores; date {time.strftime('%Y-%m-%d')}")
    print(f"{'run':<16}{'seconds':>9}{'docs/s':>10}{'MB/s':>8}  notes")
    for name, r in results.items():
        notes = {k: v for k, v in r.items() if k != "seconds"}
        print(f"{name:<16}{r['seconds']:9.1f}{inp['docs'] / r['seconds']:10.0f}{mb / r['seconds']:8.2f}  {notes}")
    sw = results["steelworks_2"]["seconds"]
    if "datatrove_2" in results:
        dt = results["datatrove_2"]["seconds"]
        print(f"\nsteelworks / datatrove throughput at 2 workers: {dt / sw:.2f}x "
              f"(loose thresholds, ~all kept: {dt / results['steelworks_2_loose']['seconds']:.2f}x)")
    print(f"steelworks speedup 1 -> 2 Ray CPUs: {results['steelworks_1']['seconds'] / sw:.2f}x")
    (work / f"results-{int(args.mb)}mb{'-pinned' if args.pin else ''}.json").write_text(json.dumps({"input": inp, "results": results}, indent=1))


if __name__ == "__main__":
    main()
