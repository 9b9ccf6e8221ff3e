"""Evaluation through a serving engine's public API, for ``/v1/evals``.

A serving replica must not run the model beside its engine: the built-in engine's scheduler
thread owns the weights (a second thread on them races the batch), and the vLLM engine has
no in-process model at all. So the served model is scored through the calls every engine
offers, and the results are ``scoring.predict``'s and ``generative.predict_generative``'s:

- log-likelihood (``cfg.mode == "loglik"``): ``engine.prompt_logprobs(ids, top=0)`` for each
  context + continuation, summing the continuation's positions. This is exactly what
  http_backend does over ``/v1/completions`` (echo + logprobs), minus the HTTP: the prompts
  come from ``scoring.build_requests`` (the one prompt builder), token ids from
  http_backend's ``_tokenize`` and the decision from ``scoring.to_records``.
  tests/test_serve_engine_faults.py checks the records equal the in-process evaluator's.
- generative: ``predict_generative`` already goes through ``engine.generate``.

The same over-long rule as http_backend applies (a request is left-truncated to the engine's
window, one context token more than in-process scoring drops). ``QueueFullError`` from the
engine propagates: the HTTP layer answers 503.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steelworks.data.benchmarks import Item, Subject
from steelworks.evals.config import EvalConfig
from steelworks.evals.http_backend import _Request, _score_all, _tokenize
from steelworks.evals.scoring import build_requests, to_records


def predict_engine(engine: Any, items: Sequence[Item], subjects: Sequence[Subject],
                   cfg: EvalConfig, shots: Mapping[str, Sequence[Item]] | None = None,
                   concurrency: int | None = None, progress: bool = False
                   ) -> list[dict[str, Any]]:
    """``scoring.predict``'s records (loglik) or ``predict_generative``'s (generative) for
    the model behind ``engine`` (``tokenizer``, ``max_context``, ``max_batch_size``,
    ``prompt_logprobs``, ``generate``: serve.engine's API, which VLLMEngine shares).

    ``concurrency`` scoring calls are in flight at once (default: the engine's batch size),
    so an engine that batches them can; the built-in one runs them between decode steps.
    """
    if cfg.mode == "generative":
        from steelworks.evals.generative import predict_generative

        return predict_generative(engine, items, subjects, cfg, shots,
                                  max_tokens=cfg.max_new_tokens, progress=progress)
    contexts, continuations = build_requests(engine.tokenizer, items, subjects, cfg, shots)
    requests, index = _tokenize(engine.tokenizer, items, contexts, continuations,
                                engine.max_context)

    def score_one(req: _Request) -> float:
        logprobs = engine.prompt_logprobs(list(req.ids), top=0).token_logprobs
        # The continuation's tokens are the last n_cont; they always have a context before them.
        return float(sum(logprobs[-req.n_cont :]))

    workers = concurrency or max(1, int(getattr(engine, "max_batch_size", 1)))
    sums = _score_all(score_one, requests, workers, progress, "scoring (engine)")
    return to_records(items, continuations, [[sums[k] for k in row] for row in index], cfg)


def evaluate_engine(engine: Any, benchmark_dir: str | Path, cfg: EvalConfig,
                    progress: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``runner.evaluate`` for a served model: (summary, predictions) of ``benchmark_dir``."""
    from steelworks.evals.runner import load_items, summarize

    started = time.time()
    subjects, items, shots = load_items(benchmark_dir, cfg)
    predictions = predict_engine(engine, items, subjects, cfg, shots, progress=progress)
    return summarize(predictions, subjects, cfg, benchmark_dir, time.time() - started), predictions
