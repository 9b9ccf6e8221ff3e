"""Serving load test: the OpenAI-compatible app under 1..64 concurrent streaming clients,
against sequential ``transformers.generate`` on the same model, in the same run.

    .venv/bin/python benchmarks/serve_load.py                       # demo-size model, CPU
    .venv/bin/python benchmarks/serve_load.py --model runs/demo/sft/hf --concurrency 1 16

Each client sends streaming ``/v1/completions`` requests back to back (greedy,
``max_tokens`` fixed and ``ignore_eos`` so every request generates the same number of
tokens, as in vLLM's benchmark_serving). Reported per concurrency: output tokens/s over the
wall time, time to first token (TTFT) and inter-token latency (ITL) p50/p99, and the ratio
to the baseline. The baseline is what a plain HF setup does without a serving engine: one
``model.generate`` call at a time (``min_new_tokens = max_new_tokens``) over the same
prompts. The server is the app under uvicorn in its own process (the engine and app a Ray
Serve replica runs, without Ray's proxy in front); the clients share the machine's cores.
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


def _server_main(model_dir: str, max_batch: int, port: int, threads: int) -> None:
    import uvicorn

    from steelworks.serve.app import build_app
    from steelworks.serve.config import ServeConfig
    from steelworks.serve.engine import Engine

    torch.set_num_threads(threads)
    engine = Engine.from_dir(model_dir, max_batch_size=max_batch, max_queue=1024)
    uvicorn.run(build_app(engine, ServeConfig(port=port)), host="127.0.0.1", port=port, log_level="warning")


def serve(model_dir: Path, max_batch: int, threads: int) -> tuple[str, Any]:
    """The server in its own process, as in production: the load generator's Python work
    must not share a GIL with the engine it measures."""
    import multiprocessing

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = multiprocessing.get_context("spawn").Process(
        target=_server_main, args=(str(model_dir), max_batch, port, threads), daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        if time.time() > deadline or not proc.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


async def client(base: str, texts: list[str], max_tokens: int, out: list[dict[str, Any]]) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=600) as http:
        for text in texts:
            body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            stamps: list[float] = []
            tokens = 0
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
    ttft = [r["ttft"] for r in results]
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))  # noqa: E731
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "output_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_ms": 1e3 * q(ttft, 50), "ttft_p99_ms": 1e3 * q(ttft, 99),
            "itl_p50_ms": 1e3 * q(itl, 50), "itl_p99_ms": 1e3 * q(itl, 99)}


def engine_only(model_dir: Path, pool: list[str], concurrency: list[int], per_client: int, max_tokens: int,
                max_batch: int) -> list[dict[str, Any]]:
    """The batching engine driven in-process by client threads (no HTTP, no JSON): what the
    engine itself sustains, to separate it from the server's and the load generator's cost
    on a machine whose cores they share."""
    import threading

    from steelworks.serve.engine import Engine, SamplingParams

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an HF model directory (default: a random demo-size model)")
    p.add_argument("--size", default="demo")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--baseline-requests", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--server-threads", type=int, default=torch.get_num_threads(),
                   help="torch threads in the server process")
    args = p.parse_args()
    model_dir = args.model or build_model(args.size)
    pool = prompts(model_dir, 256)
    base = baseline(model_dir, pool, args.baseline_requests, args.max_tokens)
    print(f"baseline (sequential transformers.generate): {base['tokens_per_s']:.1f} tokens/s", flush=True)
    direct = engine_only(model_dir, pool, args.concurrency, args.requests_per_client, args.max_tokens,
                         args.max_batch)
    for r in direct:
        r["vs_baseline"] = r["tokens_per_s"] / base["tokens_per_s"]
    url, proc = serve(model_dir, args.max_batch, args.server_threads)
    load(url, 1, 1, 8, pool)  # warm-up
    rows = []
    for c in args.concurrency:
        r = load(url, c, args.requests_per_client, args.max_tokens, pool)
        r["vs_baseline"] = r["tokens_per_s"] / base["tokens_per_s"]
        rows.append(r)
        print(f"concurrency {c}: {r['tokens_per_s']:.1f} tokens/s ({r['vs_baseline']:.2f}x)", flush=True)
    proc.terminate()
    proc.join(10)
    print(f"\n{shlex.join([sys.executable, *sys.argv])}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model {model_dir.name}; {args.max_tokens} tokens per request\n")
    print("| clients | requests | output tokens/s | x baseline | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| baseline (sequential generate) | {base['requests']} | {base['tokens_per_s']:.1f} | 1.00x | | |")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['vs_baseline']:.2f}x | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} |")
    print("\n| clients | engine in-process (no HTTP) tokens/s | x baseline |\n|---:|---:|---:|")
    for r in direct:
        print(f"| {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['vs_baseline']:.2f}x |")
    from steelworks.platform.atomic import atomic_write_json

    atomic_write_json(WORK / "results.json", {"command": shlex.join([sys.executable, *sys.argv]),
                                              "date": time.strftime("%Y-%m-%d"), "baseline": base, "rows": rows, "engine_only": direct})


if __name__ == "__main__":
    main()
