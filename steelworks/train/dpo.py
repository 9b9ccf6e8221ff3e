"""DPO core: sequence log-probabilities, the preference loss, and the metrics TRL logs.

Direct Preference Optimization (Rafailov et al. 2023) trains a policy on (prompt, chosen,
rejected) triples against a frozen reference model, with no reward model and no sampling:
the loss depends only on four summed log-probabilities per pair. These are pure functions of
tensors, so the train loop (one loop for pretrain/SFT/DPO, docs/architecture.md principle 10) decides
how it batches the chosen and rejected sequences and where the reference log-probs come from
(a frozen copy, or precomputed once).

Conventions:

- ``sequence_logps`` takes logits and labels that are ALREADY ALIGNED: the logits at
  position t score labels[t]. For a causal LM over ``input_ids`` that means
  ``logits[:, :-1]``, ``labels = input_ids[:, 1:]`` and ``mask = completion_mask[:, 1:]``
  (the shift happens once, at the caller, and never twice).
- The margin is ``h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)``; rewards are
  ``beta * (policy - reference)``, detached: they are metrics, not a path for gradients.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "ipo"]
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of ``log p(labels[t] | logits[t])`` -> ``[B]`` float32.

    ``logits`` is ``[B, T, V]``; ``labels`` and ``loss_mask`` are ``[B, T]``, aligned with the
    logits (position t predicts labels[t]; see the module docstring). Labels under a 0 mask
    are never read, so they may hold -100 or padding.

    The log-softmax is taken in float32 because a bf16 log-softmax over a large vocabulary
    loses ~2-3 significant digits per token, and DPO subtracts two sums of hundreds of such
    terms -- the error would swamp the margin. It is computed as
    ``logit[label] - logsumexp(logits)``, which is log_softmax at the label without
    materialising a second ``[B, T, V]`` float32 tensor of log-probabilities.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != labels.shape:
        raise ValueError(f"sequence_logps needs logits [B, T, V] with labels and loss_mask [B, T]; "
                         f"got logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, "
                         f"loss_mask {tuple(loss_mask.shape)}")
    mask = loss_mask.bool()
    # Masked positions may hold -100; gather needs a valid index there (its value is discarded).
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    logits = logits.float()
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(dim=-1)


def _check_args(pairs: dict[str, torch.Tensor], loss_type: str, beta: float,
                label_smoothing: float, lengths: tuple[torch.Tensor | None, torch.Tensor | None]
                ) -> None:
    """Reject option combinations that would otherwise be silently ignored or meaningless."""
    shapes = {name: tuple(t.shape) for name, t in pairs.items()}
    if len(set(shapes.values())) != 1 or len(shapes["policy_chosen"]) != 1:
        raise ValueError(f"dpo_loss needs four [B] tensors (one log-prob per pair); got {shapes}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    # eps >= 0.5 would say the labels are at best a coin flip: the loss then prefers h <= 0.
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type != "sigmoid" and label_smoothing:
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' only, not {loss_type!r}")
    if (lengths[0] is None) != (lengths[1] is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    if lengths[0] is not None and loss_type != "ipo":
        raise ValueError(f"chosen_lengths/rejected_lengths apply to loss_type 'ipo' only, "
                         f"not {loss_type!r}")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float = 0.1,
             loss_type: LossType = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss per pair ``[B]``, chosen rewards ``[B]``, rejected rewards ``[B]``).

    Inputs are summed sequence log-probs (``sequence_logps``); the caller reduces the loss
    (usually ``.mean()``) so it keeps control of how pairs are weighted across ranks.

    - ``"sigmoid"``: DPO, ``-(1-eps) log sigma(beta h) - eps log sigma(-beta h)``. With
      ``label_smoothing`` eps > 0 this is conservative DPO (cDPO, Mitchell 2023): it assumes a
      fraction eps of the preference labels are flipped, so the loss stops pushing once the
      implied preference probability reaches 1-eps instead of driving h to infinity.
    - ``"ipo"``: IPO (Azar et al. 2023, eq. 17), ``(h - 1/(2 beta))^2``: regresses the margin
      to a finite target, which keeps the policy near the reference even on deterministic
      preferences where sigmoid DPO overfits. ``chosen_lengths``/``rejected_lengths``
      (completion token counts) optionally turn the log-ratios into per-token averages first,
      as TRL does ("confirmed with the IPO authors"), so beta means the same at any length.

    Rewards are ``beta * (policy - ref)`` of the summed log-probs, detached, as TRL logs them.
    Against TRL 1.16 (tests/test_dpo.py): "sigmoid" and "ipo" (with lengths) match its
    ``DPOTrainer``; its "sigmoid" ignores ``label_smoothing``, and the cDPO form above is the
    one its "aot" loss applies (to sorted margins).
    """
    _check_args({"policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
                 "ref_chosen": ref_chosen, "ref_rejected": ref_rejected},
                loss_type, beta, label_smoothing, (chosen_lengths, rejected_lengths))
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    if loss_type == "sigmoid":
        logits = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    else:
        if chosen_lengths is not None:
            # clamp: an empty completion contributes a zero log-ratio, not a division by zero.
            chosen_ratio = chosen_ratio / chosen_lengths.float().clamp(min=1.0)
            rejected_ratio = rejected_ratio / rejected_lengths.float().clamp(min=1.0)
        losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen.float() - ref_chosen.float()).detach()
    rejected_rewards = beta * (policy_rejected.float() - ref_rejected.float()).detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Batch means under the names TRL logs, so runs compare with TRL runs side by side.

    ``rewards/accuracies`` is the fraction of pairs whose chosen reward is strictly greater:
    at step 0 (policy == reference) every reward is 0 and the accuracy is 0, not 0.5.
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.numel() == 0:
        raise ValueError(f"dpo_metrics needs two equal, non-empty reward tensors; got "
                         f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}")
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
    }


def pair_logps(model: torch.nn.Module, batch: Any, device: torch.device, bf16: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs of a ``PairBatch`` (``train/pairs.py``) -> (chosen [B],
    rejected [B]), float32. One forward over all 2B rows; the logits are shifted here, once
    (the module docstring's convention). Used for the policy in training and for the frozen
    reference in ``train/reference.py``, so both score a pair identically."""
    ids = batch.input_ids.to(device)
    mask = batch.answer_mask.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(ids)
    logps = sequence_logps(logits[:, :-1], ids[:, 1:], mask[:, 1:])
    n = batch.num_pairs
    return logps[:n], logps[n:]


# The window sums the loop keeps per logged row (train/loop.py), divided by the pairs.
STAT_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected")


def dpo_forward_backward(model: torch.nn.Module, micro: list[Any], cfg: Any, world: int,
                         device: torch.device, bf16: bool
                         ) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    """One optimizer step's forward and backward passes over its micro batches of pairs ->
    (the summed per-pair losses, detached; the global pair count they average over; the
    summed per-pair statistics of ``STAT_KEYS``). The loss is the mean over the global batch:
    each rank scales its local sum by ``world / pairs`` because FSDP averages gradients."""
    import torch.distributed as dist

    count = torch.tensor([float(sum(b.num_pairs for b in micro))], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(count)
    pairs = float(count.item())
    no_sync = len(micro) > 1 and hasattr(model, "set_requires_gradient_sync")
    total = torch.zeros((), device=device, dtype=torch.float64)
    stats = {k: torch.zeros((), device=device, dtype=torch.float64) for k in STAT_KEYS}
    for i, b in enumerate(micro):
        if no_sync:
            model.set_requires_gradient_sync(i == len(micro) - 1)
        chosen, rejected = pair_logps(model, b, device, bf16)
        lengths = b.answer_lengths.to(device)
        n = b.num_pairs
        ipo_lengths = (lengths[:n], lengths[n:]) if cfg.loss_type == "ipo" else (None, None)
        losses, r_chosen, r_rejected = dpo_loss(
            chosen, rejected, b.ref_chosen.to(device), b.ref_rejected.to(device), beta=cfg.beta,
            loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
            chosen_lengths=ipo_lengths[0], rejected_lengths=ipo_lengths[1])
        (losses.sum() * world / max(pairs, 1.0)).backward()
        total += losses.detach().sum().double()
        for key, values in (("rewards/chosen", r_chosen), ("rewards/rejected", r_rejected),
                            ("rewards/margins", r_chosen - r_rejected),
                            ("rewards/accuracies", (r_chosen > r_rejected).float()),
                            ("logps/chosen", chosen.detach()), ("logps/rejected", rejected.detach())):
            stats[key] += values.double().sum()
    return total, pairs, stats
