"""Scaling: data-stage and training throughput on 1, 2 and 4 Ray nodes.

For each node count N, in a fresh subprocess:

- **data**: ``run_data`` + ``run_tokenizer`` (the whole data side: normalize, Steel-LLM
  filters, exact dedup, tokenize, pack) on the ../shared/corpora text samples repeated to
  ``--mb`` megabytes (input maker of ``benchmarks/data_pipeline.py``), with one 16k BPE for
  every N and every --mb, trained once on the samples themselves (untimed, cached).
  Reported as docs/s and MB/s of input.
- **train**: steelworks' ``train_loop`` under Ray Train (``TorchTrainer``, FSDP2 over gloo)
  with ``num_workers = N``, one worker per node (``STRICT_SPREAD``), on the packed shards the
  data run just wrote; a tiny model, a fixed per-worker batch (weak scaling: the global
  batch grows with N).  Reported as tokens/s over all workers in the second of two
  ``--steps``-step windows (``log_every = steps``: the first window is the warm-up; each
  metrics report is a Ray Train barrier that costs ~0.1-1.5 s here, so logging every step
  would measure the reports); the worker group's start-up is reported separately.
- **overhead per node**: the seconds to start a node and the resident memory of its
  daemons (raylet, agents); and the scaling efficiency, throughput(N) / (N x throughput(1)).

Simulated nodes.  By default every node is a real raylet on this machine, added with
``ray.cluster_utils.Cluster``: a head with 0 CPUs (GCS, drivers, the Train controller) and N
nodes of ``--cpus-per-node`` CPUs, each with its own object store, so Ray Data moves blocks
between object stores and Ray Train's gloo ring spans nodes, as on a real cluster.  Not the
``fake_multinode`` autoscaler (cluster-local.yaml): it adds nodes only on demand,
so a timed run would include node start-ups and the autoscaler's polling (5 s) and idle
timeouts, and the node count during a stage would drift.  ``Cluster`` gives exactly N nodes
before the clock starts; the autoscaler's behaviour is recorded separately (RESULTS.md).

On this 2-core machine N simulated nodes share the same 2 cores: throughput cannot exceed
about 2x the 1-node figure however many nodes there are, and the per-node daemons take
CPU time from the work.  The table says so.  On a real cluster::

    python benchmarks/scaling.py --address HEAD_IP:6379 --work /shared/steelworks-bench

connects to the running cluster (token auth, as ``steelworks submit``) and uses its nodes:
N is capped at the nodes with CPUs, the data stage is limited to the CPUs of N nodes (Ray
Data ``resource_limits``; its shuffle partitions still follow the whole cluster), training
uses N workers spread one per node with ``--cpus-per-node`` CPUs each.  ``--work`` must be
on storage every node mounts (the data tasks read the input there; Ray Train writes its
checkpoints there).

    .venv/bin/python benchmarks/scaling.py                 # 1, 2, 4 simulated nodes, ~5 min
    .venv/bin/python benchmarks/scaling.py --nodes 1 2 --mb 40 --steps 50

Checkpoints on object storage (``--checkpoint-io``): one process saves and loads a training
checkpoint (model + AdamW state, ``train/checkpoint.py``) on local disk, and with the run in a
bucket (``runs_dir: s3://...``: saved locally, then uploaded; loaded on a node without the
local copy: fetched, then read), side by side in one run, as seconds, MB/s and ratios. The
bucket is a local S3 endpoint (moto's server, started here) unless ``--s3-uri`` names one
(credentials and ``AWS_ENDPOINT_URL`` from the environment)::

    .venv/bin/python benchmarks/scaling.py --checkpoint-io --ckpt-model 100m --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing the package
WORK = ROOT / "benchmarks" / ".work" / "scaling"
TOKENIZER = "tokenizer-samples-16k"


def _data_pipeline() -> Any:
    """benchmarks/data_pipeline.py as a module: its input maker and sample list."""
    spec = importlib.util.spec_from_file_location("data_pipeline", ROOT / "benchmarks" / "data_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_tokenizer(dp: Any, work: Path) -> Path:
    """A 16k BPE trained on every document of the shared samples, once: the same vocabulary
    (so the same LM-head cost per token) whatever --mb or the work dir's history."""
    from steelworks.data.tokenizer import train_tokenizer as train

    out = work / TOKENIZER
    if not (out / "tokenizer.json").exists():
        texts = []
        for name, field, kind in dp.TEXT_SAMPLES:
            path = dp.SHARED / name
            records = json.loads(path.read_text()) if kind == "json" else \
                [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            texts += [r[field] for r in records]
        train(texts, vocab_size=16000, out_dir=out, min_frequency=2)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- cluster ------------------------------------------------------------------------------

def _daemon_rss_mib(node: Any) -> float:
    """Resident memory of one node's own processes: the raylet and the agents it starts
    (dashboard agent, runtime-env agent), not its worker processes."""
    import psutil

    procs = []
    for infos in node.all_processes.values():
        for info in infos:
            try:
                proc = psutil.Process(info.process.pid)
                procs.append(proc)
                procs += [c for c in proc.children(recursive=True)
                          if "agent" in " ".join(c.cmdline()).lower()]
            except psutil.Error:
                continue
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def start_simulated(n: int, cpus_per_node: int) -> tuple[Any, dict[str, Any]]:
    """A head with 0 CPUs plus ``n`` nodes of ``cpus_per_node`` CPUs on this machine."""
    import ray._private.utils
    from ray.cluster_utils import Cluster

    from steelworks.platform.connect import _enable_token_auth_in_process, ensure_token

    ensure_token()
    _enable_token_auth_in_process()  # every process the nodes start inherits token mode
    # Cluster() records its address in /tmp/ray/ray_current_cluster, where a plain
    # `ray.init()` / `ray status` of anyone else on this machine would then find it.
    ray._private.utils.write_ray_address = lambda *a, **k: None
    temp_dir = tempfile.mkdtemp(prefix="sw-scale-", dir="/tmp")  # short: unix socket paths
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "temp_dir": temp_dir, "include_dashboard": False,  # GCS port: random
            "dashboard_agent_listen_port": _free_port(), "object_store_memory": 200 << 20})
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    starts, nodes = [], []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            nodes.append(cluster.add_node(num_cpus=cpus_per_node, object_store_memory=300 << 20))
            starts.append(time.perf_counter() - t0)  # until the node is registered in the GCS
        cluster.connect()
    except BaseException:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    cluster.temp_dir = temp_dir
    time.sleep(3)  # the agents finish starting after the node registers
    rss = [_daemon_rss_mib(node) for node in nodes]
    return cluster, {"node_start_s": sum(starts) / n, "node_rss_mib": sum(rss) / n}


def connect_existing(address: str, n: int, cpus_per_node: int) -> dict[str, Any]:
    import ray
    from ray.data import DataContext, ExecutionResources

    from steelworks.platform.connect import connect

    connect(address)
    nodes = [x for x in ray.nodes() if x["Alive"] and x["Resources"].get("CPU", 0) >= cpus_per_node]
    if len(nodes) < n:
        print(f"SKIP: the cluster has {len(nodes)} node(s) with >= {cpus_per_node} CPUs, not {n}",
              flush=True)
        raise SystemExit(0)
    cpus = sum(sorted((x["Resources"]["CPU"] for x in nodes), reverse=True)[:n])
    DataContext.get_current().execution_options.resource_limits = ExecutionResources(cpu=cpus)
    return {"node_start_s": None, "node_rss_mib": None, "cpus_used": cpus}


# --- workloads ----------------------------------------------------------------------------

def run_data_side(work: Path, runs: Path, seq_len: int) -> dict[str, Any]:
    from steelworks.core.config import load
    from steelworks.platform.pipeline import run_data, run_tokenizer
    from steelworks.platform.settings import PipelineConfig

    shutil.rmtree(runs, ignore_errors=True)
    cfg = load(PipelineConfig, None, [
        f"runs_dir={runs}", "run=bench", "data.source=files", "data.recipe=steel_text",
        f"data.sources=[{{name: bench, path: {work / 'input'}, format: jsonl}}]",
        "data.dedup.exact=true", "data.dedup.minhash.enabled=false",
        f"tokenizer.pretrained_dir={work / TOKENIZER}", f"pack.seq_len={seq_len}"])
    t0 = time.perf_counter()
    data = run_data(cfg, force=True)
    tok = run_tokenizer(cfg, force=True)
    seconds = time.perf_counter() - t0
    return {"data_s": seconds, "read": data["metrics"]["totals"]["read"],
            "kept": data["metrics"]["totals"].get("kept", 0),
            "tokens": tok["metrics"]["pretrain"]["tokens"],
            "tokenizer_dir": str(runs / "bench" / "tokenizer" / "tokenizer"),
            "shards_dir": str(runs / "bench" / "tokenizer" / "shards" / "pretrain")}


def run_train_side(args: argparse.Namespace, n: int, data: dict[str, Any], out: Path) -> dict[str, Any]:
    """Ray Train with n workers, one per node. Built here rather than by
    ``steelworks.train.driver.run_training`` for the one thing it does not set: the
    placement (``STRICT_SPREAD``), without which PACK may put two workers on one node."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from steelworks.core.config import to_dict
    from steelworks.train.config import ModelConfig, OptimConfig, TrainConfig
    from steelworks.train.loop import train_loop

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(model=ModelConfig(size=args.model_size),
                      optim=OptimConfig(schedule="constant", warmup_steps=0),
                      max_steps=2 * args.steps, micro_batch_size=args.micro_batch,
                      num_workers=n, seed=0, log_every=args.steps, ckpt_every=0, keep_last=1)
    cfg.tensorboard = False
    job = {"task": "pretrain", "train": to_dict(cfg), "tokenizer_dir": data["tokenizer_dir"],
           "data_dir": data["shards_dir"], "out_dir": str(out), "ray": True}
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop, train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=n, resources_per_worker={"CPU": args.cpus_per_node},
                                     placement_strategy="STRICT_SPREAD"),
        run_config=RunConfig(name="checkpoints", storage_path=str(out)))
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows] == [args.steps, 2 * args.steps], rows
    tps = rows[-1]["tokens_per_s"]  # the second window: steps+1 .. 2*steps
    per_step = args.micro_batch * (int(json.loads(Path(data["shards_dir"], "index.json").read_text())
                                       ["seq_len"]) - 1) * n
    train_s = args.steps * per_step / tps
    summary = json.loads((out / "summary.json").read_text())
    return {"train_tokens_per_s": tps, "train_wall_s": wall, "train_steady_s": train_s,
            # fit() minus the timed steps: worker group start, process group, model build,
            # the warm-up window, the final checkpoint and HF export.
            "train_overhead_s": wall - train_s, "world_size": summary["world_size"],
            "final_loss": rows[-1]["loss"]}


def _child(args: argparse.Namespace) -> None:
    n, work = args.child, Path(args.work)
    cluster = None
    try:
        t0 = time.perf_counter()
        if args.address:
            info = connect_existing(args.address, n, args.cpus_per_node)
        else:
            cluster, info = start_simulated(n, args.cpus_per_node)
        info["cluster_start_s"] = time.perf_counter() - t0
        import ray

        info["cluster_cpus"] = ray.cluster_resources().get("CPU", 0)
        info.setdefault("cpus_used", info["cluster_cpus"])
        data = run_data_side(work, work / f"runs-{n}", args.seq_len)
        train = run_train_side(args, n, data, work / f"train-{n}")
        print("RESULT " + json.dumps({"nodes": n, **info, **data, **train}), flush=True)
    finally:
        import ray

        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
            shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def _spawn(args: argparse.Namespace, n: int) -> dict[str, Any] | None:
    cmd = [sys.executable, __file__, "--child", str(n), "--work", args.work,
           "--cpus-per-node", str(args.cpus_per_node), "--seq-len", str(args.seq_len),
           "--steps", str(args.steps),
           "--micro-batch", str(args.micro_batch), "--model-size", args.model_size]
    if args.address:
        cmd += ["--address", args.address]
    print(f"$ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"  {n} node(s): no result within {args.timeout} s", flush=True)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            print(f"  {n} node(s): done in {time.perf_counter() - t0:.0f} s", flush=True)
            return result
        if line.startswith("SKIP: "):
            print(f"  {line}", flush=True)
            return None
    raise RuntimeError(f"{n}-node run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def _machine() -> str:
    import ray
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.node()}: {os.cpu_count()} cores, {mem:.0f} GiB, Python "
            f"{platform.python_version()}, Ray {ray.__version__}, torch {torch.__version__}")


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(args: argparse.Namespace, inp: dict[str, Any], results: list[dict[str, Any]]) -> str:
    mb = inp["bytes"] / 1e6
    base = results[0] if results and results[0]["nodes"] == 1 else None
    mode = (f"real cluster at {args.address}" if args.address else
            f"simulated: ray.cluster_utils.Cluster, head 0 CPUs + N nodes x {args.cpus_per_node} CPU "
            "on this one machine")
    lines = [
        f"- **Command:** `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
        f"- **Machine:** {_machine()}",
        f"- **Date:** {time.strftime('%Y-%m-%d %H:%M')}",
        f"- **Nodes:** {mode}",
        f"- **Data:** {inp['docs']:,} docs, {mb:.1f} MB (../shared/corpora samples, repeated), "
        f"steel_text recipe, exact dedup, pack to {args.seq_len} tokens",
        f"- **Train:** `{args.model_size}` model, {args.micro_batch} x {args.seq_len} tokens per worker "
        f"per step, {args.steps} warm-up + {args.steps} timed steps, 1 worker per node, "
        f"{args.cpus_per_node} CPU each",
    ]
    lines.append(f"- **Load average** (1 min) before / after the runs: {args.load_before:.1f} / "
                 f"{os.getloadavg()[0]:.1f} (other processes on the machine take CPU from the nodes)")
    if not args.address:
        lines.append(f"- **CPU ceiling:** {os.cpu_count()} cores shared by every simulated node: "
                     f"expect at most ~{os.cpu_count()}x the 1-node throughput, whatever N")
    lines += ["", "| nodes | Ray CPUs used | node start (s/node) | node daemons (MiB/node) | data s | docs/s "
              "| MB/s | data eff. | train tokens/s | train eff. | train fit - timed window (s) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        n = r["nodes"]
        d_eff = t_eff = None
        if base:
            d_eff = base["data_s"] / r["data_s"] / n
            t_eff = r["train_tokens_per_s"] / base["train_tokens_per_s"] / n
        lines.append(
            f"| {n} | {r['cpus_used']:.0f} | {_fmt(r['node_start_s'], '.1f')} "
            f"| {_fmt(r['node_rss_mib'], '.0f')} | {r['data_s']:.1f} | {inp['docs'] / r['data_s']:,.0f} "
            f"| {mb / r['data_s']:.2f} | {_fmt(d_eff, '.0%')} | {r['train_tokens_per_s']:,.0f} "
            f"| {_fmt(t_eff, '.0%')} | {r['train_overhead_s']:.1f} |")
    if results:
        kept = {r["kept"] for r in results}
        tokens = {r["tokens"] for r in results}
        lines += ["", f"Kept docs per run: {sorted(kept)}; packed tokens per run: {sorted(tokens)}. "
                  "Efficiency = throughput(N) / (N x throughput(1)). Node start: until the node "
                  "is registered; node daemons: raylet + dashboard and runtime-env agents. "
                  "data s: run_data + run_tokenizer. Train fit - timed window: worker-group start, "
                  "process group, model build, the warm-up window, final checkpoint and export."]
    return "\n".join(lines)


def _start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free loopback port (the test suite's endpoint, conftest.py)."""
    import socket

    port = _free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def checkpoint_io(args: argparse.Namespace) -> str:
    """Save and load one checkpoint on local disk and through the bucket; -> markdown."""
    moto = None
    if args.s3_uri is None:
        moto, endpoint = _start_moto()
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir("bench")
        args.s3_uri = "s3://bench/ckpt-io"
    try:
        rows = _checkpoint_rows(args)
    finally:
        if moto is not None:
            moto.terminate()
    return _checkpoint_table(args, rows, "moto_server on loopback" if moto else args.s3_uri)


def _checkpoint_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from steelworks.core.storage import Remote
    from steelworks.train.checkpoint import fetch_checkpoint, load_checkpoint, save_checkpoint
    from steelworks.train.config import ModelConfig
    from steelworks.train.model import build_decoder
    from steelworks.train.models import decoder_config

    torch.manual_seed(0)
    model = build_decoder(decoder_config(ModelConfig(size=args.ckpt_model), vocab_size=32000))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step, so the checkpoint holds AdamW's two moments
        p.grad = torch.zeros_like(p)
    opt.step()
    work = Path(tempfile.mkdtemp(prefix="ckpt-io-", dir=args.work))
    rows = []
    try:
        for i in range(args.repeats):
            remote = Remote(f"{args.s3_uri}/{i}")
            for where in ("local disk", "bucket"):
                d = work / f"{where.replace(' ', '-')}-{i}"
                t0 = time.perf_counter()
                path = save_checkpoint(d, 1, model, opt, {}, keep_last=1,
                                       remote=remote if where == "bucket" else None)
                save_s = time.perf_counter() - t0
                size = sum(f.stat().st_size for f in path.iterdir())
                t0 = time.perf_counter()
                if where == "bucket":  # another node: no local copy
                    shutil.rmtree(d)
                    path = fetch_checkpoint(remote, path.name, d)
                load_checkpoint(path, model, opt)
                rows.append({"where": where, "repeat": i, "bytes": size, "save_s": save_s,
                             "load_s": time.perf_counter() - t0})
                if where == "bucket":  # the store alone: one PUT and one GET of the same bytes
                    big = max(path.iterdir(), key=lambda f: f.stat().st_size)
                    t0 = time.perf_counter()
                    remote.upload(big, "raw.bin")
                    put_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    remote.download("raw.bin", d / "raw.bin")
                    rows.append({"where": "store alone", "repeat": i, "bytes": big.stat().st_size,
                                 "save_s": put_s, "load_s": time.perf_counter() - t0})
                shutil.rmtree(d, ignore_errors=True)
            remote.delete("")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _checkpoint_table(args: argparse.Namespace, rows: list[dict[str, Any]], store: str) -> str:
    import statistics

    def med(where: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["where"] == where)

    size = rows[0]["bytes"]
    local = {k: med("local disk", k) for k in ("save_s", "load_s")}
    bucket = {k: med("bucket", k) for k in ("save_s", "load_s")}
    alone = {k: med("store alone", k) for k in ("save_s", "load_s")}
    raw = next(r["bytes"] for r in rows if r["where"] == "store alone")
    lines = [f"- **Checkpoint:** `{args.ckpt_model}` model + AdamW state, {size / 1e6:,.0f} MB "
             f"in one process (1 DCP file); median of {args.repeats}.",
             f"- **Bucket:** {store}; local disk: {args.work}.",
             "- **Machine:** " + _machine().replace("\n", "; "), "",
             "| where | save s | save MB/s | load s | load MB/s |", "|---|---:|---:|---:|---:|"]
    for name, t in (("local disk", local), ("bucket (S3)", bucket)):
        lines.append(f"| {name} | {t['save_s']:.2f} | {size / 1e6 / t['save_s']:,.0f} | "
                     f"{t['load_s']:.2f} | {size / 1e6 / t['load_s']:,.0f} |")
    lines.append(f"| **bucket / local** | **{bucket['save_s'] / local['save_s']:.2f}x** | | "
                 f"**{bucket['load_s'] / local['load_s']:.2f}x** | |")
    lines.append(f"| the store alone: one PUT / one GET of the {raw / 1e6:,.0f} MB data file | "
                 f"{alone['save_s']:.2f} | {raw / 1e6 / alone['save_s']:,.0f} | "
                 f"{alone['load_s']:.2f} | {raw / 1e6 / alone['load_s']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4], help="node counts to run")
    ap.add_argument("--address", default=None,
                    help="GCS address of a running cluster (host:6379): use its nodes instead of "
                         "simulating them; --work must then be on storage all nodes share")
    ap.add_argument("--cpus-per-node", type=int, default=1,
                    help="CPUs of each simulated node, and of each training worker")
    ap.add_argument("--mb", type=float, default=5.0, help="data-stage input size in MB")
    ap.add_argument("--files", type=int, default=8, help="input files")
    ap.add_argument("--seq-len", type=int, default=256, help="packed sequence length")
    ap.add_argument("--model-size", default="tiny", help="steelworks model size for training")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per worker per step")
    ap.add_argument("--steps", type=int, default=20,
                    help="timed training steps (after as many warm-up steps)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per node count")
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint-io", action="store_true",
                    help="checkpoint save/load on local disk vs a bucket, instead of node scaling")
    ap.add_argument("--ckpt-model", default="100m", help="model size for --checkpoint-io")
    ap.add_argument("--repeats", type=int, default=3, help="--checkpoint-io repeats")
    ap.add_argument("--s3-uri", default=None,
                    help="--checkpoint-io: an existing bucket prefix (default: a local moto server)")
    args = ap.parse_args()
    if args.child:
        return _child(args)
    if args.checkpoint_io:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        table = checkpoint_io(args)
        print(table)
        if args.out:
            Path(args.out).write_text(table + "\n")
        return None
    args.load_before = os.getloadavg()[0]
    dp = _data_pipeline()
    if not dp.SHARED.exists():
        sys.exit(f"{dp.SHARED} is absent: this benchmark needs the shared corpus samples")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    inp = dp.make_input(work, args.mb, args.files)
    train_tokenizer(dp, work)
    print(f"input: {inp['docs']} docs, {inp['bytes'] / 1e6:.1f} MB in {inp['files']} files", flush=True)
    results = [r for n in sorted(args.nodes) if (r := _spawn(args, n)) is not None]
    (work / "results.json").write_text(json.dumps({"input": inp, "results": results}, indent=1))
    table = report(args, inp, results)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
