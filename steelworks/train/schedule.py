"""Learning-rate schedules as multipliers of the peak LR (for ``LambdaLR``), extendable.

A run is planned for ``total`` steps: linear warmup, then cosine / constant / WSD
(warmup-stable-decay). Extending it later (more ``max_steps``, or ``epochs`` that grow with
appended data) must not make the LR jump, which recomputing the plan with the new total
does: a finished 700-step cosine run taken to 900 steps would jump from its floor back to
about 30% of the peak, a finished WSD anneal back to the peak. The rule instead, from the
step ``s`` where the run resumes with a new total ``T``, starting at the multiplier ``m``
it stands at:

- cosine: a new cosine from ``m`` down to the floor over steps ``s..T`` (a finished run
  stays at its floor);
- WSD: a run still in its stable phase simply moves its decay later (WSD's point: the plan
  is the same as if ``T`` had been chosen from the start); one already decaying gets a new
  stable phase at ``m`` and a linear decay to the floor over the last ``decay_fraction`` of
  the added steps;
- during warmup, or for ``constant``, the plan is the same with the new total.

Each extension is a segment; the list is saved in the checkpoint (``state``) so that later
extensions chain.
"""

from __future__ import annotations

import math
from typing import Any

from steelworks.train.config import OptimConfig


def lr_multiplier(step: int, total: int, cfg: OptimConfig) -> float:
    """The planned schedule: warmup (linear from 0) then cosine / constant / WSD."""
    warm = _warmup(total, cfg)
    if step < warm:
        return (step + 1) / warm
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = (step - warm) / max(total - warm, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    # WSD (MiniCPM): stable at the peak, then decay linearly over the last fraction.
    decay_start = _decay_start(total, cfg)
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(total - decay_start, 1)
    return 1.0 - (1 - floor) * min(progress, 1.0)


def _warmup(total: int, cfg: OptimConfig) -> int:
    return min(cfg.warmup_steps, max(total - 1, 0))


def _decay_start(total: int, cfg: OptimConfig) -> int:
    return int(total * (1 - cfg.decay_fraction))


class Schedule:
    """The multiplier at each step: the planned schedule, then one segment per extension
    (``{"start", "total", "from"}``: from multiplier ``from`` at ``start`` to the floor at
    ``total``, shaped by ``cfg.schedule``)."""

    def __init__(self, total: int, cfg: OptimConfig, segments: list[dict[str, Any]] | None = None) -> None:
        self.total, self.cfg = int(total), cfg
        self.segments: list[dict[str, Any]] = [dict(s) for s in segments or []]

    def __call__(self, step: int) -> float:
        seg = next((s for s in reversed(self.segments) if step >= s["start"]), None)
        if seg is None:
            return lr_multiplier(step, self.total, self.cfg)
        return self._segment(step, seg)

    def _segment(self, step: int, seg: dict[str, Any]) -> float:
        start, total, m = seg["start"], seg["total"], seg["from"]
        floor = self.cfg.min_lr_ratio
        progress = min((step - start) / max(total - start, 1), 1.0)
        if self.cfg.schedule == "cosine":
            return floor + (m - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        # WSD: stable at m, then linear to the floor over the last decay_fraction.
        decay_at = 1 - self.cfg.decay_fraction
        if progress < decay_at:
            return m
        return m - (m - floor) * min((progress - decay_at) / max(self.cfg.decay_fraction, 1e-9), 1.0)

    @property
    def end(self) -> int:
        """The step the schedule ends at (the last segment's total, or the plan's)."""
        return self.segments[-1]["total"] if self.segments else self.total

    def extend(self, step: int, total: int) -> str | None:
        """Re-plan for ``total`` steps from ``step`` without a jump (module docstring).
        Returns a line for the log, or None when nothing changed."""
        if total == self.end:
            return None
        m = self(step)
        cfg = self.cfg
        in_plan = not self.segments
        if cfg.schedule == "constant" or (in_plan and step < _warmup(self.total, cfg)) or (
                in_plan and cfg.schedule == "wsd" and step < _decay_start(self.total, cfg)
                and step < _decay_start(total, cfg)):
            old, self.total = self.end, total
            return (f"schedule: {old} -> {total} steps at step {step}; still in its "
                    f"{'warmup' if step < _warmup(old, cfg) else 'plan'}, so the plan is the "
                    f"same as if {total} had been set from the start")
        self.segments.append({"start": int(step), "total": int(total), "from": float(m)})
        shape = ("cosine" if cfg.schedule == "cosine" else
                 f"stable, then linear over the last {cfg.decay_fraction:g} of the added steps")
        return (f"schedule extended at step {step} to {total} steps: LR multiplier continues "
                f"from {m:.4g} ({shape}) down to the floor {cfg.min_lr_ratio:g}, no jump")

    def state(self) -> dict[str, Any]:
        return {"total": self.total, "segments": [dict(s) for s in self.segments]}

    def load_state(self, state: dict[str, Any] | None) -> None:
        """Take the plan a checkpoint trained with (kept as is when it predates saving one)."""
        if state:
            self.total = int(state["total"])
            self.segments = [dict(s) for s in state.get("segments") or []]

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, cfg: OptimConfig, total: int) -> Schedule:
        """The schedule a checkpoint trained with; ``total`` when it predates saving one."""
        schedule = cls(total, cfg)
        schedule.load_state(state)
        return schedule
