"""The training loop: one plain function for pretraining and SFT.

``train_loop(job)`` runs as a Ray Train worker (the normal path, see ``driver.py``), under
``torchrun`` (``python -m steelworks.train.loop job.json``), or in one process. It reads the
process group from its environment and never decides how it was launched.

Loss averaging: with per-token averaging every target token in the global batch weighs
the same; with per-sample averaging every sequence does (short answers are not drowned out
by long ones). FSDP averages gradients over ranks, so each rank scales its local sum by
``world / global_count`` to make the result exactly the global mean.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from steelworks.platform.config import from_dict
from steelworks.train.checkpoint import (
    export_hf,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from steelworks.train.config import TrainConfig
from steelworks.train.data import Batch, PackedLoader
from steelworks.train.metrics import MetricsLog, flops_per_token, peak_flops, truncate_log
from steelworks.train.parallelize import parallelize
from steelworks.train.schedule import lr_multiplier

log = logging.getLogger("steelworks.train")


def _init_distributed(use_gpu: bool) -> tuple[int, int, torch.device]:
    """Join the process group Ray Train/torchrun set up (or start one from torchrun's env)."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if use_gpu and torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if use_gpu and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def _loss_terms(logits: torch.Tensor, batch: Batch, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (sum of per-token CE, sum of per-sample mean CE) over this micro batch."""
    labels = batch.labels.to(logits.device)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                         ignore_index=-100, reduction="none").view(labels.shape)
    per_sample_tokens = (labels != -100).sum(1)
    per_sample = ce.sum(1) / per_sample_tokens.clamp(min=1)
    return ce.sum(), per_sample[per_sample_tokens > 0].sum()


def train_loop(job: dict[str, Any]) -> dict[str, Any]:
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.models import build_hf_config, build_model, count_params, load_model

    cfg = from_dict(TrainConfig, job["train"])
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world, device = _init_distributed(cfg.use_gpu)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    torch.manual_seed(cfg.seed)

    # Every rank builds the same full model under the same seed (or loads the same HF
    # checkpoint), then FSDP2 shards it: identical initial weights however many ranks.
    tok = load_tokenizer(job["tokenizer_dir"])
    if job.get("init_from"):
        model = load_model(job["init_from"])
        hf_config = model.config
    else:
        hf_config = build_hf_config(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id)
        model = build_model(hf_config, seed=cfg.seed)
    model = model.to(device)
    n_params = count_params(model)
    model = parallelize(model, bf16=bf16, activation_checkpointing=cfg.activation_checkpointing,
                        compile=cfg.compile)
    model.train()

    loader = PackedLoader(job["data_dir"], rank, world, cfg.micro_batch_size, cfg.grad_accum, cfg.seed)
    total_steps = cfg.max_steps
    if cfg.epochs is not None:
        total_steps = max(1, int(cfg.epochs * loader.steps_per_epoch))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, cfg.optim))

    ckpt_dir = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    step = 0
    resume = latest_checkpoint(ckpt_dir)
    if resume is not None:
        meta = load_checkpoint(resume, model, optimizer)
        step = meta["step"]
        scheduler.load_state_dict(meta["scheduler"])
        loader.load_state_dict(meta["loader"])
        if rank == 0:
            truncate_log(metrics_path, step)
            log.info("resumed from %s at step %d", resume, step)
    metrics = MetricsLog(metrics_path, enabled=rank == 0)
    report = _reporter(job)

    fpt = flops_per_token(hf_config, loader.index.seq_len - 1)
    peak = peak_flops(device.type) * world
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=step, desc=job.get("task", "train"),
                        unit="step", file=sys.stderr, dynamic_ncols=True)
    last = {}
    t_log, tokens_since = time.perf_counter(), 0
    # The logged loss averages the whole log window (one batch alone is too noisy to read).
    window_sum = torch.zeros((), device=device, dtype=torch.float64)
    window_denom = 0.0
    while step < total_steps:
        micro = loader.next_step()
        counts = torch.tensor([sum(b.num_targets for b in micro),
                               sum(int((b.labels != -100).any(1).sum()) for b in micro)], dtype=torch.float64)
        g_tokens, g_samples = _all_reduce(counts.to(device)).tolist()
        denom = g_tokens if cfg.loss_avg == "token" else g_samples
        for b in micro:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=b.input_ids.to(device)).logits
            tok_sum, sample_sum = _loss_terms(logits, b, cfg.loss_avg)
            part = tok_sum if cfg.loss_avg == "token" else sample_sum
            (part * world / max(denom, 1)).backward()
            window_sum += part.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        window_denom += denom
        tokens_since += sum(b.input_ids.numel() for b in micro) * world
        if progress is not None:
            progress.update(1)
        if step % cfg.log_every == 0 or step == total_steps:
            loss = (_all_reduce(window_sum) / max(window_denom, 1)).item()
            window_sum.zero_()
            window_denom = 0.0
            elapsed = time.perf_counter() - t_log
            tps = tokens_since / elapsed
            last = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm), "tokens_per_s": tps,
                    "mfu": tps * fpt / peak, "epoch": loader.epoch,
                    "memory_gb": (torch.cuda.max_memory_allocated() / 1e9) if device.type == "cuda" else None}
            metrics.log(last)
            if progress is not None:
                progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
            report(last)
            t_log, tokens_since = time.perf_counter(), 0
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == total_steps:
            save_checkpoint(ckpt_dir, step, model, optimizer,
                            {"scheduler": scheduler.state_dict(), "loader": loader.state_dict(),
                             "config": job["train"]}, keep_last=cfg.keep_last)
    if progress is not None:
        progress.close()
    export_hf(model, hf_config, job["tokenizer_dir"], out_dir / "hf")
    metrics.plot(out_dir / "loss.png", f"{job.get('task', 'train')} loss")
    summary = {"final_step": step, "params": n_params, "world_size": world,
               "flops_per_token": fpt, **{k: v for k, v in last.items() if k != "step"}}
    if rank == 0:
        from steelworks.platform.atomic import atomic_write_json

        atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _reporter(job: dict[str, Any]):
    """Ray Train's report when running under it; a no-op otherwise."""
    if not job.get("ray"):
        return lambda metrics: None
    import ray.train

    return lambda metrics: ray.train.report({k: v for k, v in metrics.items() if v is not None})


if __name__ == "__main__":  # torchrun --nproc-per-node N -m steelworks.train.loop job.json
    train_loop(json.loads(Path(sys.argv[1]).read_text()))
