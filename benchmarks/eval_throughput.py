"""Evaluation throughput against lm-eval, two ways:

``--mode cli`` (the default): the commands users run, end to end.  ``steelworks eval`` and
lm-eval's CLI (``lm_eval --model hf --include_path TASKDIR --tasks ...``) each run as a fresh
process on the same model and the same questions, timed from process start to report
written (ours: report.json/.md/.png; lm-eval's: results and per-sample files).  The questions
are CMMLU's dev split (../shared) many times over with shuffled options: each copy of each
question gets a seeded permutation of A-D with the answer letter remapped, written as
CMMLU-layout CSVs (a ``test/`` split) into a temporary directory outside the project, so the
run scores ``--questions`` distinct prompts.  lm-eval runs the tasks ``lmeval_tasks.py``
writes for those CSVs (its template, the same prompts), and the run checks both sides
predict the same letter for every question.

    .venv/bin/python benchmarks/eval_throughput.py                      # >= 5,000 questions
    .venv/bin/python benchmarks/eval_throughput.py --questions 11000 --repeats 3

Each command runs once first with a one-question limit (a warm-up: the OS file cache,
Python's bytecode, lm-eval's Arrow copy of the CSVs), then ``--repeats`` times; the figure
is the median.

``--mode in-process``: the older measurement.  Both scorers called as functions on one
already loaded model in this process (ours ``runner.evaluate``, lm-eval's ``HFLM`` through
``lmeval_tasks.lmeval_predictions``) on the 335 dev questions, plus ``batch.evaluate_on_ray``
with 1 and 2 replicas:

    .venv/bin/python benchmarks/eval_throughput.py --mode in-process --repeats 3

In both modes the model is randomly initialised (throughput does not depend on what the
weights say), with a byte-level BPE tokenizer trained on the demo corpus (see
``build_model`` for why not on ../shared's web text).  Prompts are 0-shot by default
(``--shots``), base-model prompts scored by letter log-likelihood, the same batch size on
both sides.
"""

from __future__ import annotations

import argparse
import csv
import glob
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "benchmarks" / ".work" / "eval_throughput"
SHARED = ROOT.parent / "shared"
CMMLU = SHARED / "benchmarks" / "cmmlu"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_model(size: str, vocab: int) -> Path:
    """A random ``size`` model (2,048 positions, so no CMMLU prompt is truncated) with a
    ``vocab``-token BPE trained on the demo corpus.

    Not on ../shared's web text: a tokenizer trained there learns "：A" as one token (its
    pre-tokenizer, like cl100k's and Qwen's, lets one punctuation mark lead a word), so the
    base-model prompt "...答案：" + "A" has no token boundary at the letter, and lm-eval's HF
    backend stops with ``assert len(continuation_enc) > 0``.  The demo corpus never puts a
    letter after "："."""
    out = WORK / f"model-{size}-{vocab}"
    if (out / "config.json").exists():
        return out
    from steelworks.data.config import DemoCorpusConfig
    from steelworks.data.demo_corpus import generate
    from steelworks.data.tokenizer import load_tokenizer, train_tokenizer
    from steelworks.train.config import ModelConfig
    from steelworks.train.models import build_hf_config
    from steelworks.train.models import build_model as build

    generate(DemoCorpusConfig(num_entities=12, pretrain_renderings=8), WORK / "corpus")
    with open(WORK / "corpus" / "pretrain.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    train_tokenizer(texts, vocab_size=vocab, out_dir=WORK / f"tokenizer-{vocab}")
    tok = load_tokenizer(WORK / f"tokenizer-{vocab}")
    model_cfg = ModelConfig(size=size, max_position_embeddings=2048)
    model = build(build_hf_config(model_cfg, len(tok), tok.pad_token_id, tok.eos_token_id), seed=0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def timed(fn, repeats: int) -> tuple[float, Any]:
    fn()  # warm-up: file caches, lazy imports, allocator
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


LETTERS = ("A", "B", "C", "D")


def build_shuffled_cmmlu(src: Path, out: Path, copies: int, seed: int) -> int:
    """``copies`` option-shuffled copies of every question of ``src``'s dev split, as a CMMLU
    layout ``out/test/{subject}.csv``; returns the number of questions written.

    The copies of a question get ``copies`` distinct permutations of A-D (drawn by
    ``random.Random(f"{seed}:{subject}:{row}")``; at most 24 exist), so no two prompts are the
    same: a scorer that reuses identical inputs gains nothing here that real data would not
    give it.  New option j is old option perm[j], and the answer letter moves with its text.
    Cells are copied as the csv module reads them (spaces included)."""
    if not 1 <= copies <= 24:
        raise ValueError(f"copies must be 1..24 (the permutations of four options), got {copies}")
    (out / "test").mkdir(parents=True, exist_ok=True)
    n = 0
    for path in sorted((src / "dev").glob("*.csv")):
        with open(path, encoding="utf-8-sig", newline="") as f:
            header, *rows = list(csv.reader(f))
        written = []
        for r, (_, question, *options, answer) in enumerate(rows):
            gold = LETTERS.index(answer.strip())
            perms = random.Random(f"{seed}:{path.stem}:{r}").sample(
                list(itertools.permutations(range(4))), copies)
            for perm in perms:
                written.append([str(len(written)), question, *(options[k] for k in perm),
                                LETTERS[perm.index(gold)]])
        with open(out / "test" / path.name, "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([header, *written])
        n += len(written)
    return n


def _run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Wall seconds of ``cmd`` as a fresh process; its output goes to ``log``."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed (exit {proc.returncode}); see {log}")
    return secs


def cli(args: argparse.Namespace) -> int:
    """``steelworks eval`` against ``lm_eval`` (both CLIs), process start to report written."""
    from steelworks.evals.lmeval_tasks import write_lmeval_tasks

    model_dir = build_model(args.size, args.vocab).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="steelworks-evalbench-"))
    try:
        copies = -(-args.questions // 335)  # ceil: the dev split has 67 x 5 questions
        bench = tmp / "cmmlu"
        n = build_shuffled_cmmlu(CMMLU, bench, copies, args.seed)
        tasks = write_lmeval_tasks(bench, tmp / "tasks", split="test", num_shots=args.shots,
                                   cache_dir=tmp / "hf-datasets")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        if args.threads:  # torch reads it at start-up: the same intra-op threads on both sides
            env["OMP_NUM_THREADS"] = str(args.threads)
        env.pop("RAY_ADDRESS", None)  # the default: no cluster attached

        def ours(limit: int | None, tag: str) -> list[str]:
            return [str(ROOT / ".venv" / "bin" / "steelworks"), "eval", "--model", str(model_dir),
                    "--set", f"eval.benchmark={bench}", "--set", "eval.split=test",
                    "--set", "eval.chat=false", "--set", "eval.scoring=letter",
                    "--set", f"eval.num_shots={args.shots}",
                    "--set", f"eval.batch_size={args.batch_size}",
                    "--set", f"eval.max_items={limit or 'null'}",
                    "--set", f"runs_dir={tmp / 'runs'}", "--set", f"run={tag}"]

        def theirs(limit: int | None, tag: str) -> list[str]:
            return [str(ROOT / ".venv" / "bin" / "lm_eval"), "--model", "hf",
                    "--model_args", f"pretrained={model_dir},dtype=float32,add_bos_token=False",
                    "--device", "cpu", "--batch_size", str(args.batch_size),
                    "--include_path", str(tmp / "tasks"), "--tasks", ",".join(tasks),
                    "--output_path", str(tmp / "lmeval" / tag), "--log_samples",
                    *(["--limit", str(limit)] if limit else [])]

        logs = tmp / "logs"
        logs.mkdir()
        _run(ours(1, "warm"), env, logs / "ours-warm.log")
        _run(theirs(1, "warm"), env, logs / "theirs-warm.log")
        ours_s, theirs_s = [], []
        for r in range(args.repeats):
            ours_s.append(_run(ours(None, f"r{r}"), env, logs / f"ours-{r}.log"))
            theirs_s.append(_run(theirs(None, f"r{r}"), env, logs / f"theirs-{r}.log"))
            print(f"repeat {r}: steelworks eval {ours_s[-1]:.1f} s, lm_eval {theirs_s[-1]:.1f} s",
                  flush=True)

        # Agreement, item by item, from what each side wrote in the last repeat.
        report = next((tmp / "runs" / f"r{args.repeats - 1}").glob("eval-*/report.json"))
        ours_pred = {(p["subject"], p["id"]): p["pred"]
                     for p in json.loads(report.read_text("utf-8"))["predictions"]}
        theirs_pred: dict[tuple[str, str], str] = {}
        for task in tasks:
            subject = task.removeprefix("steelworks_cmmlu_")
            (path,) = glob.glob(str(tmp / "lmeval" / f"r{args.repeats - 1}" / "**" /
                                    f"samples_{task}_*.jsonl"), recursive=True)
            for line in open(path, encoding="utf-8"):
                sample = json.loads(line)
                scores = [float(resp[0]) for resp in sample["filtered_resps"]]
                best = max(range(4), key=lambda j: scores[j])  # first on ties, as ours
                theirs_pred[(subject, str(sample["doc"]["Unnamed: 0"]))] = LETTERS[best]
        agree = sum(theirs_pred.get(k) == v for k, v in ours_pred.items())
        accuracy = json.loads(report.read_text("utf-8"))["summary"]["micro_acc"]

        import torch

        o, t = statistics.median(ours_s), statistics.median(theirs_s)
        print(f"\n## Evaluation, CLI to report: {n:,} CMMLU questions ({copies} option-shuffled "
              f"copies of the dev split), {args.shots}-shot, letter log-likelihood\n")
        print(f"- model: `{args.size}` (random weights), vocab {args.vocab}; batch size "
              f"{args.batch_size} on both sides; torch threads: "
              f"{args.threads or 'each default'}; median of {args.repeats} after a "
              "1-question warm-up of each command")
        print(f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; load average "
              f"{os.getloadavg()[0]:.2f} at the end")
        print(f"- per-item agreement with lm-eval: {agree}/{len(ours_pred)} "
              f"({len(theirs_pred)} lm-eval samples); our micro accuracy {accuracy:.4f}\n")
        print("| command | wall s (median) | runs | questions/s | ratio |")
        print("|---|---:|---|---:|---:|")
        print(f"| `steelworks eval` | {o:.1f} | {', '.join(f'{x:.1f}' for x in ours_s)} | "
              f"{n / o:.1f} | **{t / o:.2f}x** |")
        print(f"| `lm_eval --model hf` | {t:.1f} | {', '.join(f'{x:.1f}' for x in theirs_s)} | "
              f"{n / t:.1f} | 1.00x |")
        if args.keep:
            print(f"\nkept {tmp} (logs/, runs/, lmeval/)")
        return 0 if agree == len(ours_pred) == n else 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def in_process(args: argparse.Namespace) -> int:
    import torch

    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.evals.config import EvalConfig
    from steelworks.evals.lmeval_tasks import lmeval_predictions
    from steelworks.evals.runner import evaluate
    from steelworks.train.models import count_params, load_model

    model_dir = build_model(args.size, args.vocab)
    model, tok = load_model(model_dir).eval(), load_tokenizer(model_dir)
    cfg = EvalConfig(benchmark=str(CMMLU), split="dev", chat=False, scoring="letter",
                     batch_size=args.batch_size, num_shots=args.shots)

    ours_s, (_, ours) = timed(lambda: evaluate(model, tok, CMMLU, cfg), args.repeats)
    theirs_s, theirs = timed(lambda: lmeval_predictions(model, tok, CMMLU, split="dev",
                                                        num_shots=args.shots,
                                                        batch_size=args.batch_size), args.repeats)
    n = len(ours)
    agree = sum(theirs[(r["subject"], r["id"])]["pred"] == r["pred"] for r in ours)
    rows = [
        ("steelworks (in-process)", n / ours_s, ours_s),
        ("lm-eval 0.4.13 HFLM", n / theirs_s, theirs_s),
    ]
    ray_rows = []
    if not args.no_ray:
        import dataclasses

        from steelworks.evals.batch import evaluate_on_ray
        from steelworks.platform.connect import connect

        os.environ.pop("RAY_ADDRESS", None)
        connect(None, num_cpus=4)
        for replicas in (1, 2):
            rcfg = dataclasses.replace(cfg, replicas=replicas, cpus_per_replica=1.0)
            secs, (_, preds) = timed(lambda rcfg=rcfg: evaluate_on_ray(model_dir, CMMLU, rcfg),
                                     args.repeats)
            same = [p["pred"] for p in preds] == [r["pred"] for r in ours]
            ray_rows.append((replicas, n / secs, secs, same))

    print(f"\n## Evaluation throughput: CMMLU dev ({n} questions, {args.shots}-shot, "
          "letter log-likelihood)\n")
    print(f"- model: `{args.size}`, {count_params(model) / 1e6:.1f} M parameters, vocab {len(tok)}; "
          f"batch size {args.batch_size}; median of {args.repeats} after a warm-up")
    print(f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads in-process; "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"- per-item agreement with lm-eval: {agree}/{n}\n")
    print("| backend | questions/s | seconds | ratio to lm-eval |")
    print("|---|---|---|---|")
    for name, qps, secs in rows:
        print(f"| {name} | {qps:.1f} | {secs:.2f} | {qps / rows[1][1]:.2f}x |")
    for replicas, qps, secs, same in ray_rows:
        print(f"| steelworks Ray Data, {replicas} replica(s) x 1 CPU | {qps:.1f} | {secs:.2f} | "
              f"{qps / rows[1][1]:.2f}x{'' if same else ' (predictions differ!)'} |")
    if len(ray_rows) == 2:
        print(f"\nRay Data runner speedup 1 -> 2 replicas: {ray_rows[1][1] / ray_rows[0][1]:.2f}x")
    return 0 if agree == n else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["cli", "in-process"], default="cli")
    ap.add_argument("--size", default="demo", help="model size from steelworks.train.models.SIZES")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per side (default: 1 in cli mode, 3 in-process)")
    ap.add_argument("--shots", type=int, default=0, help="k-shot (at most 4 on the dev split)")
    ap.add_argument("--questions", type=int, default=5360,
                    help="cli mode: at least this many questions, rounded up to whole copies "
                         "of the 335-question dev split (at most 24 copies: 8,040)")
    ap.add_argument("--seed", type=int, default=0, help="cli mode: the option shuffles' seed")
    ap.add_argument("--threads", type=int, default=None,
                    help="cli mode: OMP_NUM_THREADS for both commands (default: each one's "
                         "own, all cores); 1 keeps a machine shared with other work comparable")
    ap.add_argument("--keep", action="store_true", help="cli mode: keep the temporary directory")
    ap.add_argument("--no-ray", action="store_true", help="in-process mode: skip the Ray rows")
    args = ap.parse_args()
    if not (CMMLU / "dev").is_dir():
        sys.exit(f"needs the CMMLU dev split at {CMMLU}/dev (../shared)")
    if args.repeats is None:
        args.repeats = 1 if args.mode == "cli" else 3
    return cli(args) if args.mode == "cli" else in_process(args)


if __name__ == "__main__":
    sys.exit(main())
