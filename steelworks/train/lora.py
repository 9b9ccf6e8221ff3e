"""LoRA fine-tuning, the core: adapters on our ``Decoder``, the adapter saved in peft's format,
and the adapter folded into plain HF weights.

Why peft rather than our own LoRA module: ``peft.inject_adapter_in_model`` works on any
``nn.Module``. It swaps each targeted ``nn.Linear`` in place for a ``peft`` LoRA layer and
leaves the rest of the model alone, with no ``PeftModel`` wrapper around it. The model stays our
``Decoder``: its forward, ``use_kernels`` and ``parallelize.parallelize`` (FSDP2 per layer, then
the root) work unchanged, and FSDP2 accepts frozen base weights and trainable adapters in one
layer (tests/test_lora.py). What we write is what peft writes, so ``PeftModel.from_pretrained``
on the transformers model and vLLM's LoRA loader open it. We do not patch peft.

What peft does to names, and how we undo it. A targeted ``X`` (``model.layers.0.self_attn.q_proj``)
becomes a LoRA layer whose original ``nn.Linear`` is ``X.base_layer``, so the base weight is
``X.base_layer.weight``, and the adapters are ``X.lora_A.default.weight`` ([r, in]) and
``X.lora_B.default.weight`` ([out, r]; zero at start, so the model starts as the base model).
Hence:

- load base weights before ``apply_lora`` (``hf_io.from_hf``, then ``apply_lora``);
- export with ``merged_state_dict`` (W + (alpha/r)·B·A) or ``base_state_dict`` (W alone), both
  under the plain HF names that ``hf_io.to_hf`` takes; ``hf_io.hf_state_dict`` of a model with
  adapters would keep the ``base_layer`` names, which no HF loader reads;
- ``adapter_state_dict`` uses peft's file keys: ``base_model.model.`` + name, without the
  adapter name (``...q_proj.lora_A.weight``), as ``PeftModel.save_pretrained`` writes them.

Scope: plain LoRA on the linear projections inside the decoder layers (one adapter, named
``default``). Not the LM head: with tied embeddings its weight is the embedding, and the fused
cross-entropy kernel reads ``lm_head.weight`` directly, which would skip an adapter there.
Under FSDP2, ``adapter_state_dict``, ``save_adapter`` and ``merged_state_dict`` gather full
tensors (a collective: call them on every rank; ``save_adapter`` writes on rank 0 only);
``load_adapter`` runs before sharding.

The training stages use this module when ``train.lora`` is set (``LoraTrainConfig`` in
train/config.py, where ``LoraConfig`` is defined too, free of torch): train/loop.py applies
the adapters after ``from_hf`` and before ``parallelize``, checkpoint.py saves only the
trainable state, and the export writes ``hf/`` merged (``merge_adapters``) and ``adapter/``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The dataclass lives with the train config (light code imports that without torch); it is
# re-exported here, where it has always been imported from.
from steelworks.train.config import PROJECTIONS, LoraConfig  # noqa: F401 (re-exported)

ADAPTER = "default"  # peft's adapter name; we keep one adapter per model
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model, in peft's file keys
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# adapter_config.json fields that change the maths beyond plain LoRA, with their plain values:
# a file that sets any other value is refused rather than loaded into something different.
PLAIN_PEFT = {"bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
              "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
              "layers_to_transform": None, "lora_bias": False, "target_parameters": None,
              "trainable_token_indices": None, "layer_replication": None}


def to_peft(cfg: LoraConfig, **extra: Any):
    """The ``peft.LoraConfig`` for ``cfg`` (``extra``: e.g. ``task_type``)."""
    import peft

    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=list(cfg.target_modules), bias="none", **extra)


def is_adapter_param(name: str) -> bool:
    """Whether a parameter or state-dict name is a LoRA adapter weight (``lora_A``/``lora_B``)."""
    return ".lora_A." in name or ".lora_B." in name


def has_adapters(model: nn.Module) -> bool:
    """Whether ``apply_lora`` (or peft) has put LoRA layers into ``model``."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def _check_targets(model: nn.Module, cfg: LoraConfig) -> None:
    """Every target must name at least one ``nn.Linear`` of ``model``: peft errors only when
    none of them matches, so one misspelt name among seven would silently train less."""
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in cfg.target_modules if t not in leaves]
    if missing:
        raise ValueError(f"lora.target_modules: {', '.join(map(repr, missing))} matches no linear "
                         f"layer of this model (its linear layers: {', '.join(sorted(leaves))})")


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Put LoRA adapters on ``cfg.target_modules`` of ``model`` (in place; returned for
    chaining) and freeze every other parameter, so an optimizer over the parameters that
    require grad trains the adapters only. B starts at zero: the output is the base model's
    until the first step. Apply after loading base weights and before ``parallelize``."""
    import peft

    if has_adapters(model):
        raise ValueError("the model already has LoRA adapters; apply_lora adds one set only")
    _check_targets(model, cfg)
    peft.inject_adapter_in_model(to_peft(cfg), model, adapter_name=ADAPTER)
    # peft freezes the base already (bias="none"); set it here too, since the freeze is
    # this function's contract and must not depend on a library default.
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name))
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a parameter that FSDP2 may have sharded (DTensor): all-gathered."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, under peft's file keys
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), as full tensors."""
    from peft import get_peft_model_state_dict

    if not has_adapters(model):
        raise ValueError("the model has no LoRA adapters (apply_lora first)")
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)  # adapter name removed
    return {PEFT_PREFIX + k: _full(v) for k, v in state.items()}


def _lora_modules(model: nn.Module) -> dict[str, Any]:
    """Module name -> peft LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights without adapters, under plain HF names (``X.base_layer.weight`` ->
    ``X.weight``): the model as it was before fine-tuning, for ``hf_io.to_hf``."""
    return {k.replace(".base_layer.", "."): _full(v) for k, v in model.state_dict().items()
            if not is_adapter_param(k)}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights with each adapter folded in, W + (alpha/r)·B·A, under plain HF names:
    ``hf_io.to_hf(merged_state_dict(model), model.config, out_dir)`` writes a model that any
    HF loader runs without peft, with the adapted model's outputs. The sum is computed in fp32
    and stored in W's dtype; the model itself is not changed (training may go on)."""
    return merge_adapters({k: _full(v) for k, v in model.state_dict().items()}, model)


def merge_adapters(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``merged_state_dict`` of ``model`` from ``state``, its full state dict under the model's
    own names (``X.base_layer.weight``, ``X.lora_A.default.weight``): e.g. what
    ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` gathers to rank 0 alone,
    so an FSDP2 export holds the full model on one rank's host memory only."""
    merged = {k.replace(".base_layer.", "."): v for k, v in state.items() if not is_adapter_param(k)}
    for name, layer in _lora_modules(model).items():
        if ADAPTER not in layer.lora_A:
            continue
        a = state[f"{name}.lora_A.{ADAPTER}.weight"].float()
        b = state[f"{name}.lora_B.{ADAPTER}.weight"].float()
        w = merged[f"{name}.weight"]
        merged[f"{name}.weight"] = (w.float() + layer.scaling[ADAPTER] * (b @ a)).to(w.dtype)
    return merged


def _check_out_dir(out_dir: Path) -> None:
    """The adapter replaces ``out_dir`` wholesale: refuse a directory that is not an earlier
    adapter, so nothing else is deleted unasked."""
    if out_dir.exists() and (not out_dir.is_dir() or (
            any(out_dir.iterdir()) and not (out_dir / ADAPTER_CONFIG).exists())):
        raise ValueError(f"{out_dir} exists and is not an adapter directory (no {ADAPTER_CONFIG}); "
                         "remove it or choose another directory")


def _peft_config_json(cfg: LoraConfig, base_model_dir: str | Path) -> dict[str, Any]:
    """adapter_config.json as ``PeftModel.save_pretrained`` writes it (peft's own to_dict)."""
    config = to_peft(cfg, task_type="CAUSAL_LM", base_model_name_or_path=str(base_model_dir),
                         inference_mode=True).to_dict()
    # to_dict keeps sets and enums; peft's save_pretrained turns them into lists and strings
    return json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_adapter(model: nn.Module, cfg: LoraConfig, out_dir: str | Path,
                 base_model_dir: str | Path) -> Path:
    """Write ``out_dir`` in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``)
    for the base model in ``base_model_dir``, so that
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir), out_dir)``
    (and ``load_adapter``) give this model. Built in a temporary directory beside ``out_dir``,
    config last, and renamed into place: a crash leaves the old adapter or the new one.
    Under FSDP2 every rank calls it (the gather is a collective) and rank 0 alone writes;
    the others return at once (the caller's next barrier waits for rank 0)."""
    from safetensors.torch import save_file

    from steelworks.core.atomic import atomic_write_json
    from steelworks.train.merge import _replace_dir

    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    state = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    if _rank() != 0:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        atomic_write_json(tmp / ADAPTER_CONFIG, _peft_config_json(cfg, base_model_dir))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, out_dir)  # merge.py's: the old adapter goes only once the new is in place
    return out_dir


def config_from_peft(config: dict[str, Any], where: str = ADAPTER_CONFIG) -> LoraConfig:
    """Our config from a peft ``adapter_config.json`` dict; options beyond plain LoRA on our
    projections are errors naming the field (they would load into a different model)."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, plain in PLAIN_PEFT.items():
        if config.get(key, plain) not in (plain, None, {}, False):
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported (plain LoRA only: "
                             f"{key}={plain!r})")
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        raise ValueError(f"{where}: target_modules must be a list of module names, got {targets!r} "
                         "(a regular expression is not supported)")
    try:
        return LoraConfig(r=config.get("r"), alpha=config.get("lora_alpha"),
                          dropout=config.get("lora_dropout", 0.0), target_modules=targets)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> tuple[nn.Module, LoraConfig]:
    """Add the adapter in ``adapter_dir`` (peft format, from ``save_adapter`` or peft) to
    ``model``, a base model without adapters (``hf_io.from_hf`` of the base); returns the model
    and the adapter's config. For inference, or to go on training from a saved adapter."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_file, weights_file = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{adapter_dir} is not a peft adapter directory (no {f.name})")
    cfg = config_from_peft(json.loads(config_file.read_text(encoding="utf-8")), str(config_file))
    apply_lora(model, cfg)
    expected = {n: p for n, p in model.named_parameters() if is_adapter_param(n)}
    state = {}
    for key, t in load_file(str(weights_file)).items():
        # peft's file key -> our parameter name: drop the wrapper prefix, add the adapter name
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            name = name.replace(f".{part}.weight", f".{part}.{ADAPTER}.weight")
        state[name] = t
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_file}: adapter weights do not match {config_file} on this "
                         f"model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"{weights_file}: {name} has shape {tuple(t.shape)}, this model "
                             f"needs {tuple(expected[name].shape)} (another base model or r?)")
    with torch.no_grad():
        for name, t in state.items():
            expected[name].copy_(t)
    return model, cfg
