"""Fine-tuning benchmarks, side by side in one run, reported as ratios.

1. **LoRA vs full SFT** on one model size (default ``100m``): steelworks' own loop,
   ``run_training(job, cfg, use_ray=False)`` with ``task: sft``, once with
   ``train.lora = {r: 16, alpha: 32, dropout: 0.05}`` and once with ``lora: null``. Same
   base weights (an HF directory built by ``steelworks.train.models``, passed as
   ``init_from``), same packed SFT rows in the same order, same optimizer settings.
   Reported: steady-state tokens/s, peak memory and trainable parameters of each, and the
   LoRA / full ratios.
2. **DPO: steelworks vs TRL's ``DPOTrainer``** per model size (default ``demo`` and
   ``100m``): the same preference pairs, tokenized once by steelworks
   (``data.preference.read_preferences``), fed to both sides in the same order and padded
   the same way (steelworks' ``train.pairs.collate``; TRL gets them through a collator that
   returns TRL's batch layout), same beta, lr, AdamW, batch and max_length.

   - steelworks: the reference log-probs are computed once, before training
     (``train.reference.reference_logps``, here in-process), and stored with the pairs
     (``write_pairs``); ``run_training`` with ``task: dpo`` then holds one model. The
     reference pass is timed on its own and reported beside the per-step time, which
     excludes it (and, for comparison, with it spread over the run's steps).
   - TRL 1.16: its default, ``precompute_ref_log_probs=False``: a second (reference) model
     in memory and a reference forward in every step. Two TRL defaults are changed to
     match steelworks: ``gradient_checkpointing=False`` (steelworks'
     ``activation_checkpointing`` is off) and ``bf16`` as ``--precision`` says (TRL's
     default is bf16 even on CPU). No evaluation, no saving, ``report_to="none"``.

   Reported: steady-state seconds per optimizer step, peak memory, and the loss of the
   first and last step of each side: both start at ln 2 (policy = reference) and, training
   the same pairs with the same optimizer, should stay close; that shows the two sides do
   the same work.

Timing: ``--warmup`` untimed optimizer steps, then ``--steps`` timed ones. steelworks'
times come from its ``metrics.jsonl`` (``log_every=1``: each row's ``tokens_per_s`` over
that step's known token count); TRL's from a ``TrainerCallback`` at each step's end.
With ``--repeats N`` every configuration runs N times, interleaved, and the fastest run of
each counts (its memory figures with it; all step times are kept).
Memory: every configuration runs in its own subprocess, so its peak is its own. On CPU
the peak resident set (``resource.getrusage(...).ru_maxrss``); steelworks' training peak
is the one its last metrics row records (before the final checkpoint and export, which
are reported separately as the process peak). On CUDA ``torch.cuda.max_memory_allocated``.
An idle process (torch, transformers, trl and the loop imported) is measured too, for the
fixed part of every RSS figure.

Data: the embedded demo corpus and a BPE tokenizer trained on it; SFT rows are the demo's
SFT conversations packed into ``--seq-len`` rows (as ``pack.sft_pack`` does). The
preference pairs are synthetic, made for timing: a short prompt and two different runs of
demo documents as answers, all cut at ``--dpo-max-length`` tokens, so that every sequence
has the same length; the loss values mean nothing beyond the parity check above.

    .venv/bin/python benchmarks/finetune.py                     # 2-core CPU: ~6 min when quiet
    .venv/bin/python benchmarks/finetune.py --repeats 2         # the RESULTS.md run: ~10 min
    .venv/bin/python benchmarks/finetune.py --sft-size tiny --dpo-sizes tiny --steps 2  # smoke
    python benchmarks/finetune.py --device cuda --sft-size steel-1b --dpo-sizes 100m steel-1b \\
        --seq-len 2048 --micro-batch 4 --dpo-max-length 1024 --dpo-batch 4   # a lent GPU box (not run)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing the package
WORK = ROOT / "benchmarks" / ".work" / "finetune"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LORA = {"r": 16, "alpha": 32.0, "dropout": 0.05}
SFT_LR, DPO_LR, DPO_BETA = 1e-4, 1e-6, 0.1
BETAS, EPS, GRAD_CLIP = (0.9, 0.95), 1e-8, 1.0  # steelworks' defaults; TRL is set to them


# ---- data and models (built once in the parent, cached under WORK) ------------------------


def build_tokenizer(vocab: int) -> tuple[Path, Path]:
    """-> (tokenizer dir, demo corpus dir): a BPE tokenizer trained on the demo corpus."""
    from steelworks.data.config import DemoCorpusConfig
    from steelworks.data.demo_corpus import generate
    from steelworks.data.tokenizer import train_tokenizer

    corpus, tok_dir = WORK / "corpus", WORK / f"tokenizer-v{vocab}"
    if not (corpus / "preference.jsonl").exists():
        generate(DemoCorpusConfig(), corpus)
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(_documents(corpus), vocab, tok_dir)
    return tok_dir, corpus


def _documents(corpus: Path) -> list[str]:
    lines = (corpus / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def build_base(size: str, tok_dir: Path) -> Path:
    """The HF directory every run of ``size`` starts from (weights of seed 0, tokenizer)."""
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.config import ModelConfig
    from steelworks.train.models import build_hf_config, build_model

    tok = load_tokenizer(tok_dir)
    out = WORK / "models" / f"{size}-v{len(tok)}"
    if not (out / "config.json").exists():
        cfg = build_hf_config(ModelConfig(size=size), len(tok), tok.pad_token_id, tok.eos_token_id)
        build_model(cfg, seed=0).save_pretrained(out)
        tok.save_pretrained(out)
    return out


def build_sft(tok_dir: Path, corpus: Path, seq_len: int) -> Path:
    """The demo's SFT conversations, prompt tokens masked, packed into ``seq_len`` rows."""
    from steelworks.data.sft import encode_conversation, pack_samples
    from steelworks.data.shards import ShardIndex, token_dtype, write_shard
    from steelworks.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    out = WORK / f"sft-v{len(tok)}-{seq_len}"
    if (out / "index.json").exists():
        return out
    samples = []
    for line in (corpus / "sft.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            ids, mask, _ = encode_conversation(tok, json.loads(line)["messages"], seq_len, pad=False)
            samples.append((ids, mask))
    tokens, mask, segments = pack_samples(samples, seq_len, tok.pad_token_id)
    dtype = token_dtype(len(tok))
    info = write_shard(out / "shard-00000.bin", tokens, dtype, mask, segments)
    ShardIndex(seq_len, str(dtype), len(tok), tok.pad_token_id, "sft", [info]).save(out)
    return out


def build_preferences(corpus: Path, n_pairs: int, max_length: int) -> Path:
    """Synthetic ``{prompt, chosen, rejected}`` JSONL (module docstring): each answer is a
    run of demo documents of at least 8 characters per token of ``max_length`` (4 left a few
    English answers short), so ``read_preferences`` cuts every sequence at max_length."""
    docs = _documents(corpus)
    path = WORK / f"preferences-{n_pairs}-{max_length}.jsonl"

    def answer(start: int) -> str:
        text, k = "", start
        while len(text) < 8 * max_length:
            text, k = text + docs[k % len(docs)], k + 1
        return text

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_pairs):
            a, b = 16 * i, 16 * i + len(docs) // 2
            record = {"prompt": "续写下面的文字：" + docs[a % len(docs)][:16], "chosen": answer(a),
                      "rejected": answer(b)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


# ---- helpers shared by the workers --------------------------------------------------------


def precision(args: argparse.Namespace) -> str:
    return args.precision if args.precision != "auto" else ("bf16" if args.device == "cuda" else "fp32")


def common_train_fields(args: argparse.Namespace, lr: float) -> dict[str, Any]:
    """The ``TrainConfig`` fields both tasks share: one process, log every step, constant lr."""
    return dict(max_steps=args.warmup + args.steps, grad_accum=1, num_workers=1,
                use_gpu=args.device == "cuda", precision=precision(args), seed=0, log_every=1,
                ckpt_every=0, keep_last=1, tensorboard=False,
                optim={"lr": lr, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                       "betas": list(BETAS), "eps": EPS, "grad_clip": GRAD_CLIP})


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def row_peak_mib(row: dict[str, Any], device: str) -> float:
    """A metrics row's ``memory_gb`` in MiB (the loop: CUDA bytes / 1e9, CPU KiB / 1e6)."""
    return row["memory_gb"] * (1e9 / 2**20 if device == "cuda" else 1e6 / 1024)


def cuda_peak_mib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def metrics_rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def steady_seconds(rows: list[dict[str, Any]], step_tokens: list[int], warmup: int) -> list[float]:
    """Seconds of each timed step: one metrics row per step (``log_every=1``), whose
    ``tokens_per_s`` is that step's token count over its wall time."""
    return [step_tokens[r["step"] - 1] / r["tokens_per_s"] for r in rows if r["step"] > warmup]


def machine(device: str) -> dict[str, Any]:
    from train_throughput import _version, machine_info  # same directory: benchmarks/

    return {**machine_info(device), "trl": _version("trl"), "peft": _version("peft")}


# ---- workers: each runs in its own process (``--worker spec.json``) -----------------------


def worker_idle(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """The fixed part of every RSS figure: the interpreter with the libraries imported."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import steelworks.train.loop  # noqa: F401

    return {"peak_rss_mib": peak_rss_mib()}


def worker_sft(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    from steelworks.core.config import from_dict, to_dict
    from steelworks.train.config import TrainConfig
    from steelworks.train.driver import run_training

    cfg = from_dict(TrainConfig, {**common_train_fields(args, SFT_LR), "micro_batch_size": args.micro_batch,
                                  "lora": dict(LORA) if spec["lora"] else None})
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)  # the loop resumes from any checkpoint it finds
    job = {"task": "sft", "train": to_dict(cfg), "tokenizer_dir": spec["tokenizer"],
           "data_dir": spec["data"], "out_dir": str(out), "init_from": spec["base"]}
    summary = run_training(job, cfg, use_ray=False)
    rows = metrics_rows(out)
    per_step = args.micro_batch * (args.seq_len - 1)  # input positions per step, as the loop counts
    seconds = steady_seconds(rows, [per_step] * (args.warmup + args.steps), args.warmup)
    result = {"tokens_per_s": per_step * len(seconds) / sum(seconds), "step_s": sum(seconds) / len(seconds),
              "step_s_median": float(np.median(seconds)), "steps_s": seconds,
              "params": summary["params"], "trainable_params": summary["trainable_params"],
              "train_peak_mib": row_peak_mib(rows[-1], args.device), "process_peak_rss_mib": peak_rss_mib(),
              "first_loss": rows[0]["loss"], "final_loss": rows[-1]["loss"]}
    shutil.rmtree(out, ignore_errors=True)  # checkpoints and exports: ~1.3 GB at 100m
    return result


def worker_dpo_reference(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """steelworks' reference pass: tokenize the pairs, score them once, write ``pairs/``."""
    from steelworks.data.preference import read_preferences
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.config import DpoConfig
    from steelworks.train.reference import reference_logps, write_pairs

    tok = load_tokenizer(spec["tokenizer"])
    pairs, quarantined, _ = read_preferences([spec["preferences"]], tok, args.dpo_max_length)
    if quarantined:
        raise RuntimeError(f"{len(quarantined)} synthetic pairs were quarantined: {quarantined[0]}")
    import steelworks.train.dpo  # noqa: F401  imports outside the timed pass, which loads the
    import steelworks.train.hf_io  # noqa: F401  model and scores every pair

    start = time.perf_counter()
    chosen, rejected = reference_logps(spec["base"], pairs, tok.pad_token_id, use_ray=False,
                                       batch_size=DpoConfig.reference_batch_size,
                                       use_gpu=args.device == "cuda")
    seconds = time.perf_counter() - start
    write_pairs(spec["pairs"], pairs, chosen, rejected)
    full = sum(len(p[k]) == args.dpo_max_length for p in pairs for k in ("chosen_ids", "rejected_ids"))
    return {"seconds": seconds, "pairs": len(pairs), "sequences_at_max_length": full,
            "peak_rss_mib": peak_rss_mib(), "cuda_peak_mib": cuda_peak_mib(args.device)}


def pair_schedule(args: argparse.Namespace, pairs_dir: str, pad_id: int) -> tuple[list[list[int]], Any]:
    """The pair indices of every step, in the order steelworks' ``PairLoader`` takes them
    (train/pairs.py: a permutation seeded by ``[seed, epoch]`` per epoch, taken in order;
    a remainder too small for a batch waits for the next epoch), checked against the
    loader itself. -> (indices per step, the pair columns)."""
    from steelworks.train.pairs import PairLoader, collate

    loader = PairLoader(pairs_dir, 0, 1, args.dpo_batch, 1, 0, pad_id, args.dpo_max_length)
    cols, n, b = loader.cols, len(loader), args.dpo_batch
    steps, epoch, cursor = [], 0, 0
    for _ in range(args.warmup + args.steps):
        if cursor + b > n:
            epoch, cursor = epoch + 1, 0
        idx = np.random.default_rng([0, epoch]).permutation(n)[cursor: cursor + b]
        cursor += b
        ours = collate(*([cols[k][i] for i in idx] for k in ("chosen_ids", "chosen_mask", "rejected_ids",
                                                              "rejected_mask")), pad_id)
        if not np.array_equal(ours.input_ids.numpy(), loader.next_step()[0].input_ids.numpy()):
            raise RuntimeError("pair_schedule no longer matches PairLoader's order (train/pairs.py)")
        steps.append([int(i) for i in idx])
    return steps, cols


def worker_dpo_steelworks(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    from steelworks.core.config import from_dict, to_dict
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.config import DpoConfig
    from steelworks.train.driver import run_training

    cfg = from_dict(DpoConfig, {**common_train_fields(args, DPO_LR), "micro_batch_size": args.dpo_batch,
                                "beta": DPO_BETA, "max_length": args.dpo_max_length})
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    job = {"task": "dpo", "train": to_dict(cfg), "tokenizer_dir": spec["tokenizer"],
           "data_dir": spec["pairs"], "out_dir": str(out), "init_from": spec["base"]}
    summary = run_training(job, cfg, use_ray=False)
    rows = metrics_rows(out)
    steps, cols = pair_schedule(args, spec["pairs"], load_tokenizer(spec["tokenizer"]).pad_token_id)
    # The loop counts each step's padded 2B x width input positions.
    widths = [max(max(len(cols["chosen_ids"][i]), len(cols["rejected_ids"][i])) for i in s) for s in steps]
    tokens = [2 * len(s) * w for s, w in zip(steps, widths, strict=True)]
    seconds = steady_seconds(rows, tokens, args.warmup)
    result = {"step_s": sum(seconds) / len(seconds), "step_s_median": float(np.median(seconds)), "steps_s": seconds,
              "params": summary["params"], "trainable_params": summary["trainable_params"],
              "train_peak_mib": row_peak_mib(rows[-1], args.device), "process_peak_rss_mib": peak_rss_mib(),
              "first_loss": rows[0]["loss"], "final_loss": rows[-1]["loss"], "widths": sorted(set(widths))}
    shutil.rmtree(out, ignore_errors=True)
    return result


def worker_dpo_trl(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from train_throughput import attention, make_timer
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.pairs import collate

    cuda = args.device == "cuda"
    tok = load_tokenizer(spec["base"])
    steps, cols = pair_schedule(args, spec["pairs"], tok.pad_token_id)
    order = [i for s in steps for i in s]  # one dataset row per pair, in steelworks' order

    def collator(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """steelworks' padded batch in TRL's layout (DataCollatorForPreference: chosen rows
        first, attention_mask, completion_mask = the answer mask)."""
        idx = [f["pair"] for f in features]
        b = collate(*([cols[k][i] for i in idx] for k in ("chosen_ids", "chosen_mask", "rejected_ids",
                                                           "rejected_mask")), tok.pad_token_id)
        lengths = torch.tensor([len(cols[k][i]) for k in ("chosen_ids", "rejected_ids") for i in idx])
        attention_mask = (torch.arange(b.input_ids.size(1))[None] < lengths[:, None]).long()
        return {"input_ids": b.input_ids, "attention_mask": attention_mask,
                "completion_mask": b.answer_mask.long()}

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset: Any, *a: Any, **kw: Any) -> Any:
            return dataset  # already tokenized, by steelworks: the collator builds the batch

        def _get_train_sampler(self, *a: Any, **kw: Any) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)  # steelworks' order

    bf16 = precision(args) == "bf16"
    targs = DPOConfig(
        output_dir=spec["out"], use_cpu=not cuda, bf16=bf16, seed=0, beta=DPO_BETA,
        max_length=args.dpo_max_length, per_device_train_batch_size=args.dpo_batch,
        gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=DPO_LR,
        weight_decay=0.0, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
        max_grad_norm=GRAD_CLIP, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused",
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, remove_unused_columns=False, dataloader_pin_memory=cuda)
    model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32, local_files_only=True,
                                                 attn_implementation=attention(args.device))
    timer = make_timer(cuda)
    trainer = Trainer(model=model, args=targs, train_dataset=Dataset.from_dict({"pair": order}),
                      data_collator=collator, processing_class=tok, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    w, n = args.warmup, args.steps
    seconds = np.diff(timer.ends[w - 1: w + n])
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    result = {"step_s": float(seconds.mean()), "step_s_median": float(np.median(seconds)),
              "steps_s": seconds.tolist(),
              "train_peak_mib": cuda_peak_mib(args.device) if cuda else peak_rss_mib(),
              "process_peak_rss_mib": peak_rss_mib(), "first_loss": losses[0], "final_loss": losses[-1],
              "reference_model": trainer.ref_model is not None,
              "precompute_ref_log_probs": targs.precompute_ref_log_probs}
    shutil.rmtree(spec["out"], ignore_errors=True)
    return result


WORKERS = {"idle": worker_idle, "sft": worker_sft, "dpo-reference": worker_dpo_reference,
           "dpo-steelworks": worker_dpo_steelworks, "dpo-trl": worker_dpo_trl}


def run_worker(args: argparse.Namespace, kind: str, label: str, **spec: Any) -> dict[str, Any]:
    """Run ``kind`` in a fresh interpreter (its own peak memory); its output goes to stderr."""
    spec_path = WORK / "specs" / f"{label}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    result_path = spec_path.with_suffix(".result.json")
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({"kind": kind, "args": vars(args), "result": str(result_path),
                                     **{k: str(v) if isinstance(v, Path) else v for k, v in spec.items()}}))
    print(f"--- {label}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], check=True, stdout=sys.stderr)
    result = json.loads(result_path.read_text())
    result["wall_s"] = time.perf_counter() - start
    return result


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    args = argparse.Namespace(**spec["args"])
    result = WORKERS[spec["kind"]](args, spec)
    Path(spec["result"]).write_text(json.dumps(result, indent=1))


# ---- the run ------------------------------------------------------------------------------


def fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run least disturbed by anything else on the machine, with every run's step time."""
    return {**min(runs, key=lambda r: r["step_s"]), "all_step_s": [r["step_s"] for r in runs]}


def sft_part(args: argparse.Namespace, tok_dir: Path, corpus: Path) -> dict[str, Any]:
    base, data = build_base(args.sft_size, tok_dir), build_sft(tok_dir, corpus, args.seq_len)
    runs: dict[str, list[dict[str, Any]]] = {"full": [], "lora": []}
    for rep in range(args.repeats):  # interleaved: a spell of outside load hits both
        for mode, done in runs.items():
            done.append(run_worker(args, "sft", f"sft-{args.sft_size}-{mode}-{rep + 1}", lora=mode == "lora",
                                   base=base, data=data, tokenizer=tok_dir, out=WORK / "runs" / f"sft-{mode}"))
    full, lora = fastest(runs["full"]), fastest(runs["lora"])
    ratios = {k: lora[k] / full[k] for k in ("tokens_per_s", "train_peak_mib", "process_peak_rss_mib",
                                              "trainable_params")}
    return {"size": args.sft_size, "full": full, "lora": lora, "lora_over_full": ratios}


def dpo_part(args: argparse.Namespace, tok_dir: Path, corpus: Path, size: str) -> dict[str, Any]:
    base = build_base(size, tok_dir)
    prefs = build_preferences(corpus, args.dpo_batch * (args.warmup + args.steps), args.dpo_max_length)
    pairs = WORK / "runs" / f"dpo-{size}-pairs"
    shutil.rmtree(pairs, ignore_errors=True)
    common = dict(base=base, tokenizer=tok_dir, pairs=pairs)
    ref = run_worker(args, "dpo-reference", f"dpo-{size}-reference", preferences=prefs, **common)
    runs: dict[str, list[dict[str, Any]]] = {"steelworks": [], "trl": []}
    for rep in range(args.repeats):  # the reference pass once: both sides' repeats read its pairs
        for side, done in runs.items():
            done.append(run_worker(args, f"dpo-{side}", f"dpo-{size}-{side}-{rep + 1}",
                                   out=WORK / "runs" / f"dpo-{size}-{side}", **common))
    ours, trl = fastest(runs["steelworks"]), fastest(runs["trl"])
    steps = args.warmup + args.steps
    with_ref = ours["step_s"] + ref["seconds"] / steps  # the pass spread over this run's steps
    return {"reference": ref, "steelworks": ours, "trl": trl,
            "steelworks_with_reference_step_s": with_ref,
            "trl_over_steelworks_step": trl["step_s"] / ours["step_s"],
            "trl_over_steelworks_with_reference_step": trl["step_s"] / with_ref,
            "trl_over_steelworks_peak": trl["train_peak_mib"] / ours["train_peak_mib"]}


def runs(row: dict[str, Any]) -> str:
    return "runs: " + ", ".join(f"{s:.3g}" for s in row["all_step_s"])


def print_tables(results: dict[str, Any], args: argparse.Namespace) -> None:
    m, mem = results["machine"], "peak GPU memory allocated" if args.device == "cuda" else "peak RSS"
    print(f"\n{results['command']}\n{m.get('gpu', m['cpu'])}, {m['cores']} cores, {m['torch_threads']} torch "
          f"threads, torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, peft {m['peft']}; "
          f"{precision(args)}; {args.steps} timed steps after {args.warmup}; vocab {results['vocab']}; "
          f"idle process RSS {results['idle']['peak_rss_mib']:,.0f} MiB\n")
    if "sft" in results:
        s = results["sft"]
        print(f"SFT, {s['size']}: {args.micro_batch} packed rows x {args.seq_len} tokens per step; "
              f"LoRA r={LORA['r']}, alpha={LORA['alpha']:g}, dropout={LORA['dropout']} on all 7 projections\n")
        print(f"| run | trainable params | tokens/s | s/step (median; every run's mean) | {mem}, training | "
              "peak RSS, process (incl. final save + export) |")
        print("|---|---:|---:|---:|---:|---:|")
        for mode in ("full", "lora"):
            r = s[mode]
            print(f"| {mode} | {r['trainable_params']:,} of {r['params']:,} | {r['tokens_per_s']:,.0f} | "
                  f"{r['step_s']:.2f} ({r['step_s_median']:.2f}; {runs(r)}) | {r['train_peak_mib']:,.0f} MiB | "
                  f"{r['process_peak_rss_mib']:,.0f} MiB |")
        q = s["lora_over_full"]
        print(f"| **LoRA / full** | {q['trainable_params']:.4f} | **{q['tokens_per_s']:.2f}x** | "
              f"{1 / q['tokens_per_s']:.2f}x | **{q['train_peak_mib']:.2f}x** | {q['process_peak_rss_mib']:.2f}x |\n")
    if results["dpo"]:
        print(f"DPO: {args.dpo_batch} pairs per step (2x{args.dpo_batch} sequences), max_length "
              f"{args.dpo_max_length}, beta {DPO_BETA}, lr {DPO_LR:g}\n")
        print(f"| size | side | s/step (median; every run's mean) | {mem}, training | loss, first / last step |")
        print("|---|---|---:|---:|---:|")
        for size, d in results["dpo"].items():
            ours, trl, ref = d["steelworks"], d["trl"], d["reference"]
            print(f"| {size} | steelworks (reference pass excluded) | {ours['step_s']:.3f} "
                  f"({ours['step_s_median']:.3f}; {runs(ours)}) | {ours['train_peak_mib']:,.0f} MiB | "
                  f"{ours['first_loss']:.4f} / {ours['final_loss']:.4f} |")
            print(f"| {size} | steelworks reference pass, once ({ref['pairs']} pairs) | {ref['seconds']:.2f} s "
                  f"in all; {d['steelworks_with_reference_step_s']:.3f} s/step spread over the run | "
                  f"{ref['peak_rss_mib']:,.0f} MiB RSS | |")
            print(f"| {size} | TRL DPOTrainer (reference forward every step) | {trl['step_s']:.3f} "
                  f"({trl['step_s_median']:.3f}; {runs(trl)}) | {trl['train_peak_mib']:,.0f} MiB | "
                  f"{trl['first_loss']:.4f} / {trl['final_loss']:.4f} |")
            print(f"| {size} | **TRL / steelworks** | **{d['trl_over_steelworks_step']:.2f}x** "
                  f"({d['trl_over_steelworks_with_reference_step']:.2f}x with the reference pass) | "
                  f"**{d['trl_over_steelworks_peak']:.2f}x** | |")
    print(f"\nresults: {WORK / 'results.json'}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft-size", default="100m", help="model size of the LoRA vs full SFT comparison")
    ap.add_argument("--dpo-sizes", nargs="*", default=["demo", "100m"], help="model sizes of the DPO comparison")
    ap.add_argument("--no-sft", action="store_true", help="skip the LoRA vs full comparison")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--seq-len", type=int, default=256, help="SFT: tokens per packed row")
    ap.add_argument("--micro-batch", type=int, default=4, help="SFT: rows per step")
    ap.add_argument("--dpo-batch", type=int, default=4, help="DPO: pairs per step")
    ap.add_argument("--dpo-max-length", type=int, default=128, help="DPO: tokens per sequence")
    ap.add_argument("--repeats", type=int, default=1, help="runs per configuration, interleaved; "
                    "the fastest counts (for busy machines)")
    ap.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary trained on the demo corpus")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: bf16 on CUDA, fp32 on CPU (both sides)")
    args = ap.parse_args()
    if min(args.warmup, args.steps, args.repeats) < 1:
        ap.error("--warmup, --steps and --repeats must be >= 1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU")
    from steelworks.core.atomic import atomic_write_json
    from steelworks.data.tokenizer import load_tokenizer

    WORK.mkdir(parents=True, exist_ok=True)
    tok_dir, corpus = build_tokenizer(args.vocab)
    results: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]), "machine": machine(args.device),
                               "vocab": len(load_tokenizer(tok_dir)), "args": vars(args),
                               "idle": run_worker(args, "idle", "idle"), "dpo": {}}
    if not args.no_sft:
        results["sft"] = sft_part(args, tok_dir, corpus)
        atomic_write_json(WORK / "results.json", results)
    for size in args.dpo_sizes:
        results["dpo"][size] = dpo_part(args, tok_dir, corpus, size)
        atomic_write_json(WORK / "results.json", results)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M")
    atomic_write_json(WORK / "results.json", results)
    print_tables(results, args)


if __name__ == "__main__":
    main()
