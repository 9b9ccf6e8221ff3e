"""Evaluation throughput: questions/s on the CMMLU dev split in log-likelihood mode, ours
against lm-eval's HF backend on the same model in the same run, plus the Ray Data runner
with 1 and 2 model replicas.

    .venv/bin/python benchmarks/eval_throughput.py                  # demo-size model, 4k vocab
    .venv/bin/python benchmarks/eval_throughput.py --size 100m --repeats 1

The model is randomly initialised (throughput does not depend on what the weights say),
with a byte-level BPE tokenizer trained on the demo corpus (see ``build_model`` for why not
on ../shared's web text). Both sides score the same 335 prompts
(0-shot, base-model prompt, letter continuations): ours through ``runner.evaluate``,
lm-eval through ``lmeval_tasks.lmeval_predictions`` (``simple_evaluate`` with ``HFLM``
wrapping the same in-memory model, the same batch size). Each side is timed end to end
from benchmark directory to per-item predictions, after one warm-up run; the figure is the
median of ``--repeats``. The run also checks that both sides predict the same letters.

The Ray rows time ``batch.evaluate_on_ray`` with ``eval.replicas`` = 1 and 2, one CPU (and
one torch thread) per replica, Ray already started; replica start-up (loading the model)
is inside the timing, as a user would wait for it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="demo", help="model size from steelworks.train.models.SIZES")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shots", type=int, default=0, help="k-shot (at most 4 on the dev split)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray replica rows")
    args = ap.parse_args()
    if not (CMMLU / "dev").is_dir():
        sys.exit(f"needs the CMMLU dev split at {CMMLU}/dev (../shared)")

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
        from steelworks.platform.ray_cluster import connect

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


if __name__ == "__main__":
    sys.exit(main())
