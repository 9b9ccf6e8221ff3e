"""The DPO reference pass: the frozen reference model's log-probabilities of every pair,
computed once before training, as a Ray Data batch-inference job.

DPO's loss needs ``log pi_ref(answer | prompt)`` for both answers of each pair. Keeping a
second, frozen model beside the policy on every training rank doubles the weights in memory
and adds a forward per step; the reference never changes, so its numbers are computed once
here and stored with the pairs (``train/pairs.py``). The pairs are spread over
``dpo.reference_replicas`` Ray Data actors, each loading the model once (the pattern of
``evals/batch.py``); on a cluster the autoscaler places them like any Ray Data stage.

Every replica scores with ``dpo.pair_logps``, the function the training loop scores the
policy with, so at step 0 the policy's log-probs equal the stored reference ones (up to
float rounding across batch shapes) and the implied rewards start at zero.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from steelworks.core.rundir import stage_path
from steelworks.core.storage import Remote, uri_of

log = logging.getLogger(__name__)

BLOCKS_PER_REPLICA = 4  # as evals/batch.py: a replica with short pairs takes another block


class ReferenceScorer:
    """One reference model; Ray Data calls it with batches of pair rows."""

    def __init__(self, model_dir: str, pad_id: int, batch_size: int, device: str = "cpu",
                 threads: int | None = None, quantize: bool = False) -> None:
        import torch

        from steelworks.train.hf_io import from_hf

        if threads:  # Ray sets OMP_NUM_THREADS from the actor's CPUs; torch must agree
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        # A URI when the run is in a bucket (the actor may be on another node): fetched here.
        self.model = from_hf(stage_path(model_dir), self.device).eval()
        if quantize:
            # QLoRA: the policy starts as the 4-bit base, so the reference is that base too
            # (what TRL's DPOTrainer gets from a peft model with its adapters disabled).
            from steelworks.train.quantize import quantize_base

            quantize_base(self.model, self.device, torch.float32)
        self.pad_id, self.batch_size = pad_id, batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        import torch

        from steelworks.train.dpo import pair_logps
        from steelworks.train.pairs import collate

        def unpack(name: str, dtype) -> list[np.ndarray]:
            return [np.frombuffer(b, dtype=dtype) for b in batch[name]]

        cols = {name: unpack(name, np.int32 if name.endswith("_ids") else np.uint8)
                for name in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")}
        chosen, rejected = [], []
        n = len(batch["pair_id"])
        with torch.inference_mode():
            for s in range(0, n, self.batch_size):
                part = {k: v[s: s + self.batch_size] for k, v in cols.items()}
                b = collate(part["chosen_ids"], part["chosen_mask"], part["rejected_ids"],
                            part["rejected_mask"], self.pad_id)
                c, r = pair_logps(self.model, b, self.device)
                chosen.append(c.double().cpu().numpy())
                rejected.append(r.double().cpu().numpy())
        return {"pair_id": np.asarray(batch["pair_id"], dtype=np.int64),
                "ref_chosen": np.concatenate(chosen), "ref_rejected": np.concatenate(rejected)}


def _rows(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Token arrays as bytes: Arrow stores them as one binary column, whatever their lengths."""
    return [{"pair_id": p["pair_id"],
             **{k: np.ascontiguousarray(p[k]).tobytes()
                for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")}}
            for p in pairs]


def reference_logps(model_dir: str | Path, pairs: list[dict[str, Any]], pad_id: int, *,
                    replicas: int = 1, batch_size: int = 16, use_ray: bool = True,
                    use_gpu: bool = False, quantize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """-> (reference log-probs of the chosen answers, of the rejected), in ``pairs`` order.

    ``use_ray``: over ``replicas`` Ray Data actors (needs a connected Ray); otherwise in this
    process with the same scorer. ``quantize``: score with the model's 4-bit (QLoRA) base."""
    if not pairs:
        return np.zeros(0), np.zeros(0)
    rows = _rows(pairs)
    if not use_ray:
        out = ReferenceScorer(str(model_dir), pad_id, batch_size, "cuda" if use_gpu else "cpu",
                              quantize=quantize)({k: [r[k] for r in rows] for k in rows[0]})
        order = np.argsort(out["pair_id"])
        return out["ref_chosen"][order], out["ref_rejected"][order]

    import ray

    block = max(1, math.ceil(len(rows) / (replicas * BLOCKS_PER_REPLICA)))
    ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / block))
    out = ds.map_batches(
        ReferenceScorer,
        fn_constructor_kwargs={"model_dir": uri_of(model_dir) or str(model_dir), "pad_id": pad_id,
                               "batch_size": batch_size, "device": "cuda" if use_gpu else "cpu",
                               "threads": 1 if not use_gpu else None, "quantize": quantize},
        batch_size=block,
        compute=ray.data.ActorPoolStrategy(size=replicas),
        num_cpus=1,
        num_gpus=1 if use_gpu else None,
    ).take_all()
    if len(out) != len(pairs):  # never a silent partial result
        raise RuntimeError(f"the reference pass returned {len(out)} rows for {len(pairs)} pairs")
    out.sort(key=lambda row: row["pair_id"])
    ids = np.array([row["pair_id"] for row in out])
    if not np.array_equal(ids, np.array([p["pair_id"] for p in pairs])):
        raise RuntimeError("the reference pass returned pair ids that do not match the pairs")
    return (np.array([row["ref_chosen"] for row in out], dtype=np.float64),
            np.array([row["ref_rejected"] for row in out], dtype=np.float64))


def write_pairs(directory: str | Path, pairs: list[dict[str, Any]], ref_chosen: np.ndarray,
                ref_rejected: np.ndarray) -> Path:
    """``<directory>/pairs.parquet``, written atomically (``train/pairs.py`` reads it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from steelworks.core.atomic import atomic_open
    from steelworks.train.pairs import PAIRS_FILE

    table = pa.table({
        "pair_id": pa.array([p["pair_id"] for p in pairs], pa.int64()),
        "source": pa.array([p["source"] for p in pairs], pa.string()),
        **{k: pa.array([np.asarray(p[k]) for p in pairs],
                       pa.list_(pa.int32() if k.endswith("_ids") else pa.uint8()))
           for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")},
        "ref_chosen": pa.array(ref_chosen, pa.float64()),
        "ref_rejected": pa.array(ref_rejected, pa.float64()),
    })
    path = Path(directory) / PAIRS_FILE
    with atomic_open(path, "wb") as f:
        pq.write_table(table, f)
    return path


def build_pairs(out: Path, remote: Remote | None, dcfg: Any, files: list[str], reference: str,
                tokenizer_dir: str, input_hashes: dict[str, str]) -> dict[str, Any]:
    """Tokenize the preference pairs and compute the reference model's log-probs of them
    (``reference_logps``) into ``out`` (the dpo stage's ``pairs/``), once: a resumed or re-run
    stage reuses them while their key (files, tokenizer, max_length, the reference model and
    its stage's content, ``input_hashes``) is unchanged. The key is written last, so a crash
    in between leaves pairs that the next run rebuilds, never half-made ones that it trusts.
    ``remote``: the run is in a bucket; the pairs are mirrored from and uploaded to it there,
    ``key.json`` last. -> the counts (pairs, quarantined)."""
    from steelworks.core.atomic import (
        atomic_write_json,
        atomic_write_text,
        sha256_file,
        sha256_json,
    )
    from steelworks.core.rundir import list_outputs, stat_key
    from steelworks.data.preference import read_preferences
    from steelworks.data.tokenizer import load_tokenizer

    quantize = dcfg.lora is not None and dcfg.lora.quantize == "4bit"  # QLoRA: a 4-bit reference
    key = {"files": stat_key(files), "max_length": dcfg.max_length, "reference": reference,
           "quantized": quantize, "inputs": input_hashes,
           "tokenizer": sha256_file(Path(tokenizer_dir) / "tokenizer.json")}
    key_file = out / "key.json"
    if remote is not None and not remote.mirror(out, "key.json"):
        key_file.unlink(missing_ok=True)  # the bucket has none: this node's copy is not the run's
    if key_file.exists() and json.loads(key_file.read_text()).get("sha256") == sha256_json(key) \
            and (out / "pairs.parquet").exists():
        counts = json.loads((out / "counts.json").read_text())
        log.info("dpo: reusing %d tokenized pairs with reference log-probs in %s", counts["pairs"], out)
        return counts
    key_file.unlink(missing_ok=True)
    tok = load_tokenizer(tokenizer_dir)
    pairs, quarantined, counts = read_preferences(files, tok, dcfg.max_length)
    atomic_write_text(out / "quarantine.jsonl",
                      "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantined))
    log.info("dpo: %s (quarantined records with their reasons: %s)", counts, out / "quarantine.jsonl")
    if not pairs:
        first = quarantined[0]["error"] if quarantined else "the files are empty"
        raise ValueError(f"dpo: no usable preference pair in {', '.join(files)}; first problem: {first}")
    log.info("dpo: reference log-probs of %d pairs from %s on %d Ray Data replica(s)", len(pairs),
             reference, dcfg.reference_replicas)
    chosen, rejected = reference_logps(reference, pairs, tok.pad_token_id,
                                       replicas=dcfg.reference_replicas,
                                       batch_size=dcfg.reference_batch_size, use_gpu=dcfg.use_gpu,
                                       quantize=quantize)
    write_pairs(out, pairs, chosen, rejected)
    atomic_write_json(out / "counts.json", counts)
    atomic_write_json(key_file, {"sha256": sha256_json(key), **key})
    if remote is not None:  # the key last: pairs in the bucket are trusted only with it
        remote.delete("key.json")
        remote.push(out, [*list_outputs(out), "key.json"], last="key.json")
    return counts
