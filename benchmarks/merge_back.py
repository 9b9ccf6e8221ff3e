"""What merging a fine-tuned model back toward its base costs and saves (issue 17, point 4).

Fine-tuning erodes what the base model knew; merging the fine-tuned weights back toward the
base (``steelworks merge --method linear``) buys some of it back at some cost to what the
fine-tuning taught. On a finished run, for each weight ``w`` of the fine-tuned model
(``w=0``: the base, ``w=1``: the fine-tuned model), this script:

- merges ``(1-w)·base + w·tuned`` with ``steelworks.train.merge.merge_dirs``;
- scores it on the run's benchmark (the eval stage's config, ``evaluate_model_dir``): the
  cost side, and ``steelworks eval compare`` of each merge against the tuned model (written
  to ``<out>/compare-w<w>/``: per-subject deltas and flipped items);
- measures its per-token negative log-likelihood on a sample of the run's cleaned
  pretraining text (the data stage's ``clean/`` shards, tokenized as the tokenizer stage
  does): the saved side, the general language modelling that fine-tuning erodes.

    .venv/bin/python benchmarks/merge_back.py --config configs/demo.yaml   # after `steelworks demo`
    .venv/bin/python benchmarks/merge_back.py --config configs/demo.yaml --tuned dpo --weights 0 0.5 1

The demo's pretraining text is also its training text (the synthetic world has no held-out
documents), so the NLL measures how much of that modelling survives fine-tuning, not
generalisation.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing the package


def text_nll(model_dir: Path, texts: list[str], max_tokens: int) -> float:
    """Mean negative log-likelihood per predicted token of ``texts`` (each cut to ``max_tokens``)."""
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.hf_io import from_hf

    tok = load_tokenizer(model_dir)
    model = from_hf(model_dir).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([tok.encode(text, add_special_tokens=False)[:max_tokens]])
            if ids.size(1) < 2:
                continue
            logits = model(ids)[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.size(1) - 1
    return total / max(count, 1)


def pretraining_sample(data_dir: Path, n: int, seed: int) -> list[str]:
    import pyarrow.parquet as pq

    texts = [t for f in sorted((data_dir / "clean").glob("*.parquet"))
             for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    if not texts:
        raise SystemExit(f"{data_dir / 'clean'}: no cleaned pretraining text (run the data stage)")
    random.Random(seed).shuffle(texts)
    return texts[:n]


def plot(rows: list[dict[str, Any]], tuned: str, path: Path) -> None:
    """The trade-off at a glance: exam accuracy and pretraining-text NLL against the weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = [r["w"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(w, [100 * r["acc"] for r in rows], "o-", label="exam accuracy (%)")
    ax.set(xlabel=f"weight of the {tuned} model (0 = base)", ylabel="exam accuracy (%)",
           title=f"merging {tuned} back toward its base")
    nll = ax.twinx()
    nll.plot(w, [r["nll"] for r in rows], "s--", color="tab:orange", label="pretraining-text NLL/token")
    nll.set_ylabel("pretraining-text NLL/token (lower is better)")
    ax.legend(handles=ax.get_lines() + nll.get_lines(), loc="upper left")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml", help="the run's pipeline config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    p.add_argument("--base", default="pretrain", help="stage whose hf/ is the base (default pretrain)")
    p.add_argument("--tuned", default="sft", help="stage whose hf/ is the fine-tuned model (sft, dpo)")
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 0.75, 1.0],
                   help="weights of the fine-tuned model (0: the base, 1: the fine-tuned model)")
    p.add_argument("--docs", type=int, default=300, help="pretraining documents for the NLL")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per document for the NLL")
    p.add_argument("--out", default=None, help="output directory (default runs/<run>/merge-back)")
    args = p.parse_args(argv)

    from steelworks.core.config import load
    from steelworks.core.rundir import read_manifest
    from steelworks.evals.compare import compare, write_comparison
    from steelworks.evals.runner import evaluate_model_dir
    from steelworks.platform.settings import PipelineConfig
    from steelworks.train.merge import merge_dirs

    cfg = load(PipelineConfig, args.config, args.overrides)
    root = Path(cfg.runs_dir) / cfg.run
    base, tuned = root / args.base / "hf", root / args.tuned / "hf"
    out = Path(args.out) if args.out else root / "merge-back"
    bench = cfg.eval.benchmark
    if bench == "demo":
        bench = str(root / "data" / read_manifest(root / "data")["exam"])
    texts = pretraining_sample(root / "data", args.docs, seed=0)
    torch.set_num_threads(max(1, int(cfg.eval.cpus_per_replica)))
    rows: list[dict[str, Any]] = []
    tuned_eval = out / "eval-w1"
    for w in sorted(set(args.weights), reverse=True):  # w=1 first: the others compare to it
        model = tuned if w == 1 else base if w == 0 else merge_dirs(
            "linear", [base, tuned], out / f"model-w{w:g}", weights=[1 - w, w])
        eval_dir = tuned_eval if w == 1 else out / f"eval-w{w:g}"
        summary = evaluate_model_dir(model, bench, cfg.eval, eval_dir)
        row = {"w": w, "model": str(model), "acc": summary["micro_acc"], "n": summary["n"],
               "nll": text_nll(Path(model), texts, args.max_tokens)}
        if w != 1 and tuned_eval.exists():
            result = compare(tuned_eval, eval_dir)
            write_comparison(result, out / f"compare-w{w:g}")
            row["gained"], row["lost"] = result["total"]["gained"], result["total"]["lost"]
        rows.append(row)
        print(f"w={w:<5g} exam {100 * row['acc']:5.1f}% of {row['n']}  pretraining-text NLL/token "
              f"{row['nll']:.3f}", flush=True)
    rows.sort(key=lambda r: r["w"])
    (out / "merge_back.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, args.tuned, out / "merge_back.png")
    print(f"\n| weight of {args.tuned} | model | exam acc | vs {args.tuned}: gained / lost "
          "| pretraining-text NLL/token |\n|---:|---|---:|---|---:|")
    for r in rows:
        flips = f"{r['gained']} / {r['lost']}" if "gained" in r else "-"
        print(f"| {r['w']:g} | `{r['model']}` | {100 * r['acc']:.1f}% | {flips} | {r['nll']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
