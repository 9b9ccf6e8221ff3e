"""Training throughput: steelworks' loop vs a plain Hugging Face ``Trainer``, same run.

Per model size both sides train the same HF config from the same initial weights (one
model built by ``steelworks.train.models``, saved, and loaded by both: steelworks through
its ``init_from`` job key) on the identical packed sequences in the identical order, with
the same batch (sequences per optimizer step, seq_len, precision), AdamW settings (lr,
weight decay, betas, eps, grad clip; each side its own AdamW implementation) and schedule
(constant lr, no warmup: the one schedule both compute identically, so their losses over
the first window agree, which shows that the two really train the same thing).

- steelworks: ``run_training(job, cfg, use_ray=False)``; steady-state tokens/s from the
  ``metrics.jsonl`` rows after the first log window (``log_every`` = the warmup steps).
- hf-trainer: ``Trainer`` on the same rows (the textbook recipe: labels = input_ids, the
  model shifts them). It sees the full ``seq_len`` row where steelworks feeds ``seq_len-1``
  inputs with shifted labels: one more position per row, the same ``seq_len-1`` targets.
  Both sides count those targets as training tokens; a callback times steady-state steps.
- hf-padded: a DIFFERENT workload, for context: the usual HF recipe on the same documents
  unpacked (one document per example, padded per batch by DataCollatorForLanguageModeling,
  random order), counting non-pad tokens only.

MFU = tokens/s * flops_per_token / peak_flops, from ``steelworks.train.metrics`` for every
row (on CPU the peak is a measured fp32 GEMM probe, shared by all rows of the run).

Data: the embedded demo corpus, a BPE tokenizer trained on it (``steelworks.data.tokenizer``)
and packed shards written with ``write_shard``/``ShardIndex``. Documents are tokenized and
packed here in-process, like ``steelworks.data.pack`` does but without Ray (absent on GPU
boxes) and without the data stage's cleaning and dedup (irrelevant to throughput).

    .venv/bin/python benchmarks/train_throughput.py                      # CPU: tiny, demo
    python benchmarks/train_throughput.py --device cuda --sizes 100m steel-1b --precision bf16 \\
        --seq-len 2048 --micro-batch 4                                   # a lent GPU box

The demo corpus's BPE saturates near 6.8k tokens, so a larger ``--vocab`` changes nothing:
GPU figures are for these shapes with a small vocabulary, not steel-1b's 152k one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing the package
WORK = ROOT / "benchmarks" / ".work" / "train_throughput"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_data(vocab: int, seq_len: int) -> tuple[Path, Path, list[str]]:
    """-> (tokenizer dir, packed shard dir, demo documents); cached per (vocab, seq_len)."""
    from steelworks.data.config import DemoCorpusConfig
    from steelworks.data.demo_corpus import generate
    from steelworks.data.shards import ShardIndex, token_dtype, write_shard
    from steelworks.data.tokenizer import document_end_id, load_tokenizer, train_tokenizer

    corpus, base = WORK / "corpus", WORK / f"data-v{vocab}"
    if not (corpus / "pretrain.jsonl").exists():
        generate(DemoCorpusConfig(), corpus)
    lines = (corpus / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line)["text"] for line in lines if line.strip()]
    tok_dir, data_dir = base / "tokenizer", base / f"pretrain-{seq_len}"
    tok = load_tokenizer(tok_dir) if (tok_dir / "tokenizer.json").exists() else \
        train_tokenizer(docs, vocab, tok_dir)
    if not (data_dir / "index.json").exists():
        # As steelworks.data.pack: each document + <|endoftext|>, joined, cut into rows.
        eod = document_end_id(tok)
        ids = tok(docs, add_special_tokens=False)["input_ids"]
        stream = np.concatenate([np.array([*d, eod], dtype=np.int64) for d in ids])
        rows = stream[: len(stream) // seq_len * seq_len].reshape(-1, seq_len)
        dtype = token_dtype(len(tok))
        info = write_shard(data_dir / "shard-00000.bin", rows, dtype)
        ShardIndex(seq_len, str(dtype), len(tok), tok.pad_token_id, "pretrain", [info]).save(data_dir)
    return tok_dir, data_dir, docs


def train_config(args: argparse.Namespace, size: str) -> Any:  # a TrainConfig
    from steelworks.train.config import ModelConfig, OptimConfig, TrainConfig

    cfg = TrainConfig(model=ModelConfig(size=size), optim=OptimConfig(schedule="constant", warmup_steps=0),
                      max_steps=args.warmup + args.steps, micro_batch_size=args.micro_batch,
                      grad_accum=args.grad_accum, num_workers=1, use_gpu=args.device == "cuda",
                      precision=args.precision, seed=0, log_every=args.warmup, ckpt_every=0, keep_last=1)
    if hasattr(cfg, "tensorboard"):  # newer configs log to TensorBoard; HF here logs nowhere
        cfg.tensorboard = False
    return cfg


def save_initial_model(hf_config: Any, seed: int, out: Path) -> Path:
    """The starting weights of both sides. Passed to the loop as ``init_from`` rather than
    left to its from-scratch path, whose init scheme is its own business: this way the
    weights are identical by construction and the loss columns can be compared."""
    from steelworks.train.models import build_model

    build_model(hf_config, seed=seed).save_pretrained(out)
    return out


def attention(device: str) -> str:
    """The attention kernel the loop picks for ``device``, so the HF side gets the same."""
    from steelworks.train import models

    pick = getattr(models, "attention_implementation", None)  # newer package versions
    return pick(device) if pick is not None else "sdpa"


def run_steelworks(args: argparse.Namespace, size: str, tok_dir: Path, data_dir: Path,
                   init_dir: Path, ckpt_every: int = 0, async_ckpt: bool | None = None,
                   tag: str = "steelworks") -> dict[str, Any]:
    from steelworks.core.config import to_dict
    from steelworks.train.driver import run_training

    cfg = train_config(args, size)
    cfg.ckpt_every = ckpt_every
    if async_ckpt is not None:
        cfg.async_checkpoint = async_ckpt
    out = WORK / "runs" / size / tag
    shutil.rmtree(out, ignore_errors=True)  # the loop resumes from any checkpoint it finds
    job = {"task": "pretrain", "train": to_dict(cfg), "tokenizer_dir": str(tok_dir),
           "data_dir": str(data_dir), "out_dir": str(out), "init_from": str(init_dir)}
    summary = run_training(job, cfg, use_ray=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_step = args.micro_batch * args.grad_accum * (args.seq_len - 1)
    # The first row's window holds the warmup steps (model and optimizer state warm up);
    # each later row covers (step - previous step) steps at its logged rate.
    steady = [(b["step"] - a["step"], b["tokens_per_s"]) for a, b in zip(rows, rows[1:])]
    seconds = sum(n * per_step / tps for n, tps in steady)
    for d in ("checkpoints", "hf"):  # ~16 GB at 1B (weights, AdamW, export): keep the metrics
        shutil.rmtree(out / d, ignore_errors=True)
    return {"tokens_per_s": sum(n for n, _ in steady) * per_step / seconds, "seconds": seconds,
            "loss_first_window": rows[0]["loss"], "final_loss": rows[-1]["loss"],
            "params": summary["params"], "flops_per_token": summary["flops_per_token"]}


def run_model_step(args: argparse.Namespace, size: str, init_dir: Path, data_dir: Path,
                   which: str) -> dict[str, Any]:
    """The model alone, ours or transformers', through one identical step: the loop's
    loader, micro batches and AdamW (fused, decay on matrices only), loss = sum(w * CE) with
    the loop's token weights. Same weights, rows and order for both; only the model differs
    (the full loop adds logging, metrics and the schedule to ``steelworks``)."""
    from steelworks.train.data import PackedLoader
    from steelworks.train.hf_io import from_hf
    from steelworks.train.loop import _token_weights

    cfg, cuda = train_config(args, size), args.device == "cuda"
    device = torch.device(args.device)
    if which == "ours":
        model = from_hf(init_dir, device)

        def loss_of(b: Any, w: torch.Tensor) -> torch.Tensor:
            return model(b.input_ids.to(device), labels=b.labels.to(device), loss_weights=w)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(init_dir), dtype=torch.float32, local_files_only=True,
                                                     attn_implementation=attention(args.device)).to(device)

        def loss_of(b: Any, w: torch.Tensor) -> torch.Tensor:
            logits = model(input_ids=b.input_ids.to(device), use_cache=False).logits
            ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b.labels.to(device).flatten(),
                                                   ignore_index=-100, reduction="none")
            return (ce * w.flatten()).sum()
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=True)
    loader = PackedLoader(data_dir, 0, 1, args.micro_batch, args.grad_accum, seed=0)
    bf16 = cfg.precision == "bf16"
    ends, tokens, losses = [], 0, []
    for step in range(args.warmup + args.steps):
        micro = loader.next_step()
        denom = sum(b.num_targets for b in micro)
        total = 0.0
        for b in micro:
            w = _token_weights(b, "token").to(device) / max(denom, 1)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_of(b, w)
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        losses.append(total)
        if step >= args.warmup:
            tokens += sum(int(b.num_targets) for b in micro)
    seconds = ends[-1] - ends[args.warmup - 1]
    return {"tokens_per_s": tokens / seconds, "seconds": seconds,
            "loss_first_window": sum(losses[:args.warmup]) / args.warmup, "final_loss": losses[-1]}


def make_timer(cuda: bool) -> Any:  # a TrainerCallback, defined once transformers is imported
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time at the end of every optimizer step (after syncing the GPU)."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    return StepTimer()


def run_hf(args: argparse.Namespace, size: str, init_dir: Path, examples: list[dict[str, Any]],
           collator: Callable, packed: bool, count: list[int]) -> dict[str, Any]:
    """Train with ``Trainer``; ``count`` holds the counted tokens of each micro batch in
    the order the data loader built them (micro batch k belongs to step k // grad_accum)."""
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, PrinterCallback, Trainer, TrainingArguments

    cfg, cuda = train_config(args, size), args.device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(str(init_dir), dtype=torch.float32, local_files_only=True,
                                                 attn_implementation=attention(args.device))

    class OrderedTrainer(Trainer):
        def _get_train_sampler(self, *a: Any, **kw: Any) -> SequentialSampler:  # loader order
            return SequentialSampler(self.train_dataset)

    out = WORK / "runs" / size / ("hf" if packed else "hf-padded")
    targs = TrainingArguments(
        output_dir=str(out), use_cpu=not cuda, bf16=cfg.precision == "bf16", seed=cfg.seed,
        per_device_train_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.max_steps, learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.optim.grad_clip, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=args.warmup, save_strategy="no", report_to=[], disable_tqdm=True,
        remove_unused_columns=False, dataloader_pin_memory=cuda)  # optim: HF's default (fused AdamW)
    timer = make_timer(cuda)
    trainer_cls = OrderedTrainer if packed else Trainer  # padded: HF's default random order
    trainer = trainer_cls(model=model, args=targs, train_dataset=examples, data_collator=collator,
                          callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # its log dicts would land amid the table on stdout
    trainer.train()
    w, n, accum = args.warmup, args.steps, args.grad_accum
    seconds = timer.ends[w + n - 1] - timer.ends[w - 1]
    tokens = sum(count[w * accum : (w + n) * accum])
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    shutil.rmtree(out, ignore_errors=True)
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "loss_first_window": losses[0],
            "final_loss": losses[-1], "optim": str(getattr(targs.optim, "value", targs.optim))}


def packed_examples(args: argparse.Namespace, data_dir: Path) -> list[dict[str, torch.Tensor]]:
    """The rows steelworks will train on, in its order: replay its own PackedLoader."""
    from steelworks.train.data import PackedLoader

    loader = PackedLoader(data_dir, 0, 1, args.micro_batch, args.grad_accum, seed=0)  # = cfg.seed
    out = []
    for _ in range(args.warmup + args.steps):
        for b in loader.next_step():
            # Pretraining rows: labels are input_ids shifted by one, so this is the full row.
            rows = torch.cat([b.input_ids, b.labels[:, -1:]], dim=1)
            out += [{"input_ids": r, "labels": r} for r in rows]
    return out


def run_padded(args: argparse.Namespace, size: str, init_dir: Path, tok: Any,
               docs: list[dict[str, Any]], hf_config: Any) -> dict[str, Any]:
    """The unpacked HF recipe; its FLOPs per token at the mean document length."""
    from transformers import DataCollatorForLanguageModeling

    from steelworks.train.metrics import flops_per_token

    collate, counts = counting_collator(DataCollatorForLanguageModeling(tok, mlm=False))
    result = run_hf(args, size, init_dir, docs, collate, False, counts)
    mean_len = sum(len(d["input_ids"]) for d in docs) / len(docs)
    return {**result, "flops_per_token": flops_per_token(hf_config, round(mean_len))}


def counting_collator(collate: Callable) -> tuple[Callable, list[int]]:
    """Wrap a padding collator to record each batch's non-pad tokens, in build order."""
    counts: list[int] = []

    def counting(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate(features)
        counts.append(int(batch["attention_mask"].sum()))
        return batch

    return counting, counts


def machine_info(device: str) -> dict[str, Any]:
    import transformers

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": _version("accelerate"), "date": time.strftime("%Y-%m-%d %H:%M")}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(__import__(module), "__version__", "?")


def save_cost(args: argparse.Namespace, tok_dir: Path, data_dir: Path, tok: Any) -> dict[str, Any]:
    """The step-time cost of a checkpoint save, synchronous against asynchronous
    (``train.async_checkpoint``): the same timed steps without mid-run saves, then with one
    every ``--save-every`` steps each way; cost per save = extra seconds / number of saves.
    Interleaved over ``--repeats``; the fastest run of each counts."""
    from steelworks.train.models import build_hf_config

    out: dict[str, Any] = {}
    for size in args.sizes:
        hf_config = build_hf_config(train_config(args, size).model, len(tok), tok.pad_token_id,
                                    tok.eos_token_id)
        init_dir = save_initial_model(hf_config, 0, WORK / "runs" / size / "init")
        # saves inside the timed window (steps warmup+1 .. warmup+steps), the last one excluded
        saves = len([s for s in range(args.warmup + 1, args.warmup + args.steps)
                     if s % args.save_every == 0])
        modes = {"no save": (0, None), "sync": (args.save_every, False), "async": (args.save_every, True)}
        runs: dict[str, list[float]] = {m: [] for m in modes}
        for rep in range(args.repeats):
            for mode, (every, use_async) in modes.items():
                print(f"--- {size}: save cost, {mode} ({rep + 1}/{args.repeats})", file=sys.stderr, flush=True)
                r = run_steelworks(args, size, tok_dir, data_dir, init_dir, every, use_async,
                                   tag=f"save-{mode.replace(' ', '-')}")
                runs[mode].append(r["seconds"])
        shutil.rmtree(init_dir, ignore_errors=True)
        best = {m: min(v) for m, v in runs.items()}
        step = best["no save"] / args.steps
        row = {"saves": saves, "step_s": step, "seconds": best, "all_seconds": runs}
        for mode in ("sync", "async"):
            row[f"{mode}_s_per_save"] = (best[mode] - best["no save"]) / max(saves, 1)
        out[size] = row
        print(f"{size}: step {step * 1e3:.1f} ms; per save: sync {row['sync_s_per_save'] * 1e3:.1f} ms, "
              f"async {row['async_s_per_save'] * 1e3:.1f} ms ({saves} saves in {args.steps} steps)",
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "demo"], help="steelworks.train.models sizes")
    ap.add_argument("--steps", type=int, default=40, help="timed optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per micro step")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per packed row")
    ap.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary to train (the demo "
                    "corpus saturates near 6.8k; the model uses what the tokenizer reaches)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--no-padded", action="store_true", help="skip the unpacked HF baseline")
    ap.add_argument("--repeats", type=int, default=1, help="runs per side, interleaved; the "
                    "fastest counts (for busy machines)")
    ap.add_argument("--save-every", type=int, default=0,
                    help="also measure the step-time cost of a checkpoint save every N steps, "
                         "synchronous vs asynchronous (train.async_checkpoint)")
    ap.add_argument("--save-cost-only", action="store_true",
                    help="with --save-every: skip the throughput comparison")
    args = ap.parse_args()
    if min(args.warmup, args.steps, args.repeats) < 1:
        ap.error("--warmup, --steps and --repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU")
    from transformers import default_data_collator

    from steelworks.core.atomic import atomic_write_json
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.metrics import flops_per_token, peak_flops
    from steelworks.train.models import build_hf_config

    command = shlex.join([sys.executable, *sys.argv])
    peak = peak_flops(args.device)  # cached: the loop's MFU uses this same figure
    tok_dir, data_dir, docs = build_data(args.vocab, args.seq_len)
    tok = load_tokenizer(tok_dir)
    have_hf = importlib.util.find_spec("accelerate") is not None  # Trainer needs accelerate
    if not have_hf:
        print("accelerate is not installed: skipping the HF Trainer rows", file=sys.stderr)
    packed = packed_examples(args, data_dir) if have_hf else []
    # Unpacked documents, truncated to seq_len; non-pad tokens counted per micro batch.
    doc_ids = tok(docs, add_special_tokens=False, truncation=True, max_length=args.seq_len)["input_ids"]
    unpacked = [{"input_ids": ids} for ids in doc_ids if len(ids) > 1]

    results: dict[str, Any] = {"command": command, "machine": machine_info(args.device),
                               "peak_flops": peak, "vocab": len(tok), "args": vars(args), "sizes": {}}
    for size in ([] if args.save_cost_only else args.sizes):
        hf_config = build_hf_config(train_config(args, size).model, len(tok), tok.pad_token_id,
                                    tok.eos_token_id)
        fpt = flops_per_token(hf_config, args.seq_len - 1)
        init_dir = save_initial_model(hf_config, 0, WORK / "runs" / size / "init")
        sides: dict[str, Callable[[], dict[str, Any]]] = {
            "steelworks": partial(run_steelworks, args, size, tok_dir, data_dir, init_dir),
            # the model alone, ours vs transformers', through one identical training step
            "our-model-step": partial(run_model_step, args, size, init_dir, data_dir, "ours"),
            "hf-model-step": partial(run_model_step, args, size, init_dir, data_dir, "hf")}
        if have_hf:
            sides["hf-trainer"] = partial(run_hf, args, size, init_dir, packed, default_data_collator,
                                          True, [args.micro_batch * (args.seq_len - 1)] * len(packed))
            if not args.no_padded:
                sides["hf-padded"] = partial(run_padded, args, size, init_dir, tok, unpacked, hf_config)
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for rep in range(args.repeats):  # interleaved: a spell of outside load hits every side
            for side, run in sides.items():
                print(f"--- {size}: {side} ({rep + 1}/{args.repeats})", file=sys.stderr, flush=True)
                runs[side].append(run())
        # The fastest run of each side: the one least disturbed by anything else on the machine.
        rows = {side: {**max(rs, key=lambda r: r["tokens_per_s"]),
                       "all_tokens_per_s": [r["tokens_per_s"] for r in rs]} for side, rs in runs.items()}
        shutil.rmtree(init_dir, ignore_errors=True)
        sw = rows["steelworks"]["tokens_per_s"]
        for r in rows.values():
            r["mfu"] = r["tokens_per_s"] * r.get("flops_per_token", fpt) / peak
            r["steelworks_over_this"] = sw / r["tokens_per_s"]
        results["sizes"][size] = rows
    atomic_write_json(WORK / "results.json", results)
    if args.save_every:
        results["save_cost"] = save_cost(args, tok_dir, data_dir, tok)
        atomic_write_json(WORK / "results.json", results)

    m = results["machine"]
    print(f"\n{command}\n{m.get('gpu', m['cpu'])}, {m['cores']} cores, {m['torch_threads']} torch "
          f"threads, torch {m['torch']}, transformers {m['transformers']}; {args.precision}, "
          f"{args.micro_batch}x{args.grad_accum} sequences of {args.seq_len} tokens per step, "
          f"vocab {len(tok)}; {args.steps} timed steps after {args.warmup}, best of {args.repeats}; "
          f"MFU against {peak / 1e12:.3g} TFLOP/s peak\n")
    print("| size | side | tokens/s | MFU | steelworks / this | loss, first window |")
    print("|---|---|---:|---:|---:|---:|")
    for size, rows in results["sizes"].items():
        for side, r in rows.items():
            label = side + (" (different workload: unpacked, non-pad tokens)" if side == "hf-padded" else "")
            print(f"| {size} | {label} | {r['tokens_per_s']:,.0f} | {r['mfu']:.3f} | "
                  f"{r['steelworks_over_this']:.2f}x | {r['loss_first_window']:.4f} |")
    for size, rows in results["sizes"].items():
        if "our-model-step" in rows and "hf-model-step" in rows:
            print(f"{size}: our model / transformers' model, same step: "
                  f"{rows['our-model-step']['tokens_per_s'] / rows['hf-model-step']['tokens_per_s']:.2f}x")
    print(f"\nresults: {WORK / 'results.json'}")


if __name__ == "__main__":
    main()
