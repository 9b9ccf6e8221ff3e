"""`make gpu-check`'s CPU smoke mode: every step (kernel tests, kernels vs eager, training with
kernels off and on) runs at tiny size in Triton's interpreter and lands in the JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.kernels
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_step():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((ROOT / "benchmarks/.work/gpu_check/gpu_check-smoke.json").read_text())
    assert [s["step"] for s in report["steps"]] == [
        "kernel tests", "kernels vs eager and Liger", "train tiny, kernels off/on"]
    assert all(s["status"] == "ok" for s in report["steps"])
    assert {r["kernel"] for r in report["kernels"]} >= {"rmsnorm", "rope", "swiglu", "ce"}
    runs = report["train"]["tiny"]
    assert [r["kernels"] for r in runs] == [[], ["rmsnorm", "rope", "swiglu", "ce"]]
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in runs)
    assert report["environment"]["torch"]
