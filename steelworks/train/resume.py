"""Whether a training stage may resume its checkpoints after its config or inputs changed.

A long run is changed on the way: activation checkpointing turned on to fit memory, more
workers, appended data, more steps. Some changes keep the maths and may resume; the others
would silently mix two runs. Checkpoints are never deleted to settle it: a change that
cannot resume is an error (``ResumeConflict``) naming each field with its old and new value
and the two ways on, ``--restart`` (wipes, and says so in the log) or reverting the change.

The key is kept per field in ``<stage>/resume_key.json`` (not a hash), so the error can name
what changed. It holds the stage's train config and the content hashes of its input stages
(``rundir.content_sha256``: a byte-identical re-run of an upstream stage changes nothing).

Resume-compatible:
- ``FREE``: how long and how it runs, not what it computes (steps, epochs, appended data,
  logging and checkpoint cadence, failure policy, loggers) and the speed/memory settings that
  leave the maths alone (activation checkpointing, ``torch.compile``, fused kernels);
- the mesh (``parallel``: flat FSDP or HSDP, DCP reshards between them);
- the batch: ``micro_batch_size``/``grad_accum`` may trade against each other at the same
  global batch (``micro_batch_size * grad_accum * num_workers``), and workers may be added
  or removed at the same per-worker batch (the loader's cursor counts sequences, and DCP
  reshards);
- the steelworks version (a code upgrade is logged, not refused).
Everything else (learning rate, schedule, model shape, seed, precision, loss averaging,
the tokenizer's or data's content ...) must match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steelworks.core.config import ConfigError

KEY_FILE = "resume_key.json"
FREE = ("max_steps", "epochs", "extra_data", "log_every", "ckpt_every", "keep_last",
        "max_failures", "tensorboard", "wandb_project",
        "activation_checkpointing", "compile", "kernels", "async_checkpoint",
        "reference_replicas", "reference_batch_size", "parallel.replicate", "parallel.shard")
BATCH = ("micro_batch_size", "grad_accum", "num_workers")
# What ``--restart`` removes: the stage's training state and what was made from it.
WIPED = ("checkpoints", "hf", "tensorboard", "metrics.jsonl", "loss.png", "summary.json", KEY_FILE)


class ResumeConflict(ConfigError):
    """The stage has checkpoints that its new config or inputs cannot resume."""


@dataclass(frozen=True)
class Change:
    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field}: {_show(self.old)} -> {_show(self.new)}"


def _show(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False) if v is not None else "(absent)"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def make_key(train_config: dict[str, Any], inputs: dict[str, str], version: str) -> dict[str, Any]:
    """The resume key: the flattened train config, ``{input stage: content_sha256}``, version.
    JSON round-tripped so that tuples and lists compare equal to what is read back."""
    return json.loads(json.dumps({"config": flatten(train_config), "inputs": dict(inputs),
                                  "version": version}))


def _global_batch(c: dict[str, Any]) -> int | None:
    try:
        return int(c["micro_batch_size"]) * int(c["grad_accum"]) * int(c["num_workers"])
    except (KeyError, TypeError, ValueError):
        return None


def conflicts(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """The changes from ``old`` to ``new`` that forbid resuming (empty: it may resume)."""
    out: list[Change] = []
    oc, nc = old.get("config", {}), new.get("config", {})
    for f in sorted(set(oc) | set(nc)):
        if f in FREE or f in BATCH:
            continue
        if oc.get(f) != nc.get(f):
            out.append(Change(f, oc.get(f), nc.get(f)))
    per_worker = [c.get("micro_batch_size", 0) * c.get("grad_accum", 0) for c in (oc, nc)]
    if per_worker[0] != per_worker[1] and _global_batch(oc) != _global_batch(nc):
        out += [Change(f, oc.get(f), nc.get(f)) for f in BATCH if oc.get(f) != nc.get(f)]
        out.append(Change("global batch (micro_batch_size x grad_accum x num_workers)",
                          _global_batch(oc), _global_batch(nc)))
    oi, ni = old.get("inputs", {}), new.get("inputs", {})
    for name in sorted(set(oi) | set(ni)):
        if oi.get(name) != ni.get(name):
            out.append(Change(f"content of input stage {name!r} (sha256)", oi.get(name), ni.get(name)))
    return out


def read_key(stage_dir: Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / KEY_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def conflict_message(stage: str, stage_dir: Path, last: Path, changes: list[Change],
                     command: str) -> str:
    lines = [f"stage {stage}: its checkpoints ({last}, the newest) cannot resume with this "
             f"config; it changed in {len(changes)} way(s) that change what is computed:"]
    lines += [f"  - {c}" for c in changes]
    lines += ["Nothing was deleted. Two ways on:",
              f"  - revert the change(s) above to resume from {last.name};",
              f"  - or start this stage over: `{command} --restart` (or `steelworks pipeline "
              f"--restart`) removes {', '.join(WIPED[:-1])} in {stage_dir}, and says so in "
              "the log.",
              "Resume-compatible changes: " + ", ".join(FREE)
              + "; micro_batch_size/grad_accum at the same global batch; num_workers at the "
                "same per-worker batch."]
    return "\n".join(lines)
