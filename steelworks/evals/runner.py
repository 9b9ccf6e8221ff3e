"""Evaluate one local HF model directory on a C-Eval-layout benchmark, in this process.

The driver resolves ``EvalConfig.benchmark`` to a directory and calls this, or batch.py's
Ray Data runner, which fans the same ``predict_items`` out over model replicas.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steelworks.data.benchmarks import Item, Subject, load_benchmark
from steelworks.evals.config import EvalConfig
from steelworks.evals.report import aggregate, write_report
from steelworks.evals.scoring import predict

log = logging.getLogger(__name__)


def limit_items(items: dict[str, list[Item]], max_items: int | None) -> list[Item]:
    """All items in subject order, at most ``max_items`` per subject.

    Per subject (like lm-eval's ``--limit`` per task) rather than in total, so a quick run
    still covers every subject and category instead of only the first subject or two.
    """
    if max_items is not None and max_items < 1:
        raise ValueError(f"eval.max_items must be >= 1 or null, got {max_items}")
    return [it for subject_items in items.values() for it in subject_items[:max_items]]


def load_items(benchmark_dir: str | Path, cfg: EvalConfig
               ) -> tuple[list[Subject], list[Item], dict[str, list[Item]]]:
    """What ``cfg`` evaluates: (subjects, items of ``cfg.split`` in order, dev shots by subject)."""
    subjects, by_subject = load_benchmark(benchmark_dir, cfg.split)
    items = limit_items(by_subject, cfg.max_items)
    shots: dict[str, list[Item]] = {}
    if cfg.num_shots > 0:
        # C-Eval's few-shot examples are the dev split's items, in file order.
        _, shots = load_benchmark(benchmark_dir, "dev")
        missing = [s.name for s in subjects if s.name not in shots]
        if missing:
            raise FileNotFoundError(
                f"{benchmark_dir}: {cfg.num_shots}-shot evaluation needs a dev CSV for "
                f"every subject; missing: {', '.join(missing)}"
            )
    return subjects, items, shots


def predict_items(model: Any, tokenizer: Any, items: Sequence[Item], subjects: Sequence[Subject],
                  cfg: EvalConfig, shots: Mapping[str, Sequence[Item]] | None = None,
                  progress: bool = False) -> list[dict[str, Any]]:
    """One prediction record per item, by ``cfg.mode``: the in-process backend.

    Both the single-process path and every Ray replica (batch.py) call this, so a
    benchmark scores the same however it is spread."""
    if cfg.mode == "loglik":
        return predict(model, tokenizer, items, subjects, cfg, shots, progress=progress)
    # The engine (and transformers) only when generating.
    from steelworks.evals.generative import predict_generative
    from steelworks.inference.engine import Engine

    # max_queue covers every item: predict_generative never has more in flight than
    # max_batch_size, but the bound must never be what fails an evaluation.
    engine = Engine(model, tokenizer, max_batch_size=cfg.batch_size, max_queue=max(1, len(items)))
    try:
        return predict_generative(engine, items, subjects, cfg, shots,
                                  max_tokens=cfg.max_new_tokens, progress=progress)
    finally:
        engine.shutdown()


def summarize(predictions: Sequence[dict[str, Any]], subjects: Sequence[Subject], cfg: EvalConfig,
              benchmark_dir: str | Path, seconds: float) -> dict[str, Any]:
    """``aggregate``'s accuracies + ``meta``; generative runs also count unparseable replies."""
    summary = aggregate(predictions, subjects)
    if cfg.mode == "generative":
        from steelworks.evals.generative import unparseable_summary

        summary["unparseable"] = unparseable_summary(predictions)
    summary["meta"] = {"benchmark_dir": str(benchmark_dir), "config": dataclasses.asdict(cfg),
                       "items": len(predictions), "seconds": round(seconds, 3),
                       "items_per_s": round(len(predictions) / seconds, 3) if seconds > 0 else None}
    return summary


def evaluate(model: Any, tokenizer: Any, benchmark_dir: str | Path, cfg: EvalConfig,
             progress: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score a loaded model on ``benchmark_dir`` (split ``cfg.split``): (summary, predictions).

    Shared by the batch path (``evaluate_model_dir``) and the serving app's ``/v1/evals``."""
    started = time.time()
    subjects, items, shots = load_items(benchmark_dir, cfg)
    log.info("evaluating on %d items of %d subjects (%s, %d-shot, %s, chat=%s)", len(items),
             len(subjects), cfg.split, cfg.num_shots,
             cfg.scoring if cfg.mode == "loglik" else "generative", cfg.chat)
    predictions = predict_items(model, tokenizer, items, subjects, cfg, shots, progress=progress)
    return summarize(predictions, subjects, cfg, benchmark_dir, time.time() - started), predictions


def evaluate_model_dir(
    model_dir: str | Path,
    benchmark_dir: str | Path,
    cfg: EvalConfig,
    out_dir: str | Path,
    device: str = "cpu",
) -> dict[str, Any]:
    """Score ``model_dir`` on ``benchmark_dir`` (split ``cfg.split``) and write the report.

    Returns the summary: ``aggregate``'s accuracies plus ``meta`` (what was evaluated, how).
    """
    # Imported here so that loading benchmarks or aggregating never pulls in transformers.
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.models import load_model

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, device=device)
    summary, predictions = evaluate(model, tokenizer, benchmark_dir, cfg, progress=True)
    summary["meta"]["model_dir"] = str(model_dir)
    files = write_report(summary, predictions, out_dir)
    log.info("micro acc %s, macro acc %s; wrote %s",
             summary["micro_acc"], summary["macro_acc"], ", ".join(files))
    return summary
