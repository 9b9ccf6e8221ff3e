"""`make gpu-check`: everything this project wants from a lent GPU machine, in one run.

The machine (see the device README) has torch, triton and transformers but no Ray, no vLLM and
no network, so nothing here needs them. In at most ``--budget`` seconds (default 480) it runs:

1. the kernel tests compiled on CUDA (``STEELWORKS_TEST_DEVICE=cuda pytest -m kernels``);
2. ``benchmarks/kernels.py``: the fused kernels against eager PyTorch and Liger-Kernel (when
   its wheel was carried along and installed) at Llama shapes, bf16;
3. training in one process, bf16, kernels off and on: tokens/s, MFU and peak memory for
   ``100m`` and ``steel-1b`` (``kernels.py --e2e``);

and writes one JSON file, ``benchmarks/.work/gpu_check/gpu_check.json``, whose figures go in
benchmarks/RESULTS.md. Each step has its own time limit, and a step that fails or runs out of
time is recorded as such; the others still run.

    python benchmarks/gpu_check.py                 # on the GPU machine (what make gpu-check runs)
    python benchmarks/gpu_check.py --smoke         # CPU: every step at tiny size (Triton's
                                                   # interpreter), the check make test runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / ".work" / "gpu_check"
KERNEL_RESULTS = ROOT / "benchmarks" / ".work" / "kernels" / "results.json"


def _run(name: str, cmd: list[str], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    print(f"=== {name}: {shlex.join(cmd)} (limit {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = "timed out"
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                      for x in (e.stdout, e.stderr))
    seconds = time.perf_counter() - t0
    print(out[-4000:], flush=True)
    print(f"=== {name}: {status} in {seconds:.0f} s", flush=True)
    return {"step": name, "command": shlex.join(cmd), "status": status, "seconds": round(seconds, 1),
            "output_tail": out[-6000:]}


def _environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "host": platform.node(), "cpu_count": os.cpu_count()}
    for mod in ("triton", "transformers", "liger_kernel", "flash_attn"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: either way not usable here
            env[mod] = None
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, Triton's interpreter")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    ap.add_argument("--sizes", nargs="+", default=["100m", "steel-1b"], help="model sizes to train")
    ap.add_argument("--e2e-steps", type=int, default=12)
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if args.smoke:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
        env["STEELWORKS_TEST_DEVICE"] = "cuda"
    t_start = time.perf_counter()
    deadline = t_start + args.budget

    def left(share: float) -> float:  # this step's limit: a share of what is left, at least 30 s
        return max(30.0, (deadline - time.perf_counter()) * share)

    steps: list[dict[str, Any]] = []
    tests = ["tests/test_kernels_rope.py"] if args.smoke else ["-m", "kernels"]
    steps.append(_run("kernel tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                      left(0.25), env))
    bench = [sys.executable, "benchmarks/kernels.py", "--device", device]
    if args.smoke:
        bench += ["--smoke", "--dtype", "float32", "--reps", "1"]
    kernel_step = _run("kernels vs eager and Liger", bench, left(0.3), env)
    steps.append(kernel_step)
    results: dict[str, Any] = {}
    if KERNEL_RESULTS.exists() and kernel_step["status"] == "ok":
        results["kernels"] = json.loads(KERNEL_RESULTS.read_text())["rows"]
    results["train"] = {}
    sizes = ["tiny"] if args.smoke else args.sizes
    for i, size in enumerate(sizes):
        cmd = [sys.executable, "benchmarks/kernels.py", "--device", device, "--kernels", "--e2e", size,
               "--e2e-steps", str(2 if args.smoke else args.e2e_steps)]
        if args.smoke:
            cmd.append("--smoke")
        step = _run(f"train {size}, kernels off/on", cmd, left(1.0 / (len(sizes) - i)), env)
        steps.append(step)
        if step["status"] == "ok" and KERNEL_RESULTS.exists():
            results["train"][size] = json.loads(KERNEL_RESULTS.read_text())["e2e"]
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": args.smoke,
              "command": shlex.join([sys.executable, *sys.argv]), "environment": _environment(device),
              "seconds": round(time.perf_counter() - t_start, 1), "steps": steps, **results}
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / ("gpu_check-smoke.json" if args.smoke else "gpu_check.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)
    print(f"\n{'step':32s} status")
    for s in steps:
        print(f"{s['step']:32s} {s['status']} ({s['seconds']:.0f} s)")
    for size, rows in results.get("train", {}).items():
        for r in rows or []:
            print(f"train {size:9s} kernels={','.join(r['kernels']) or 'none':26s} "
                  f"{r['tokens_per_s'] or 0:10,.0f} tok/s  MFU {r['mfu'] or 0:.3f}  {r['memory_gb'] or 0:.1f} GB")
    print(f"\nwrote {path}")
    sys.exit(0 if all(s["status"] == "ok" for s in steps) else 1)


if __name__ == "__main__":
    main()
