"""Learning-rate schedules as multipliers of the peak LR (for ``LambdaLR``)."""

from __future__ import annotations

import math

from steelworks.train.config import OptimConfig


def lr_multiplier(step: int, total: int, cfg: OptimConfig) -> float:
    """Warmup (linear from 0) then cosine / constant / warmup-stable-decay (WSD)."""
    warm = min(cfg.warmup_steps, max(total - 1, 0))
    if step < warm:
        return (step + 1) / warm
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = (step - warm) / max(total - warm, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    # WSD (MiniCPM): stable at the peak, then decay linearly over the last fraction.
    decay_start = int(total * (1 - cfg.decay_fraction))
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(total - decay_start, 1)
    return 1.0 - (1 - floor) * min(progress, 1.0)
