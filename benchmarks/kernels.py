"""Fused kernels vs PyTorch eager vs Liger-Kernel: forward+backward time and peak memory.

GPU benchmark (run it whenever a GPU is lent; Ray is not needed):

    python benchmarks/kernels.py                       # all kernels at Llama shapes, bf16
    python benchmarks/kernels.py --e2e steel-1b        # + training tokens/s with kernels on/off
    TRITON_INTERPRET=1 python benchmarks/kernels.py --device cpu --smoke   # CPU: code path check only

Per kernel and shape, each implementation runs ``--reps`` timed forward+backward passes
(CUDA events, median) after warm-up; peak memory is the increase of
``max_memory_allocated`` over what the inputs already hold. Liger-Kernel is imported when
installed (``pip install liger-kernel``; carry its wheel to a machine without network);
its rows read "n/a" otherwise. Shapes follow the issue: hidden 2048/4096, sequence
2048-8192 tokens, vocabulary 32k-152k.

``--e2e`` trains ``steel-1b`` (or ``--e2e 100m``) in one process on random token shards for a
few steps with ``train.kernels`` empty and then with all kernels, and reports tokens/s,
MFU and peak memory for both. The tokenizer is a small BPE padded with placeholder tokens
to the model's vocabulary size (Qwen's 151,936), which is all a throughput run needs.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "benchmarks" / ".work" / "kernels"

Case = tuple[str, Callable[[], tuple[Callable[[], torch.Tensor], list[torch.Tensor]]]]


def _liger() -> dict[str, Any] | None:
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers import (
            LigerCrossEntropyLoss,
            LigerFusedLinearCrossEntropyLoss,
            LigerRMSNorm,
            liger_rotary_pos_emb,
        )
    except ImportError:
        return None
    return {"rmsnorm": LigerRMSNorm, "rope": liger_rotary_pos_emb, "swiglu": LigerSiLUMulFunction.apply,
            "ce": LigerCrossEntropyLoss, "flce": LigerFusedLinearCrossEntropyLoss}


def cases(device: torch.device, dtype: torch.dtype, smoke: bool) -> dict[str, list[tuple[str, dict[str, Callable]]]]:
    """kernel -> [(shape label, {impl: make() -> (run_fn, inputs_needing_grad)})]."""
    from steelworks.kernels.cross_entropy import (
        cross_entropy,
        cross_entropy_reference,
        fused_linear_cross_entropy,
        fused_linear_cross_entropy_reference,
    )
    from steelworks.kernels.rmsnorm import rms_norm, rms_norm_reference
    from steelworks.kernels.rope import apply_rope, apply_rope_reference
    from steelworks.kernels.swiglu import swiglu, swiglu_reference

    liger = _liger()
    rnd = lambda *shape, grad=True: torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)  # noqa: E731
    out: dict[str, list] = {k: [] for k in ("rmsnorm", "rope", "swiglu", "ce", "flce")}
    tokens = (64,) if smoke else (4096, 8192)
    hiddens = (64,) if smoke else (2048, 4096)

    for t in tokens:
        for h in hiddens:
            def norm(impl: str, t: int = t, h: int = h):
                x, r, w = rnd(t, h), rnd(t, h), rnd(h)
                if impl == "steelworks":
                    return lambda: torch.cat([o.reshape(-1) for o in rms_norm(x, w, 1e-6, residual=r)]), [x, r, w]
                if impl == "liger":
                    mod = liger["rmsnorm"](h, eps=1e-6).to(device, dtype)
                    return lambda: torch.cat([mod(x + r).reshape(-1), (x + r).reshape(-1)]), [x, r, mod.weight]
                return lambda: torch.cat([o.reshape(-1) for o in rms_norm_reference(x, w, 1e-6, residual=r)]), [x, r, w]
            out["rmsnorm"].append((f"tokens={t} hidden={h} (+residual)", norm))

            inter = {64: 176, 2048: 5632, 4096: 11008}[h]

            def glu(impl: str, t: int = t, inter: int = inter):
                g, u = rnd(t, inter), rnd(t, inter)
                fn = {"steelworks": swiglu, "torch": swiglu_reference}.get(impl) or liger["swiglu"]
                return lambda: fn(g, u), [g, u]
            out["swiglu"].append((f"tokens={t} intermediate={inter}", glu))

    for seq in ((16,) if smoke else (2048, 8192)):
        def rope(impl: str, seq: int = seq):
            heads, kv, d = (4, 2, 16) if smoke else (32, 8, 128)
            q0, k0 = rnd(1, seq, heads, d), rnd(1, seq, kv, d)
            inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=device).float() / d))
            ang = torch.arange(seq, device=device).float()[:, None] * inv
            cos = torch.cat([ang, ang], -1).cos()[None].to(dtype)
            sin = torch.cat([ang, ang], -1).sin()[None].to(dtype)
            fn = {"steelworks": apply_rope, "torch": apply_rope_reference}.get(impl) or liger["rope"]

            def run():  # HF layout: [B, L, H, D] -> transpose -> [B, H, L, D], non-contiguous
                q, k = q0 * 1, k0 * 1  # fresh non-leaf copies: in-place kernels may write to them
                qe, ke = fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
                return torch.cat([qe.reshape(-1), ke.reshape(-1)])
            return run, [q0, k0]
        out["rope"].append((f"seq={seq} heads=32/8 head_dim=128" if not smoke else f"seq={seq}", rope))

    for t in ((32,) if smoke else (4096,)):
        for v in ((1000,) if smoke else (32000, 151936)):
            def ce(impl: str, t: int = t, v: int = v):
                logits = rnd(t, v)
                labels = torch.randint(0, v, (t,), device=device)
                if impl == "steelworks":  # its input buffer becomes the gradient: give it a copy
                    return lambda: cross_entropy(logits * 1, labels), [logits]
                if impl == "liger":
                    loss = liger["ce"](reduction="none")
                    return lambda: loss(logits * 1, labels), [logits]
                return lambda: cross_entropy_reference(logits, labels), [logits]
            out["ce"].append((f"tokens={t} vocab={v}", ce))

    for t in ((32,) if smoke else (8192,)):
        for h, v in (((64, 1000),) if smoke else ((2048, 32000), (2048, 151936), (4096, 151936))):
            def flce(impl: str, t: int = t, h: int = h, v: int = v):
                x, w = rnd(t, h), rnd(v, h) * 0.02
                w = w.detach().requires_grad_(True)
                labels = torch.randint(0, v, (t,), device=device)
                if impl == "steelworks":
                    return lambda: fused_linear_cross_entropy(x, w, labels), [x, w]
                if impl == "liger":
                    loss = liger["flce"](reduction="sum")
                    return lambda: loss(w, x, labels), [x, w]
                return lambda: fused_linear_cross_entropy_reference(x, w, labels), [x, w]
            out["flce"].append((f"tokens={t} hidden={h} vocab={v}", flce))

    impls = ["torch", "steelworks"] + (["liger"] if liger else [])
    return {k: [(label, {i: (lambda make=make, i=i: make(i)) for i in impls}) for label, make in v]
            for k, v in out.items()}


def measure(make: Callable, device: torch.device, reps: int) -> dict[str, float]:
    """Median forward+backward ms and peak extra memory (MiB) of one implementation."""
    run, leaves = make()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        for x in leaves:
            x.grad = None
        y = run()
        y.backward(torch.ones_like(y) if y.dim() else None)

    for _ in range(2):
        step()
    sync()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else float("nan")
    return {"ms": statistics.median(times), "peak_mib": peak}


def run_e2e(size: str, device: torch.device, steps: int, smoke: bool) -> list[dict[str, Any]]:
    import numpy as np

    from steelworks.core.config import to_dict
    from steelworks.data.shards import ShardIndex, token_dtype, write_shard
    from steelworks.data.tokenizer import load_tokenizer, train_tokenizer
    from steelworks.train.config import ModelConfig, OptimConfig, TrainConfig
    from steelworks.train.driver import run_training

    vocab, seq, micro = (1000, 32, 2) if smoke else (151936, 2048, 4)
    tok_dir, data = WORK / f"tokenizer-{vocab}", WORK / f"shards-{vocab}-{seq}"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(["北京是中国的首都。 hello world"] * 50, vocab_size=300, out_dir=tok_dir, min_frequency=1)
        tok = load_tokenizer(tok_dir)
        tok.add_tokens([f"<|placeholder_{i}|>" for i in range(vocab - len(tok))])
        tok.save_pretrained(tok_dir)
    if not (data / "index.json").exists():
        rows = np.random.default_rng(0).integers(0, vocab, size=((steps + 2) * micro, seq))
        dt = token_dtype(vocab)
        data.mkdir(parents=True, exist_ok=True)
        ShardIndex(seq, str(dt), vocab, 0, "pretrain", [write_shard(data / "s0.bin", rows, dt)]).save(data)
    results = []
    for kernels in ([], ["rmsnorm", "rope", "swiglu", "ce"]):
        cfg = TrainConfig(model=ModelConfig(size=size), optim=OptimConfig(warmup_steps=1), max_steps=steps,
                          micro_batch_size=micro, num_workers=1, use_gpu=device.type == "cuda",
                          log_every=max(steps // 2, 1), kernels=kernels, tensorboard=False)
        out = WORK / f"e2e-{size}-{'on' if kernels else 'off'}"
        job = {"task": "bench", "train": to_dict(cfg), "tokenizer_dir": str(tok_dir), "data_dir": str(data),
               "out_dir": str(out)}
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        summary = run_training(job, cfg, use_ray=False)
        results.append({"kernels": kernels, **{k: summary.get(k) for k in ("tokens_per_s", "mfu", "memory_gb", "loss")}})
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--kernels", nargs="*", default=["rmsnorm", "rope", "swiglu", "ce", "flce"])
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the code path (CPU interpreter)")
    p.add_argument("--e2e", default=None, help="also train this model size with kernels off/on")
    p.add_argument("--e2e-steps", type=int, default=20)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for kernel, shapes in cases(device, dtype, args.smoke).items():
        if kernel not in args.kernels:
            continue
        for label, impls in shapes:
            res = {impl: measure(make, device, args.reps) for impl, make in impls.items()}
            for impl, r in res.items():
                rows.append({"kernel": kernel, "shape": label, "impl": impl, **r,
                             "speedup_vs_torch": res["torch"]["ms"] / r["ms"],
                             "vs_liger_time": (r["ms"] / res["liger"]["ms"]) if "liger" in res else None,
                             "vs_liger_mem": (r["peak_mib"] / res["liger"]["peak_mib"]) if "liger" in res else None})
                print(f"{kernel:8s} {label:40s} {impl:10s} {r['ms']:9.3f} ms {r['peak_mib']:9.1f} MiB", flush=True)
    e2e = run_e2e(args.e2e, device, args.e2e_steps, args.smoke) if args.e2e else None
    print("\n| kernel | shape | impl | fwd+bwd ms | peak MiB | x torch speed | time / liger | mem / liger |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        print(f"| {r['kernel']} | {r['shape']} | {r['impl']} | {r['ms']:.3f} | {r['peak_mib']:.1f} | "
              f"{r['speedup_vs_torch']:.2f} | {fmt(r['vs_liger_time'])} | {fmt(r['vs_liger_mem'])} |")
    if e2e:
        print("\n| kernels | tokens/s | MFU | memory GB | loss |\n|---|---:|---:|---:|---:|")
        for r in e2e:
            print(f"| {','.join(r['kernels']) or 'none'} | {r['tokens_per_s']:,.0f} | {r['mfu']:.3f} | "
                  f"{r['memory_gb']:.1f} | {r['loss']:.3f} |")
    from steelworks.core.atomic import atomic_write_json

    WORK.mkdir(parents=True, exist_ok=True)
    atomic_write_json(WORK / "results.json", {
        "command": shlex.join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d"),
        "machine": {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
                    "torch": torch.__version__, "liger": _liger() is not None},
        "rows": rows, "e2e": e2e})
    print(f"\nresults: {WORK / 'results.json'}")


if __name__ == "__main__":
    main()
