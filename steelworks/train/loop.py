"""The training loop: one plain function for pretraining, SFT and DPO.

``train_loop(job)`` runs as a Ray Train worker (the normal path, see ``driver.py``), under
``torchrun`` (``python -m steelworks.train.loop job.json``), or in one process. It reads the
process group from its environment and never decides how it was launched.

Loss averaging: with per-token averaging every target token in the global batch weighs
the same; with per-sample averaging every sequence does (short answers are not drowned out
by long ones). FSDP averages gradients over ranks, so each rank scales its local sum by
``world / global_count`` to make the result exactly the global mean.

DPO (``task: dpo``) swaps two parts and keeps the rest (model building, LoRA, FSDP2,
checkpoints, resume, metrics, export): the loader yields preference pairs with their stored
reference log-probs (``train/pairs.py``) instead of packed rows, and the step is
``dpo.dpo_forward_backward``, whose loss is the mean over the global batch of pairs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from steelworks.core import faults
from steelworks.core.config import ConfigError, from_dict
from steelworks.train.checkpoint import (
    AsyncCheckpointer,
    export_hf,
    fetch_checkpoint,
    latest_checkpoint,
    latest_remote_checkpoint,
    load_checkpoint,
    run_lock,
    save_checkpoint,
)
from steelworks.train.config import DpoConfig, TrainConfig
from steelworks.train.data import Batch, PackedLoader
from steelworks.train.metrics import MetricsLog, flops_per_token, peak_flops, truncate_log
from steelworks.train.parallelize import device_mesh, materialize, parallelize
from steelworks.train.remote import (
    checkpoints_remote,
    fetch_inputs,
    ray_checkpoint,
    upload_metrics,
    upload_outputs,
)
from steelworks.train.schedule import Schedule

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


def _loss_terms(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (sum of per-token CE, sum over samples of each sample's mean CE) for a micro batch.

    A sample is a row, or a packed sample (segment) when the batch has ``sample_ids``. The
    definition of the two losses; the loop computes them as ``sum(w * CE)`` with
    ``_token_weights`` (tests/test_train.py checks that the two agree)."""
    labels = batch.labels.to(logits.device)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                         ignore_index=-100, reduction="none").view(labels.shape)
    sample = _sample_index(batch).to(logits.device)
    n = int(sample.max()) + 1
    sums = torch.zeros(n, device=logits.device).index_add_(0, sample.reshape(-1), ce.reshape(-1))
    counts = torch.bincount(sample.reshape(-1), minlength=n)
    per_sample = sums[1:] / counts[1:].clamp(min=1)  # index 0 collects the non-targets
    return ce.sum(), per_sample[counts[1:] > 0].sum()


def _token_weights(batch: Batch, mode: str) -> torch.Tensor:
    """Per-position loss weights such that sum(w * CE) is what ``_loss_terms`` returns for
    ``mode``: 1 per target (token), or 1 / (its sample's target count) (sample)."""
    targets = (batch.labels != -100).float()
    if mode == "token":
        return targets
    sample = _sample_index(batch)
    counts = torch.bincount(sample.reshape(-1)).float()
    return targets / counts[sample].clamp(min=1)


def _sample_index(batch: Batch) -> torch.Tensor:
    """A distinct id > 0 per (row, sample) for every target position, 0 elsewhere."""
    ids = batch.sample_ids if batch.sample_ids is not None else (batch.labels != -100).long()
    width = int(ids.max()) + 1
    rows = torch.arange(ids.size(0)).unsqueeze(1)
    return torch.where(ids > 0, rows * width + ids, 0)


def _num_samples(batch: Batch) -> int:
    return int(torch.unique(_sample_index(batch)).gt(0).sum())


def _peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def _resume_point(ckpt_dir: Path, job: dict[str, Any]) -> tuple[Path | None, Path | None]:
    """(the newest complete checkpoint, the one Ray Train last had reported): Ray's (what a
    restart after a worker failure is handed) or a newer complete one on disk (in the bucket,
    when the run is in one), whichever is later. Both as paths in ``ckpt_dir``."""
    remote = checkpoints_remote(job)
    if remote is None:
        found = latest_checkpoint(ckpt_dir)
    else:
        found = ckpt_dir / name if (name := latest_remote_checkpoint(remote)) else None
    reported = None
    if job.get("ray"):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        reported = ckpt_dir / Path(ckpt.path).name if ckpt is not None else None
        if reported is not None and (found is None or reported.name > found.name):
            found = reported
    return found, reported


def agree_resume_point(ckpt_dir: Path, job: dict[str, Any], rank: int,
                       stack: contextlib.ExitStack) -> tuple[Path | None, bool]:
    """(the checkpoint every rank resumes from, whether Ray Train has yet to be told of it),
    chosen once. Rank 0 first takes ``run_lock`` (held on ``stack`` until the loop ends), so a
    dying worker of an earlier run has stopped renaming and pruning; then it removes the
    ``.tmp`` leftovers of saves that never completed, picks, and broadcasts. Ranks scanning
    the directory each on their own could pick different steps while that worker still
    wrote, and hang on a mismatched collective or mix weights of two steps.

    A checkpoint renamed but not reported (the process died in between) is unknown to Ray
    Train, which prunes only what was reported: it would stay forever. The loop reports the
    resume point when it is such a one, so Ray prunes it in turn."""
    chosen: list[Any] = [None, False]
    if rank == 0:
        stack.enter_context(run_lock(ckpt_dir))
        for tmp in ckpt_dir.glob("step_*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        path, reported = _resume_point(ckpt_dir, job)
        chosen = [str(path) if path is not None else None,
                  bool(job.get("ray")) and path is not None and path != reported]
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    path = Path(chosen[0]) if chosen[0] is not None else None
    if path is not None and (remote := checkpoints_remote(job)) is not None:
        fetch_checkpoint(remote, path.name, ckpt_dir)  # every rank, onto its own node
    return path, bool(chosen[1])


def train_loop(job: dict[str, Any]) -> dict[str, Any]:
    """Train as ``job`` says (see the module docstring); returns the final metrics."""
    with contextlib.ExitStack() as stack:  # holds rank 0's run_lock until the loop ends
        return _train_loop(job, stack)


def _data_and_step(job: dict[str, Any], cfg: TrainConfig, rank: int, world: int):
    """-> (the loader, the step function): packed rows and the LM loss (pretrain, SFT), or
    preference pairs and the DPO loss, behind one interface each."""
    if job.get("task") != "dpo":
        return PackedLoader([job["data_dir"], *cfg.extra_data], rank, world, cfg.micro_batch_size,
                            cfg.grad_accum, cfg.seed), _forward_backward
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.dpo import dpo_forward_backward
    from steelworks.train.pairs import PairLoader

    pad = load_tokenizer(job["tokenizer_dir"]).pad_token_id
    return PairLoader(job["data_dir"], rank, world, cfg.micro_batch_size, cfg.grad_accum,
                      cfg.seed, pad, cfg.max_length), dpo_forward_backward


def _build_model(job: dict[str, Any], cfg: TrainConfig, device: torch.device, bf16: bool):
    """-> (our decoder, sharded and on ``device``, its parameter count, how many of them
    train). With ``cfg.lora`` the adapters go on after loading and before sharding."""
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.hf_io import from_hf
    from steelworks.train.model import build_decoder
    from steelworks.train.models import count_params, decoder_config

    if cfg.lora is not None and not job.get("init_from"):
        raise ConfigError(
            f"train.lora is set, but the {job.get('task', 'train')} run starts from scratch (no "
            "init_from): LoRA adapts a trained base model and would train adapters on random "
            "weights. Use lora on a stage that starts from an HF model (sft: its init_from is "
            "the pretrain stage's hf/), or remove lora to train every weight.")
    if job.get("init_from"):
        # Fine-tuning: every rank loads the same HF checkpoint, then FSDP2 shards it. On
        # resume this re-reads the base too: a LoRA checkpoint holds the adapters only.
        model = from_hf(job["init_from"], device)
        n_params = count_params(model)  # before a 4-bit base packs two weights per byte
        if cfg.lora is not None:
            from steelworks.train.lora import apply_lora

            if cfg.lora.quantize == "4bit":  # QLoRA: the frozen projections in NF4
                from steelworks.train.quantize import quantize_base

                quantize_base(model, device, torch.bfloat16 if bf16 else torch.float32)
            apply_lora(model, cfg.lora)  # before parallelize: fully_shard sees the LoRA layers
            n_params += sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        # From scratch: built on meta, sharded, then only each rank's shard is allocated.
        tok = load_tokenizer(job["tokenizer_dir"])
        model = build_decoder(decoder_config(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id), "meta")
        n_params = count_params(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.info("parameters: %s trainable of %s (%.2f%%)%s", f"{n_trainable:,}", f"{n_params:,}",
                 100 * n_trainable / max(n_params, 1),
                 "" if cfg.lora is None else ", QLoRA (4-bit base)" if cfg.lora.quantize else ", LoRA")
    world = dist.get_world_size() if dist.is_initialized() else 1
    replicate, shard = cfg.parallel.mesh_shape(world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if replicate > 1 and (not dist.is_initialized() or dist.get_rank() == 0):
        log.info("HSDP: %d replica group(s) of %d shard rank(s)", replicate, shard)
    model = parallelize(model, bf16=bf16, activation_checkpointing=cfg.activation_checkpointing,
                        compile=cfg.compile, mesh=device_mesh(replicate, shard, device.type))
    if not job.get("init_from"):
        materialize(model, device, cfg.seed)
    return model, n_params, n_trainable


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused) over the parameters that train (with LoRA, the adapters only: frozen
    ones get no state); no weight decay on norms, biases and other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.optim.lr,
                             betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=True)


def _save(job: dict[str, Any], step: int, rank: int, model, optimizer, extra: dict[str, Any],
          checkpointer: AsyncCheckpointer | None, ckpt_dir: Path, keep_last: int | None,
          last_step: bool) -> list[Path]:
    """Save step ``step`` (in the background with ``checkpointer``); -> the checkpoints
    committed by this call (an async save commits the previous one, the last step waits)."""
    # Tests only (core.faults): the process killed mid-save, before or after the commit.
    armed = job.get("faults")
    hooks = {"before_commit": functools.partial(faults.fire, armed, "train.save", step=step, rank=rank),
             "after_commit": functools.partial(faults.fire, armed, "train.committed", step=step, rank=rank)}
    if checkpointer is None:
        saved = [save_checkpoint(ckpt_dir, step, model, optimizer, extra, keep_last=keep_last,
                                 remote=checkpoints_remote(job), **hooks)]
    else:
        saved = []
        inflight = functools.partial(faults.fire, armed, "train.save_inflight", step=step, rank=rank)
        if (done := checkpointer.save(step, model, optimizer, extra, after_launch=inflight, **hooks)):
            saved.append(done)
        if last_step and (done := checkpointer.wait()) is not None:
            saved.append(done)
    if saved and rank == 0:
        upload_metrics(job)  # beside the checkpoint in the bucket, when the run is there
    return saved


def _resume(resume: Path, model, optimizer, scheduler, schedule: Schedule, loader: PackedLoader,
            total_steps: int, rank: int, metrics_path: Path) -> int:
    """Restore everything from checkpoint ``resume``; -> its step."""
    meta = load_checkpoint(resume, model, optimizer)
    step = meta["step"]
    if step > total_steps:
        raise ValueError(f"{resume} is at step {step}, past this run's {total_steps} steps "
                         "(max_steps, or epochs x steps per epoch): a run is not shortened "
                         "below what it trained; raise the steps or restart the stage")
    scheduler.load_state_dict(meta["scheduler"])
    # The plan the checkpoint trained with, re-planned without a jump when the run was
    # extended (or cut, not below its step): train/schedule.py states the rule.
    schedule.load_state(meta.get("schedule"))
    extended = schedule.extend(step, total_steps)
    loader.load_state_dict(meta["loader"])
    if rank == 0:
        truncate_log(metrics_path, step)
        log.info("resumed from %s at step %d", resume, step)
        if extended:
            log.info("%s", extended)
        if loader.appended:
            log.info("appended %d shard(s): %s", len(loader.appended), ", ".join(loader.appended))
    return step


def _forward_backward(model, micro: list[Batch], cfg: TrainConfig, world: int, device: torch.device,
                      bf16: bool) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    """One optimizer step's forward and backward passes over its micro batches; -> (the
    summed loss terms, detached, the global denominator they average over, and no further
    statistics: ``dpo.dpo_forward_backward`` has the same shape and returns some)."""
    counts = torch.tensor([sum(b.num_targets for b in micro), sum(_num_samples(b) for b in micro)],
                          dtype=torch.float64)
    g_tokens, g_samples = _all_reduce(counts.to(device)).tolist()
    denom = g_tokens if cfg.loss_avg == "token" else g_samples
    no_sync = cfg.grad_accum > 1 and hasattr(model, "set_requires_gradient_sync")
    total = torch.zeros((), device=device, dtype=torch.float64)
    for i, b in enumerate(micro):
        if no_sync:
            # Reduce-scatter the gradients once per optimizer step, after the last micro
            # batch, not after each (FSDP2 accumulates them unsharded meanwhile).
            model.set_requires_gradient_sync(i == len(micro) - 1)
        pos = b.position_ids.to(device) if b.position_ids is not None else None
        # The model returns sum(w * CE) over the micro batch; the weights make it the
        # per-token or per-sample loss (``_token_weights``), with or without the fused
        # LM head (train.kernels "ce": then the logits never exist).
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            part = model(b.input_ids.to(device), position_ids=pos, labels=b.labels.to(device),
                         loss_weights=_token_weights(b, cfg.loss_avg).to(device))
        # FSDP averages gradients over ranks: scale the local sum so the result is the
        # exact global mean.
        (part * world / max(denom, 1)).backward()
        total += part.detach().double()
    return total, denom, {}


class _LogWindow:
    """What one metrics row covers: the loss averaged over the whole log window (one batch
    alone is too noisy to read), and tokens/s and MFU over its wall time. ``stats`` are
    further sums over the same denominator (DPO's rewards and margins)."""

    def __init__(self, device: torch.device, flops: float) -> None:
        self.device, self.flops = device, flops  # flops: FLOPs per token / peak FLOP/s
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.stats: dict[str, torch.Tensor] = {}
        self.denom, self.tokens, self.start = 0.0, 0, time.perf_counter()

    def add(self, loss_sum: torch.Tensor, denom: float, tokens: int,
            stats: dict[str, torch.Tensor] | None = None) -> None:
        self.loss_sum += loss_sum
        self.denom += denom
        self.tokens += tokens
        for k, v in (stats or {}).items():
            self.stats[k] = self.stats.get(k, torch.zeros_like(v)) + v

    def row(self, step: int, lr: float, grad_norm: float, epoch: int) -> dict[str, Any]:
        """The row for ``step`` (loss and stats all-reduced over ranks); starts a new window."""
        names = sorted(self.stats)
        sums = _all_reduce(torch.stack([self.loss_sum, *(self.stats[k] for k in names)]))
        means = (sums / max(self.denom, 1)).tolist()
        tps = self.tokens / (time.perf_counter() - self.start)
        self.loss_sum.zero_()
        self.stats = {}
        self.denom, self.tokens, self.start = 0.0, 0, time.perf_counter()
        return {"step": step, "loss": means[0], "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tps, "mfu": tps * self.flops, "epoch": epoch,
                "memory_gb": _peak_memory_gb(self.device), **dict(zip(names, means[1:], strict=True))}


def _progress_bar(job: dict[str, Any], total_steps: int, step: int):
    """Rank 0's progress bar on stderr, starting at ``step`` (a resumed run's)."""
    from tqdm import tqdm

    return tqdm(total=total_steps, initial=step, desc=job.get("task", "train"), unit="step",
                file=sys.stderr, dynamic_ncols=True)


def _train_loop(job: dict[str, Any], stack: contextlib.ExitStack) -> dict[str, Any]:
    from steelworks.train.hf_io import hf_config

    cfg = from_dict(DpoConfig if job.get("task") == "dpo" else TrainConfig, job["train"])
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world, device = _init_distributed(cfg.use_gpu)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    fetch_inputs(job, rank)  # a run in a bucket: what this node reads, into its mirror
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    # Before seeding: on CPU the first call in a process measures with random matrices, which
    # would shift the random stream training draws from (LoRA dropout) by the process's past.
    peak = peak_flops(device.type) * world
    torch.manual_seed(cfg.seed)

    model, n_params, n_trainable = _build_model(job, cfg, device, bf16)
    model_cfg = model.config
    kernels = model.use_kernels(cfg.kernels, device)
    model.train()

    loader, step_fn = _data_and_step(job, cfg, rank, world)
    total_steps = cfg.max_steps
    if cfg.epochs is not None:
        total_steps = max(1, int(cfg.epochs * loader.steps_per_epoch))
    optimizer = _optimizer(model, cfg)
    # A closure over a Schedule object (not the object itself): LambdaLR's state_dict would
    # save a callable object's fields and its load_state_dict overwrite a resumed run's new
    # plan with the checkpoint's. The schedule is saved on its own, in the checkpoint's meta.
    schedule = Schedule(total_steps, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s))

    ckpt_dir = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    resume, adopt = agree_resume_point(ckpt_dir, job, rank, stack)
    step = 0 if resume is None else _resume(resume, model, optimizer, scheduler, schedule, loader,
                                             total_steps, rank, metrics_path)
    metrics = MetricsLog(metrics_path, enabled=rank == 0,
                         tensorboard_dir=out_dir / "tensorboard" if cfg.tensorboard else None,
                         wandb_project=cfg.wandb_project, run_name=job.get("task", "train"),
                         config=job["train"])
    report = _reporter(job)
    if adopt:  # renamed by a run that died before reporting it (agree_resume_point)
        report({"step": step}, resume)

    fpt = flops_per_token(hf_config(model_cfg), loader.seq_len)
    progress = _progress_bar(job, total_steps, step) if rank == 0 else None
    last: dict[str, Any] = {}
    # Under Ray Train, CheckpointConfig(num_to_keep) prunes what was reported.
    keep_last = None if job.get("ray") else cfg.keep_last
    use_async = cfg.async_checkpoint if cfg.async_checkpoint is not None else device.type == "cuda"
    checkpointer = AsyncCheckpointer(ckpt_dir, keep_last, device, checkpoints_remote(job)) \
        if use_async else None
    window = _LogWindow(device, flops=fpt / peak)
    while step < total_steps:
        micro = loader.next_step()
        part_sum, denom, stats = step_fn(model, micro, cfg, world, device, bf16)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        faults.fire(job.get("faults"), "train.step", step=step, rank=rank)  # tests only
        window.add(part_sum, denom, sum(b.input_ids.numel() for b in micro) * world, stats)
        if progress is not None:
            progress.update(1)
        row: dict[str, Any] | None = None
        if step % cfg.log_every == 0 or step == total_steps:
            row = last = window.row(step, scheduler.get_last_lr()[0], float(grad_norm), loader.epoch)
            metrics.log(last)
            if progress is not None:
                progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
        # Checkpoints committed this step (an async save finishes a later step than it
        # started); each is reported to Ray Train with this step's metrics.
        saved: list[Path] = []
        if checkpointer is not None and (done := checkpointer.poll()) is not None:
            saved.append(done)
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == total_steps:
            extra = {"scheduler": scheduler.state_dict(), "schedule": schedule.state(),
                     "loader": loader.state_dict(), "config": job["train"]}
            saved += _save(job, step, rank, model, optimizer, extra, checkpointer, ckpt_dir,
                           keep_last, step == total_steps)
        if row is not None and not saved:
            report(row, None)
        for i, ckpt in enumerate(saved):
            report((row or {"step": step}) if i == len(saved) - 1 else {"step": step}, ckpt)
    if progress is not None:
        progress.close()
    _export(job, cfg, model, model_cfg, out_dir)
    metrics.plot(out_dir / "loss.png", f"{job.get('task', 'train')} loss")
    metrics.close()
    summary = {"final_step": step, "params": n_params, "trainable_params": n_trainable,
               "world_size": world, "kernels": kernels,
               "flops_per_token": fpt, **{k: v for k, v in last.items() if k != "step"}}
    if rank == 0:
        from steelworks.core.atomic import atomic_write_json

        atomic_write_json(out_dir / "summary.json", summary)
        upload_outputs(job)  # a run in a bucket: hf/, adapter/ and the reports, for the driver
    return summary


def _export(job: dict[str, Any], cfg: TrainConfig, model, model_cfg, out_dir: Path) -> None:
    """``hf/``, always a plain HF model (with LoRA: merged, W + (alpha/r)·B·A), so eval and
    serve read any train stage alike; with ``lora.save_adapter`` also ``adapter/``, peft's
    format for the base in ``init_from``. Every rank calls both (the gathers are collective)."""
    # A 4-bit base is merged from the full-precision weights it was quantized from.
    quantized = cfg.lora is not None and cfg.lora.quantize is not None
    export_hf(model, model_cfg, job["tokenizer_dir"], out_dir / "hf",
              base_dir=job["init_from"] if quantized else None)
    if cfg.lora is not None and cfg.lora.save_adapter:
        from steelworks.train.lora import save_adapter

        save_adapter(model, cfg.lora, out_dir / "adapter", Path(job["init_from"]).resolve())


def _reporter(job: dict[str, Any]):
    """Ray Train's report when running under it (every rank calls it: it is a barrier);
    a no-op otherwise. Checkpoints are written by DCP straight into the run's storage
    directory, so Ray registers them where they are (NO_UPLOAD) instead of copying."""
    if not job.get("ray"):
        return lambda metrics, checkpoint=None: None
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    remote = checkpoints_remote(job)

    def report(metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        ckpt = None
        if checkpoint is not None and ray.train.get_context().get_world_rank() == 0:
            ckpt = Checkpoint.from_directory(str(checkpoint)) if remote is None \
                else ray_checkpoint(remote, checkpoint.name)
        ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=ckpt,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    return report


if __name__ == "__main__":  # torchrun --nproc-per-node N -m steelworks.train.loop job.json
    train_loop(json.loads(Path(sys.argv[1]).read_text()))
