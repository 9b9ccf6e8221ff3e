"""Model merging: combine checkpoints of one architecture into a new HF directory.

Three methods, each applied tensor by tensor (the same name in every input):

- ``linear``: a weighted average. Weights are *relative*: they are always normalised to sum
  to 1, so ``--weights 3 1`` and ``--weights 0.75 0.25`` give the same model and a merge can
  never rescale the weights by accident.
- ``task_arithmetic``: ``base + sum_i w_i * (model_i - base)`` (Ilharco et al., 2023). Here
  weights are *not* normalised: each one scales a fine-tune's delta (default 1.0 each), and
  their sum is the point (1.0 each adds every task in full).
- ``slerp``: spherical interpolation between two models on each flattened tensor, which keeps
  the norm of a tensor better than a straight line between two far-apart ones. Nearly
  colinear tensors (where sin(theta) would divide by ~0) fall back to linear interpolation.

Arithmetic is done in float32 (float64 inputs stay float64) and each result is cast back to
the dtype the reference input stores that tensor in, so bf16 checkpoints merge to bf16 without
bf16 rounding inside the sum. The reference is the base for task arithmetic and the first
model otherwise; its config.json, generation config and tokenizer files are copied.

``merge_dirs`` reads tensors lazily (``safe_open``), one name at a time from every input, so
the peak memory is the merged model plus one tensor per input, not every input at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from steelworks.train.hf_io import INDEX, WEIGHTS, _weight_files

log = logging.getLogger("steelworks.train")

METHODS = ("linear", "task_arithmetic", "slerp")
# The config fields that decide the tensors' meaning. Equal shapes alone would let a Llama
# and a Qwen2 of the same size "merge" (Qwen2 has q/k/v biases, but a Llama with
# attention_bias does too), or two models whose heads split the same matrix differently.
ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "intermediate_size",
               "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "vocab_size", "tie_word_embeddings")
# Everything besides the weights that an HF directory needs to be loaded and chatted with.
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                "tokenizer.model", "chat_template.jinja", "chat_template.json")
# mergekit's DOT_THRESHOLD: above |cos theta| = 0.9995 (theta < ~1.8 degrees) sin(theta) is
# small enough that the SLERP coefficients lose precision, and the arc is a straight line anyway.
COLINEAR_DOT = 0.9995
MERGE_RECORD = "merge.json"


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for the arithmetic (bf16/fp16 sums would round at every step); float64 inputs
    keep their precision instead of being narrowed."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _identical(name: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Integer/bool tensors (index buffers, masks) cannot be averaged: they must agree."""
    for i, x in enumerate(tensors[1:], start=1):
        if not torch.equal(x, tensors[0]):
            raise ValueError(f"tensor {name}: non-floating ({tensors[0].dtype}) and different in "
                             f"input {i}; only floating tensors can be merged")
    return tensors[0].clone()


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * x_i in the compute dtype, cast to the first tensor's dtype."""
    dtype = _compute_dtype(tensors[0])
    out = torch.zeros(tensors[0].shape, dtype=dtype)
    for w, x in zip(weights, tensors):
        out.add_(x.to(dtype), alpha=w)
    return out.to(tensors[0].dtype)


def _task_tensor(base: torch.Tensor, models: Sequence[torch.Tensor],
                 weights: Sequence[float]) -> torch.Tensor:
    """base + sum_i w_i * (model_i - base), computed in the compute dtype."""
    dtype = _compute_dtype(base)
    b = base.to(dtype)
    out = b.clone()
    for w, x in zip(weights, models):
        out.add_(x.to(dtype) - b, alpha=w)
    return out.to(base.dtype)


def slerp_tensor(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two same-shaped tensors, seen as flat vectors.

    The coefficients sin((1-t)theta)/sin(theta) and sin(t*theta)/sin(theta) apply to the
    original (unnormalised) tensors, as in mergekit. t=0 and t=1 return copies of the
    endpoints exactly: the formula would give them only up to rounding. Colinear or zero
    tensors (no defined angle) are interpolated linearly."""
    if a.shape != b.shape:
        raise ValueError(f"slerp: shapes differ, {tuple(a.shape)} and {tuple(b.shape)}")
    if t == 0:
        return a.clone()
    if t == 1:
        return b.to(a.dtype, copy=True)
    dtype = _compute_dtype(a)
    va, vb = a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)
    na, nb = torch.linalg.vector_norm(va), torch.linalg.vector_norm(vb)
    if na == 0 or nb == 0:
        return ((1 - t) * va + t * vb).reshape(a.shape).to(a.dtype)
    dot = float(torch.clamp(torch.dot(va / na, vb / nb), -1.0, 1.0))
    if abs(dot) > COLINEAR_DOT:
        return ((1 - t) * va + t * vb).reshape(a.shape).to(a.dtype)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    out = (math.sin((1 - t) * theta) / sin_theta) * va + (math.sin(t * theta) / sin_theta) * vb
    return out.reshape(a.shape).to(a.dtype)


def _merge_tensor(method: str, name: str, tensors: Sequence[torch.Tensor],
                  weights: Sequence[float] | None, t: float | None) -> torch.Tensor:
    """One tensor of the merged model; for task arithmetic ``tensors[0]`` is the base."""
    if not tensors[0].is_floating_point():
        return _identical(name, tensors)
    if method == "linear":
        return _weighted_sum(tensors, weights)
    if method == "task_arithmetic":
        return _task_tensor(tensors[0], tensors[1:], weights)
    return slerp_tensor(tensors[0], tensors[1], t)


def check_weights(method: str, n_models: int, weights: Sequence[float] | None,
                  t: float | None, has_base: bool) -> tuple[list[float] | None, float | None]:
    """Validate the options of ``method`` and return the weights it applies (normalised for
    linear, default 1.0 each for task arithmetic) and t. Options a method does not use are
    errors rather than silently ignored: ``--t`` on a linear merge is a mistake."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    if has_base != (method == "task_arithmetic"):
        raise ValueError("task_arithmetic needs a base model" if not has_base
                         else f"{method} takes no base model (only task_arithmetic does)")
    if method == "slerp":
        if n_models != 2:
            raise ValueError(f"slerp merges exactly 2 models, got {n_models}")
        if weights is not None:
            raise ValueError("slerp takes t, not weights")
        if t is None or not 0.0 <= t <= 1.0:
            raise ValueError(f"slerp needs t in [0, 1], got {t}")
        return None, float(t)
    if t is not None:
        raise ValueError(f"{method} takes weights, not t")
    if n_models < (2 if method == "linear" else 1):
        raise ValueError(f"{method} needs at least {2 if method == 'linear' else 1} model(s), "
                         f"got {n_models}")
    if weights is None:
        weights = [1.0] * n_models
    if len(weights) != n_models:
        raise ValueError(f"{len(weights)} weights for {n_models} models; give one per model")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {list(weights)}")
    if method == "task_arithmetic":
        return [float(w) for w in weights], None
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError(f"linear weights sum to {total}; they are normalised to sum to 1, "
                         "so their sum must be positive")
    return [w / total for w in weights], None


def _same_names(state_dicts: Sequence[dict[str, torch.Tensor]]) -> list[str]:
    """The tensor names every state dict has; any difference is an error naming it."""
    names = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != set(names):
            diff = sorted(set(sd) ^ set(names))
            raise ValueError(f"state dict {i} and state dict 0 hold different tensors: {diff[:5]}")
        for n in names:
            if sd[n].shape != state_dicts[0][n].shape:
                raise ValueError(f"state dict {i}: {n} has shape {tuple(sd[n].shape)}, "
                                 f"state dict 0 has {tuple(state_dicts[0][n].shape)}")
    return names


def linear(state_dicts: Sequence[dict[str, torch.Tensor]],
           weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted average of state dicts; weights (default equal) are normalised to sum 1."""
    w, _ = check_weights("linear", len(state_dicts), weights, None, False)
    return {n: _merge_tensor("linear", n, [sd[n] for sd in state_dicts], w, None)
            for n in _same_names(state_dicts)}


def task_arithmetic(base: dict[str, torch.Tensor], models: Sequence[dict[str, torch.Tensor]],
                    weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """base + sum_i w_i * (model_i - base); weights (default 1.0 each) are not normalised."""
    w, _ = check_weights("task_arithmetic", len(models), weights, None, True)
    dicts = [base, *models]
    return {n: _merge_tensor("task_arithmetic", n, [sd[n] for sd in dicts], w, None)
            for n in _same_names(dicts)}


def slerp(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
          t: float) -> dict[str, torch.Tensor]:
    """Per-tensor SLERP from ``a`` (t=0) to ``b`` (t=1)."""
    _, t = check_weights("slerp", 2, None, t, False)
    return {n: _merge_tensor("slerp", n, [a[n], b[n]], None, t) for n in _same_names([a, b])}


class Checkpoint:
    """An HF directory opened for reading: its config and its tensors' names and shapes, with
    tensors loaded only when asked for (``get``). Handles stay open in ``stack``."""

    def __init__(self, path: Path, stack: contextlib.ExitStack) -> None:
        from safetensors import safe_open

        self.path = path
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such model directory")
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{config_file}: missing; {path} is not a Hugging Face "
                                    "model directory")
        try:
            self.config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: not valid JSON ({e})") from e
        if not (path / WEIGHTS).exists() and not (path / INDEX).exists():
            raise FileNotFoundError(f"{path / WEIGHTS}: missing (and no {INDEX}); merging reads "
                                    "safetensors weights only")
        self.handles: dict[str, Any] = {}
        for f in _weight_files(path):
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
            for name in handle.keys():
                if name in self.handles:
                    raise ValueError(f"{f}: tensor {name} is also in another shard of {path}")
                self.handles[name] = handle
        if self.config.get("tie_word_embeddings"):
            # Tied: the head is the embedding, so a saved copy carries nothing. Dropping it
            # everywhere lets a checkpoint that saved it merge with one that did not, and keeps
            # the output as small (and as tied) as the config says.
            self.handles.pop("lm_head.weight", None)
        self.shapes = {n: tuple(h.get_slice(n).get_shape()) for n, h in self.handles.items()}

    def get(self, name: str) -> torch.Tensor:
        return self.handles[name].get_tensor(name)


def check_compatible(ref: Checkpoint, other: Checkpoint) -> None:
    """Same architecture fields and the same tensor names and shapes as ``ref``, or a
    ``ValueError`` naming ``other``'s directory and the field or tensor that differs."""
    for field in ARCH_FIELDS:
        if ref.config.get(field) != other.config.get(field):
            raise ValueError(f"{other.path}: config field {field} is {other.config.get(field)!r}, "
                             f"but {ref.path} has {ref.config.get(field)!r}; only models of one "
                             "architecture can be merged")
    missing = sorted(set(ref.shapes) - set(other.shapes))
    extra = sorted(set(other.shapes) - set(ref.shapes))
    if missing or extra:
        raise ValueError(f"{other.path}: tensors differ from {ref.path}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for name, shape in ref.shapes.items():
        if other.shapes[name] != shape:
            raise ValueError(f"{other.path}: tensor {name} has shape {list(other.shapes[name])}, "
                             f"but {ref.path} has {list(shape)}")


def _check_out_dir(out_dir: Path, inputs: Sequence[Path]) -> None:
    """Refuse to write over an input or over a directory this module did not write: the
    output replaces ``out_dir`` wholesale, and nothing that took compute is deleted unasked."""
    resolved = out_dir.resolve()
    for p in inputs:
        if p.resolve() == resolved:
            raise ValueError(f"--out {out_dir} is one of the inputs; choose another directory")
    if out_dir.exists() and (not out_dir.is_dir() or (
            any(out_dir.iterdir()) and not (out_dir / MERGE_RECORD).exists())):
        raise ValueError(f"--out {out_dir} exists and is not an earlier merge output (no "
                         f"{MERGE_RECORD}); remove it or choose another directory")


def _write_dir(tmp: Path, ref: Checkpoint, state: dict[str, torch.Tensor],
               record: dict[str, Any]) -> None:
    """Fill ``tmp``: weights, the reference's config and tokenizer files, and the merge
    record last (a directory with merge.json is complete)."""
    from safetensors.torch import save_file

    from steelworks.core.atomic import atomic_write_json

    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
    for name in COPIED_FILES:
        if (ref.path / name).is_file():
            shutil.copy2(ref.path / name, tmp / name)
    atomic_write_json(tmp / MERGE_RECORD, record)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move ``tmp`` to ``out_dir``; an earlier output is moved aside first and removed only
    once the new one is in place, so a crash leaves one complete directory."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _warn_tokenizers(ref: Checkpoint, others: Sequence[Checkpoint]) -> None:
    """Models with one vocabulary size can still number tokens differently, which makes their
    embedding rows mean different things: not an error (the ids may be the same), a warning."""
    for c in others:
        a, b = ref.path / "tokenizer.json", c.path / "tokenizer.json"
        if a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes():
            log.warning("merge: %s has a different tokenizer.json from %s; the tokenizer of %s "
                        "is used", c.path, ref.path, ref.path)


def merge_dirs(method: str, model_dirs: Sequence[str | Path], out_dir: str | Path, *,
               base: str | Path | None = None, weights: Sequence[float] | None = None,
               t: float | None = None) -> Path:
    """Merge HF model directories into ``out_dir`` (model.safetensors, config.json and
    tokenizer files from the base or first model, and merge.json recording how).

    Written to a temporary directory beside ``out_dir`` and renamed into place."""
    applied, t = check_weights(method, len(model_dirs), weights, t, base is not None)
    out_dir = Path(out_dir)
    paths = ([Path(base)] if base is not None else []) + [Path(p) for p in model_dirs]
    _check_out_dir(out_dir, paths)
    with contextlib.ExitStack() as stack:
        ckpts = [Checkpoint(p, stack) for p in paths]
        ref = ckpts[0]  # the base for task arithmetic, else the first model
        for c in ckpts[1:]:
            check_compatible(ref, c)
        _warn_tokenizers(ref, ckpts[1:])
        state = {n: _merge_tensor(method, n, [c.get(n) for c in ckpts], applied, t).contiguous()
                 for n in ref.shapes}
    record = {"method": method, "models": [str(Path(p).resolve()) for p in model_dirs],
              "base": str(Path(base).resolve()) if base is not None else None,
              "weights": list(weights) if weights is not None else None,
              "applied_weights": applied, "t": t, "config_from": str(ref.path.resolve()),
              "tensors": len(state)}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Beside out_dir (same filesystem, so the rename is atomic) and named by pid, so two merges
    # into one place do not share it; mkdir rather than mkdtemp for the usual permissions.
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_dir(tmp, ref, state, record)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merge: %s of %d model(s) -> %s", method, len(model_dirs), out_dir)
    return out_dir
