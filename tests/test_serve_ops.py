"""Serving operations: logprobs/echo over HTTP, Prometheus metrics, backpressure (503), the
eval endpoint, and a disconnect freeing its batch slot."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from fastapi.testclient import TestClient

from steelworks.inference.engine import Engine
from steelworks.inference.sampling import SamplingParams
from steelworks.serve.app import build_app
from steelworks.serve.config import ServeConfig
from steelworks.serve.routes.streaming import _deltas

KEY = "sk-ops"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def engine(shaken_model_dir) -> Engine:
    eng = Engine.from_dir(shaken_model_dir, max_batch_size=4, max_queue=2)
    yield eng
    eng.shutdown()




@pytest.fixture(scope="module")
def client(engine, mini_ceval_dir) -> TestClient:
    cfg = ServeConfig(api_key=KEY, model_name="steel", max_tokens=8, benchmarks={"mini": str(mini_ceval_dir)})
    return TestClient(build_app(engine, cfg))


def _log_softmax_rows(engine: Engine, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(engine.model(torch.tensor([ids])).logits[0].float(), -1)


def test_completion_logprobs_are_the_models_log_softmax(client, engine):
    prompt = "北京是中国的首都。"
    r = client.post("/v1/completions", headers=AUTH,
                    json={"prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 2})
    body = r.json()
    assert r.status_code == 200, body
    lp = body["choices"][0]["logprobs"]
    prompt_ids = engine.encode(prompt)
    assert len(lp["token_logprobs"]) == body["usage"]["completion_tokens"] == 5
    full = engine.generate(prompt_ids, SamplingParams(max_tokens=5, temperature=0)).token_ids
    rows = _log_softmax_rows(engine, prompt_ids + full)
    for i, (tid, got) in enumerate(zip(full, lp["token_logprobs"])):
        assert got == pytest.approx(float(rows[len(prompt_ids) - 1 + i, tid]), abs=1e-4)
        top = lp["top_logprobs"][i]
        assert engine.tokenizer.decode([tid]) in top and len(top) >= 2
    assert lp["tokens"] == [engine.tokenizer.decode([t]) for t in full]
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_echo_scores_the_prompt_like_lm_eval_asks(client, engine):
    prompt = "北京是中国的首都。上海是一座大城市。"
    r = client.post("/v1/completions", headers=AUTH,
                    json={"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0})
    body = r.json()
    assert r.status_code == 200, body
    ids = engine.encode(prompt)
    lp = body["choices"][0]["logprobs"]
    rows = _log_softmax_rows(engine, ids)
    assert body["choices"][0]["text"] == engine.tokenizer.decode(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(float(rows[i - 1, ids[i]]), abs=1e-4)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    # bad combinations are 400s, not 500s
    r = client.post("/v1/completions", headers=AUTH, json={"prompt": prompt, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = client.post("/v1/completions", headers=AUTH,
                    json={"prompt": prompt, "logprobs": 1, "stream": True, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_metrics_count_requests_and_tokens(client):
    assert client.get("/metrics").status_code == 401  # behind the key like the API
    client.post("/v1/completions", headers=AUTH, json={"prompt": "你好", "max_tokens": 3, "ignore_eos": True,
                                                       "temperature": 0})
    text = client.get("/metrics", headers=AUTH).text
    assert 'steelworks_requests_total{route="/v1/completions",status="200"}' in text
    gen = [ln for ln in text.splitlines() if ln.startswith("steelworks_generation_tokens_total")]
    assert gen and float(gen[0].split()[-1]) >= 3
    for name in ("steelworks_num_requests_waiting", "steelworks_num_requests_running",
                 "steelworks_time_to_first_token_seconds_bucket", "steelworks_request_latency_seconds_bucket"):
        assert name in text


def test_full_queue_answers_503_with_retry_after(client, engine):
    ids = engine.encode("你好")
    hold = [engine.stream(ids, SamplingParams(max_tokens=400, temperature=1.0, seed=i, ignore_eos=True))
            for i in range(6)]  # 4 running + 2 queued: engine full
    try:
        r = client.post("/v1/completions", headers=AUTH, json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "server_busy"
    finally:
        for s in hold:
            s.cancel()
    deadline = time.time() + 30
    while engine.stats()["running"] + engine.stats()["waiting"] and time.time() < deadline:
        time.sleep(0.05)
    assert client.post("/v1/completions", headers=AUTH, json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_disconnect_mid_stream_frees_the_slot(engine):
    class GoneRequest:  # the client hangs up after the first delta
        async def is_disconnected(self) -> bool:
            return True

    stream = engine.stream(engine.encode("你好"), SamplingParams(max_tokens=400, ignore_eos=True, seed=0))

    async def consume():
        return [d async for d in _deltas(stream, GoneRequest())]

    assert len(asyncio.run(consume())) == 1
    deadline = time.time() + 30
    while engine.stats()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert engine.stats()["running"] == 0
    assert stream.result is None or stream.result.finish_reason == "cancelled"


def test_eval_endpoint_sync_and_job(client, engine, mini_ceval_dir):
    from steelworks.evals.config import EvalConfig
    from steelworks.evals.runner import evaluate

    r = client.post("/v1/evals", headers=AUTH, json={"benchmark": "mini", "scoring": "letter"})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "completed", body
    expected, _ = evaluate(engine.model, engine.tokenizer, mini_ceval_dir, EvalConfig(scoring="letter"))
    assert body["report"]["micro_acc"] == expected["micro_acc"] and body["report"]["n"] == expected["n"]
    r = client.post("/v1/evals", headers=AUTH, json={"benchmark": "nope"})
    assert r.status_code == 400 and "mini" in r.json()["error"]["message"]
    assert client.post("/v1/evals", json={"benchmark": "mini"}).status_code == 401
    # above the synchronous limit the endpoint answers 202 with a job to poll
    client.app.state.serve.config.eval_sync_items = 0
    try:
        r = client.post("/v1/evals", headers=AUTH, json={"benchmark": "mini", "max_items": 1})
        assert r.status_code == 202
        jid = r.json()["id"]
        deadline = time.time() + 60
        while (job := client.get(f"/v1/evals/{jid}", headers=AUTH).json())["status"] == "running":
            assert time.time() < deadline
            time.sleep(0.1)
        assert job["status"] == "completed" and job["report"]["n"] >= 1
        assert client.get("/v1/evals/eval-missing", headers=AUTH).status_code == 404
    finally:
        client.app.state.serve.config.eval_sync_items = 200


def test_waker_sets_every_event_with_one_loop_call_per_burst() -> None:
    """Engine threads wake streams through ``_Waker``: all 100 tokens of one engine step
    reach their streams, and the loop is woken once for the burst, not once per token."""
    import asyncio
    import threading

    from steelworks.serve.routes.streaming import _waker

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        events = [asyncio.Event() for _ in range(100)]
        calls = 0
        real = loop.call_soon_threadsafe

        def counting(*args, **kw):
            nonlocal calls
            calls += 1
            return real(*args, **kw)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        waker = _waker(loop)
        assert _waker(loop) is waker  # one per loop
        t = threading.Thread(target=lambda: [waker.wake(e) for e in events])
        t.start()
        t.join()  # the whole burst lands before the loop runs again
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 5)
        return calls, sum(e.is_set() for e in events)

    assert asyncio.run(main()) == (1, 100)
