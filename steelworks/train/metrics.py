"""Training metrics: FLOPs per token, MFU, a JSONL log, a loss-curve PNG, rank-0 progress."""

from __future__ import annotations

import json
import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("steelworks.train")

# Dense bf16 peak FLOP/s per device from vendor datasheets (no sparsity).
# Dense bf16 peaks (no sparsity), matched as substrings of the device name, first match wins:
# "H100 PCIe" before "H100" (SXM), and H800 (Steel-LLM's GPU) has the H100 SXM's compute.
GPU_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "H800": 989e12,
                  "A100": 312e12, "A800": 312e12, "L40S": 362e12, "A10G": 125e12,
                  "L4": 121e12, "4090": 165e12}


def flops_per_token(hf_config, seq_len: int) -> float:
    """6N for the dense matmuls (forward + backward) plus attention scores/values
    (PaLM appendix B: 12 * layers * hidden * seq), N excluding the embedding lookup."""
    h, n_layer = hf_config.hidden_size, hf_config.num_hidden_layers
    kv = hf_config.num_key_value_heads * (h // hf_config.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * hf_config.intermediate_size
    n = n_layer * per_layer + h * hf_config.vocab_size  # + output projection
    return 6 * n + 12 * n_layer * h * seq_len


@lru_cache(maxsize=1)
def peak_flops(device_type: str) -> float:
    """Per-device peak: the datasheet for known GPUs, a measured fp32 GEMM probe on CPU."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
        return 312e12
    # The best of several ~0.1 s trials of a 1024^3 GEMM: a peak is what the machine can do
    # when nothing else runs, and a single short trial on a busy machine reads low (MFU > 1).
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(5):
        reps, t0 = 4, time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


class MetricsLog:
    """One JSON object per logged step (the record of truth), mirrored to TensorBoard event
    files and to wandb when configured; rank 0 only."""

    def __init__(self, path: Path, enabled: bool, tensorboard_dir: Path | None = None,
                 wandb_project: str | None = None, run_name: str = "train",
                 config: dict[str, Any] | None = None) -> None:
        self.path, self.enabled = path, enabled
        self.rows: list[dict[str, Any]] = []
        self.tb = self.wandb = None
        if not enabled:
            return
        if path.exists():
            self.rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if tensorboard_dir is not None:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("train.wandb_project is set but wandb is not installed; "
                            "logging to metrics.jsonl and TensorBoard only")
            else:
                self.wandb = wandb.init(project=wandb_project, name=run_name, config=config,
                                        resume="allow")

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows = [r for r in self.rows if r["step"] < row["step"]] + [row]
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, row["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

    def plot(self, out: Path, title: str) -> None:
        if not self.enabled or not self.rows:
            return
        import io

        try:
            import matplotlib
        except ImportError:  # a bare GPU box (make gpu-check): the metrics are in metrics.jsonl
            log.warning("matplotlib is not installed: no %s", out.name)
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from steelworks.core.atomic import atomic_write_bytes

        steps = [r["step"] for r in self.rows]
        dpo = all("rewards/accuracies" in r for r in self.rows)
        # DPO: a second panel with what the loss alone hides (TRL's reward accuracy, margin).
        fig, axes = plt.subplots(1, 2 if dpo else 1, figsize=(12 if dpo else 7, 4), squeeze=False)
        ax = axes[0][0]
        ax.plot(steps, [r["loss"] for r in self.rows])
        ax.set(xlabel="step", ylabel="loss", title=title)
        ax.grid(alpha=0.3)
        if dpo:
            right = axes[0][1]
            right.plot(steps, [r["rewards/accuracies"] for r in self.rows], label="reward accuracy")
            right.set(xlabel="step", ylabel="reward accuracy", ylim=(-0.02, 1.02), title="DPO rewards")
            margin = right.twinx()
            margin.plot(steps, [r["rewards/margins"] for r in self.rows], color="tab:orange",
                        label="reward margin")
            margin.set_ylabel("reward margin (chosen - rejected)")
            right.legend(handles=right.get_lines() + margin.get_lines(), loc="lower right")
            right.grid(alpha=0.3)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out, buf.getvalue())


def truncate_log(path: Path, after_step: int) -> None:
    """On resume, drop rows a crashed run logged after the checkpoint it resumes from."""
    if not path.exists():
        return
    from steelworks.core.atomic import atomic_write_text

    rows = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= after_step]
    atomic_write_text(path, "".join(r + "\n" for r in rows))
