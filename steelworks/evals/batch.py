"""Batch evaluation on Ray Data: a benchmark's items spread over model replicas.

Each replica is a Ray Data actor that loads the model once and scores the blocks of items
it is handed with ``runner.predict_items``, the same function the single-process path uses,
so the predictions do not depend on how many replicas ran or which item went where (a
test checks this).  ``eval.replicas`` actors are started with ``eval.cpus_per_replica`` CPUs
and ``eval.gpus_per_replica`` GPUs each; on a cluster the autoscaler adds nodes for them
like for any other Ray Data stage.

Items travel as JSON rows ``{"i", "item"}`` and come back as ``{"i", "record"}``: a record
holds nested dicts and ``None`` where a letter has no score, which Arrow schemas handle
badly, and the driver restores the benchmark order by ``i``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from steelworks.core.rundir import stage_path
from steelworks.core.storage import uri_of
from steelworks.data.benchmarks import Item, Subject
from steelworks.evals.config import EvalConfig
from steelworks.evals.report import write_report
from steelworks.evals.runner import load_items, predict_items, summarize

log = logging.getLogger(__name__)

# Blocks per replica: more than one, so a replica that drew short questions takes another
# block instead of idling while the other finishes (the items' lengths vary a lot).
BLOCKS_PER_REPLICA = 4


class Replica:
    """One model copy; Ray Data calls it with batches of item rows."""

    def __init__(self, model_dir: str, cfg: EvalConfig, subjects: Sequence[Subject],
                 shots: Mapping[str, Sequence[Item]], device: str) -> None:
        import torch

        from steelworks.data.tokenizer import load_tokenizer
        from steelworks.train.models import load_model

        # Ray sets OMP_NUM_THREADS from the actor's CPUs; torch's pool must agree, or two
        # replicas on one node each spin up a thread per core and fight over them.
        torch.set_num_threads(max(1, int(cfg.cpus_per_replica)))
        model_dir = str(stage_path(model_dir))  # a URI (run in a bucket): fetched to this node
        self.cfg = cfg
        self.subjects = list(subjects)
        self.shots = {k: list(v) for k, v in shots.items()}
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_model(model_dir, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        items = [Item(**json.loads(row)) for row in batch["item"]]
        records = predict_items(self.model, self.tokenizer, items, self.subjects, self.cfg,
                                self.shots)
        return {"i": [int(i) for i in batch["i"]],
                "record": [json.dumps(r, ensure_ascii=False) for r in records]}


def predict_on_ray(model_dir: str | Path, items: Sequence[Item], subjects: Sequence[Subject],
                   cfg: EvalConfig, shots: Mapping[str, Sequence[Item]] | None = None,
                   device: str | None = None) -> list[dict[str, Any]]:
    """``predict_items`` over ``cfg.replicas`` Ray Data actors; records in ``items`` order.

    Needs a connected Ray (``platform.connect.connect``)."""
    import ray

    if not items:
        return []
    device = device or ("cuda" if cfg.gpus_per_replica > 0 else "cpu")
    rows = [{"i": i, "item": json.dumps(dataclasses.asdict(it), ensure_ascii=False)}
            for i, it in enumerate(items)]
    block = max(1, math.ceil(len(rows) / (cfg.replicas * BLOCKS_PER_REPLICA)))
    ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / block))
    out = ds.map_batches(
        Replica,
        # A replica may run on another node: a mirrored model is named by its URI.
        fn_constructor_kwargs={"model_dir": uri_of(model_dir) or str(model_dir), "cfg": cfg,
                               "subjects": list(subjects), "shots": dict(shots or {}),
                               "device": device},
        batch_size=block,
        compute=ray.data.ActorPoolStrategy(size=cfg.replicas),  # a fixed pool of actors
        num_cpus=cfg.cpus_per_replica,
        num_gpus=cfg.gpus_per_replica or None,
    ).take_all()
    if len(out) != len(items):  # never a silent partial result
        raise RuntimeError(f"Ray evaluation returned {len(out)} records for {len(items)} items")
    out.sort(key=lambda row: row["i"])
    return [json.loads(row["record"]) for row in out]


def evaluate_on_ray(model_dir: str | Path, benchmark_dir: str | Path, cfg: EvalConfig,
                    out_dir: str | Path | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score ``model_dir`` on ``benchmark_dir`` with ``cfg.replicas`` replicas: (summary,
    predictions), and the report files when ``out_dir`` is given."""
    started = time.time()
    subjects, items, shots = load_items(benchmark_dir, cfg)
    log.info("evaluating %d items of %d subjects on %d Ray replica(s)", len(items),
             len(subjects), cfg.replicas)
    predictions = predict_on_ray(model_dir, items, subjects, cfg, shots)
    summary = summarize(predictions, subjects, cfg, benchmark_dir, time.time() - started)
    summary["meta"]["model_dir"] = str(model_dir)
    if out_dir is not None:
        files = write_report(summary, predictions, out_dir)
        log.info("micro acc %s, macro acc %s; wrote %s",
                 summary["micro_acc"], summary["macro_acc"], ", ".join(files))
    return summary, predictions
