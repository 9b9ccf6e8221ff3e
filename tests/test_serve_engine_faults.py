"""Engine-level faults of serving, each reproduced before it was fixed:

1. A dead scheduler thread: ``Engine.check_health`` raises with the reason, ``/health``
   answers 503 and the Ray Serve deployment's ``check_health`` raises (so Serve replaces
   the replica).
2. One request's sampling fails (its probabilities are NaN): that request fails alone; the
   rows batched with it finish exactly as they would have alone.
3. ``/v1/evals`` scores through the engine's public API only (no ``engine.model``), with
   the in-process evaluator's results; finished jobs are pruned; a full engine is a 503.
4. A client that hangs up mid-stream over a real socket (uvicorn, and Ray Serve's proxy)
   frees its batch row at once.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from conftest import uvicorn_in_thread
from fastapi.testclient import TestClient

import steelworks.inference.scheduler as scheduler_mod
from steelworks.inference.engine import Engine
from steelworks.inference.sampling import SamplingParams
from steelworks.inference.scheduler import QueueFullError
from steelworks.serve.app import build_app
from steelworks.serve.config import ServeConfig

TEXTS = ["北京是中国的首都。", "你好", "The quick brown fox jumps over the lazy dog.",
         "今天天气很好，我们去公园散步吧。"]






def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def throttle(model: torch.nn.Module, seconds: float) -> Any:
    """Slow every forward pass, so a leaked row stays visible for a while; returns the handle."""
    return model.register_forward_pre_hook(lambda *_: time.sleep(seconds))


# --- 1. health ----------------------------------------------------------------------------------

class SchedulerKilled(BaseException):
    """Not an ``Exception``: it escapes the scheduler's per-request handlers and ends its thread,
    like a bug in the loop itself would."""


def kill_scheduler(engine: Engine) -> None:
    handle = engine.model.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(
        SchedulerKilled("injected")))
    try:
        with pytest.raises(RuntimeError, match="generation failed"):
            engine.generate(engine.encode(TEXTS[1]), SamplingParams(max_tokens=4, temperature=0))
    finally:
        handle.remove()


def test_dead_scheduler_fails_health_checks(make_engine) -> None:
    from steelworks.serve.deployment import SteelworksServer

    engine = make_engine()
    client = TestClient(build_app(engine, ServeConfig(api_key="k")))
    # The deployment's method on a stand-in replica (a real one would load the model).
    server = SimpleNamespace(engine=engine)
    server.check_health = lambda: SteelworksServer.func_or_class.check_health(server)

    engine.check_health()  # never used yet: the thread starts lazily, and that is healthy
    server.check_health()
    assert client.get("/health").status_code == 200
    engine.generate(engine.encode(TEXTS[0]), SamplingParams(max_tokens=3, temperature=0))
    engine.check_health()

    kill_scheduler(engine)
    with pytest.raises(RuntimeError, match="SchedulerKilled"):
        engine.check_health()
    with pytest.raises(RuntimeError, match="SchedulerKilled"):
        server.check_health()
    r = client.get("/health")  # no API key needed, as for a healthy server
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "server_error" and "SchedulerKilled" in err["message"]


def test_dying_scheduler_ends_waiting_calls(make_engine) -> None:
    """A call (prompt logprobs) running when the thread dies, and a request being prefilled,
    get the error instead of waiting forever (both hung before)."""
    engine = make_engine()
    handle = engine.model.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(
        SchedulerKilled("injected")))
    out: dict[str, BaseException] = {}

    def score() -> None:
        try:
            engine.prompt_logprobs(engine.encode(TEXTS[0]))
        except RuntimeError as e:
            out["error"] = e

    try:
        t = threading.Thread(target=score, daemon=True)
        t.start()
        t.join(20)
    finally:
        handle.remove()
    assert not t.is_alive(), "prompt_logprobs hung after the scheduler died"
    assert "SchedulerKilled" in str(out["error"])
    with pytest.raises(RuntimeError, match="SchedulerKilled"):
        engine.check_health()


def test_shut_down_engine_is_unhealthy(make_engine) -> None:
    engine = make_engine()
    engine.generate(engine.encode(TEXTS[0]), SamplingParams(max_tokens=2, temperature=0))
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.check_health()
    assert TestClient(build_app(engine, ServeConfig())).get("/health").status_code == 503


# --- 2. one row, one failure --------------------------------------------------------------------

BAD_SEED = 666


@pytest.fixture
def nan_for_bad_seed(monkeypatch) -> SimpleNamespace:
    """From its 5th token on, the request seeded ``BAD_SEED`` sees NaN logits: its sampler
    raises (torch.multinomial refuses NaN probabilities). ``widths`` collects the engine's
    running rows at each failure (set ``engine`` first), to show the bad row was decoding
    together with others."""
    real_pick = scheduler_mod.pick_token
    calls: dict[int, int] = {}
    state = SimpleNamespace(engine=None, widths=[])

    def pick(logits: torch.Tensor, p: SamplingParams, seen: Any, gen: Any) -> torch.Tensor:
        if p.seed == BAD_SEED:
            calls[id(gen)] = calls.get(id(gen), 0) + 1
            if calls[id(gen)] >= 5:
                state.widths.append(state.engine.stats()["running"])
                logits = torch.full_like(logits, float("nan"))
        return real_pick(logits, p, seen, gen)

    monkeypatch.setattr(scheduler_mod, "pick_token", pick)
    return state


def test_one_rows_sampling_failure_fails_only_that_row(make_engine, nan_for_bad_seed) -> None:
    engine = nan_for_bad_seed.engine = make_engine(max_batch_size=4)
    prompts = [engine.encode(t) for t in TEXTS]
    params = [SamplingParams(max_tokens=30, temperature=0.9, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=1.0, seed=BAD_SEED, ignore_eos=True),
              SamplingParams(max_tokens=25, temperature=0.7, top_k=20, seed=3, ignore_eos=True,
                             logprobs=2)]
    good = [0, 1, 3]
    solo = {i: engine.generate(prompts[i], params[i]) for i in good}

    handle = throttle(engine.model, 0.003)  # keep all four rows in flight together
    try:
        streams = [engine.stream(ids, p) for ids, p in zip(prompts, params, strict=True)]
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}

        def consume(i: int) -> None:
            try:
                results[i] = "".join(streams[i])
            except Exception as e:
                errors[i] = e

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        handle.remove()
    assert nan_for_bad_seed.widths[:1] == [4]  # it failed inside a 4-row batch
    assert set(errors) == {2}, errors
    assert "probability tensor" in str(errors[2].__cause__)
    for i in good:
        r = streams[i].result
        assert r.token_ids == solo[i].token_ids and results[i] == solo[i].text
        assert r.finish_reason == "length"
        if i == 3:  # batched matmuls may differ from solo ones in the last float bits
            assert r.token_logprobs == pytest.approx(solo[i].token_logprobs, abs=1e-4)
    wait_for(lambda: engine.stats()["running"] == 0, what="rows to leave")
    engine.check_health()  # a request's failure is not the engine's


def test_failed_row_is_a_500_for_that_request_only(make_engine, nan_for_bad_seed) -> None:
    engine = nan_for_bad_seed.engine = make_engine(max_batch_size=4)
    app = build_app(engine, ServeConfig(max_tokens=30))
    bodies = [{"prompt": t, "max_tokens": 30, "temperature": 0.8, "seed": s, "ignore_eos": True}
              for t, s in zip(TEXTS, (1, 2, BAD_SEED, 4), strict=True)]
    solo = [engine.generate(engine.encode(b["prompt"]),
                            SamplingParams(max_tokens=30, temperature=0.8, seed=b["seed"],
                                           ignore_eos=True)).text
            for b in bodies if b["seed"] != BAD_SEED]
    handle = throttle(engine.model, 0.003)
    try:
        with uvicorn_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
            answers: list[Any] = [None] * 4

            def post(i: int) -> None:
                answers[i] = http.post("/v1/completions", json=bodies[i])

            threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
    finally:
        handle.remove()
    assert nan_for_bad_seed.widths and max(nan_for_bad_seed.widths) > 1
    assert answers[2].status_code == 500 and answers[2].json()["error"]["type"] == "server_error"
    texts = [a.json()["choices"][0]["text"] for i, a in enumerate(answers) if i != 2]
    assert [a.status_code for i, a in enumerate(answers) if i != 2] == [200] * 3
    assert texts == solo


# --- 3. /v1/evals through the engine -------------------------------------------------------------



class PublicAPIOnly:
    """An engine seen through its public API only, as the vLLM engine offers it: no in-process
    ``model`` (nor ``device`` or private state) to reach for."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        if name in ("model", "device") or name.startswith("_"):
            raise AttributeError(f"{name!r} is not part of the engine API")
        return getattr(self._engine, name)


def eval_client(engine: Any, mini_ceval_dir: Path, **cfg: Any) -> TestClient:
    return TestClient(build_app(engine, ServeConfig(benchmarks={"mini": str(mini_ceval_dir)}, **cfg)))


@pytest.mark.parametrize(("scoring", "num_shots", "chat"),
                         [("letter", 0, True), ("option_text", 1, True), ("letter", 1, False)])
def test_evals_score_through_the_engine_like_in_process(make_engine, model_and_tokenizer,
                                                        mini_ceval_dir: Path, scoring: str,
                                                        num_shots: int, chat: bool) -> None:
    from steelworks.evals.config import EvalConfig
    from steelworks.evals.runner import evaluate

    client = eval_client(PublicAPIOnly(make_engine(max_batch_size=4)), mini_ceval_dir)
    r = client.post("/v1/evals", json={"benchmark": "mini", "scoring": scoring, "chat": chat,
                                       "num_shots": num_shots, "predictions": True})
    assert r.status_code == 200, r.text
    body = r.json()
    cfg = EvalConfig(benchmark=str(mini_ceval_dir), scoring=scoring, num_shots=num_shots, chat=chat)
    want, want_preds = evaluate(*model_and_tokenizer, mini_ceval_dir, cfg)
    got_preds = body["predictions"]
    assert [p["pred"] for p in got_preds] == [p["pred"] for p in want_preds]
    assert [(p["subject"], p["id"], p["correct"]) for p in got_preds] == \
           [(p["subject"], p["id"], p["correct"]) for p in want_preds]
    for g, w in zip(got_preds, want_preds, strict=True):
        assert list(g["scores"].values()) == pytest.approx(list(w["scores"].values()), abs=1e-4)
    report = body["report"]
    assert (report["micro_acc"], report["n"]) == (want["micro_acc"], want["n"])
    assert report["meta"]["benchmark"] == "mini" and report["meta"]["items"] == len(want_preds)


def test_generative_evals_go_through_the_engine(make_engine, model_and_tokenizer,
                                                mini_ceval_dir: Path) -> None:
    from steelworks.evals.config import EvalConfig
    from steelworks.evals.runner import evaluate

    client = eval_client(PublicAPIOnly(make_engine(max_batch_size=4)), mini_ceval_dir)
    r = client.post("/v1/evals", json={"benchmark": "mini", "mode": "generative",
                                       "max_new_tokens": 6, "predictions": True})
    assert r.status_code == 200, r.text
    cfg = EvalConfig(benchmark=str(mini_ceval_dir), mode="generative", max_new_tokens=6)
    want, want_preds = evaluate(*model_and_tokenizer, mini_ceval_dir, cfg)
    got = r.json()
    assert [p["reply"] for p in got["predictions"]] == [p["reply"] for p in want_preds]
    assert got["report"]["unparseable"]["n"] == want["unparseable"]["n"]


def test_eval_on_a_full_engine_is_a_503(make_engine, mini_ceval_dir: Path) -> None:
    class Full(PublicAPIOnly):
        def prompt_logprobs(self, *_: Any, **__: Any) -> Any:
            raise QueueFullError("too many model calls are queued; retry later")

    r = eval_client(Full(make_engine()), mini_ceval_dir).post("/v1/evals", json={"benchmark": "mini"})
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] and r.json()["error"]["code"] == "server_busy"


def test_finished_eval_jobs_are_pruned(make_engine, mini_ceval_dir: Path) -> None:
    engine = make_engine()
    client = eval_client(PublicAPIOnly(engine), mini_ceval_dir, eval_sync_items=0, eval_keep_jobs=2)

    def submit() -> str:
        r = client.post("/v1/evals", json={"benchmark": "mini", "max_items": 1})
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def status(jid: str) -> str | None:
        r = client.get(f"/v1/evals/{jid}")
        return r.json()["status"] if r.status_code == 200 else None

    done = []
    for _ in range(3):
        done.append(submit())
        wait_for(lambda: status(done[-1]) == "completed", 60, what="an eval job")
    assert [status(j) for j in done] == [None, "completed", "completed"]  # the oldest is gone
    assert client.get(f"/v1/evals/{done[0]}").status_code == 404

    # Jobs still running are never pruned, however many finish meanwhile.
    parked, go = threading.Event(), threading.Event()

    def hold(*_: Any) -> None:
        parked.set()
        assert go.wait(60)

    handle = engine.model.register_forward_pre_hook(hold)
    try:
        running = [submit(), submit(), submit()]  # one scoring, two waiting for their turn
        assert parked.wait(20)
        assert [status(j) for j in running] == ["running"] * 3
        assert [status(j) for j in done[1:]] == ["completed"] * 2
    finally:
        handle.remove()
        go.set()
    # (A pruned job answers 404, status None: it finished too.)
    wait_for(lambda: "running" not in [status(j) for j in running], 60, what="the jobs")
    assert [status(j) for j in running[1:]] == ["completed"] * 2
    assert status(running[0]) is None and all(status(j) is None for j in done)


# --- 4. disconnects over a real socket ----------------------------------------------------------

LONG = 6000  # tokens: seconds of decoding, so a row left running after a hang-up is visible


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory, tiny_tokenizer_dir: Path) -> Path:
    """The tiny model with an 8192-token window, so one generation can run for seconds."""
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.config import ModelConfig
    from steelworks.train.models import build_hf_config, build_model

    tok = load_tokenizer(tiny_tokenizer_dir)
    cfg = build_hf_config(ModelConfig(size="tiny"), len(tok), tok.pad_token_id, tok.eos_token_id)
    cfg.max_position_embeddings = 8192
    out = tmp_path_factory.mktemp("long_model")
    build_model(cfg, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def hang_up_mid_stream(url: str, path: str, body: dict[str, Any], events: int = 2,
                       headers: dict[str, str] | None = None) -> list[str]:
    """POST over a raw socket, read ``events`` SSE events (0: only wait a moment for a
    non-streaming answer that is still being generated), then close the connection."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            f"Content-Length: {len(payload)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    sock = socket.create_connection((host, int(port)), timeout=30)
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        if events == 0:
            time.sleep(1.0)
            return []
        buf = b""
        while buf.count(b"data: ") < events:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection: {buf!r}"
            buf += chunk
        assert buf.startswith(b"HTTP/1.1 200"), buf[:200]
        return re.findall(r"data: (.*)", buf.decode("utf-8", "replace"))
    finally:
        sock.close()


def assert_row_freed(stats: Callable[[], dict[str, int]], timeout: float = 5.0) -> None:
    """The row leaves the batch within ``timeout`` and nothing decodes for it any more."""
    wait_for(lambda: stats()["running"] == 0, timeout, what="the hung-up request's row to leave")
    before = stats()["generation_tokens_total"]
    time.sleep(0.3)
    assert stats()["generation_tokens_total"] == before, "still decoding after the hang-up"


@pytest.mark.parametrize("kind", ["completion-stream", "chat-stream", "completion",
                                  "completion-silent"])
def test_hang_up_over_uvicorn_frees_the_row(long_model_dir: Path, kind: str) -> None:
    """"silent": the model only writes its end-of-text token, past which ``ignore_eos`` goes
    on; it decodes to no text, so no delta ever gives the server a moment to look for the
    hang-up (it has to look on its own)."""
    engine = Engine.from_dir(long_model_dir, max_batch_size=4)
    if kind.endswith("-silent"):
        eos = engine.tokenizer.eos_token_id

        def only_eos(_module: Any, _args: Any, out: Any) -> None:
            out.logits[..., eos] = 1e4  # in place: the hook returns None

        engine.model.register_forward_hook(only_eos)
    app = build_app(engine, ServeConfig(api_key="k"))
    stream = kind.endswith("-stream")
    path = "/v1/chat/completions" if kind.startswith("chat") else "/v1/completions"
    body: dict[str, Any] = {"max_tokens": LONG, "ignore_eos": True, "temperature": 0,
                            "stream": stream}
    body |= ({"messages": [{"role": "user", "content": "你好"}]} if kind.startswith("chat")
             else {"prompt": "你好"})
    try:
        with uvicorn_in_thread(app) as url:
            hang_up_mid_stream(url, path, body, events=2 if stream else 0,
                               headers={"Authorization": "Bearer k"})
            assert 0 < engine.stats()["generation_tokens_total"] < LONG  # it was mid-stream
            assert_row_freed(engine.stats)
            assert engine.stats()["generation_tokens_total"] < LONG
    finally:
        engine.shutdown()


def scrape_running(url: str) -> int:
    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(r"^steelworks_num_requests_running\{[^}]*\} (\S+)$", text, re.M)
    assert m, text[:500]
    return int(float(m.group(1)))


@pytest.mark.faults  # a client hangs up mid-stream through Ray Serve: make test-faults
@pytest.mark.ray
def test_hang_up_through_ray_serve_frees_the_row(ray_local, long_model_dir: Path) -> None:
    from steelworks.serve.deployment import deploy, shutdown

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = deploy(long_model_dir, ServeConfig(port=port, max_batch_size=4))
    try:
        assert scrape_running(url) == 0
        body = {"prompt": "你好", "max_tokens": LONG, "ignore_eos": True, "temperature": 0,
                "stream": True}
        hang_up_mid_stream(url, "/v1/completions", body)
        wait_for(lambda: scrape_running(url) == 0, 10, what="the replica's row to leave")
        # ... also without streaming (nothing is sent before the hang-up), and the replica
        # still answers afterwards.
        hang_up_mid_stream(url, "/v1/completions", body | {"stream": False}, events=0)
        wait_for(lambda: scrape_running(url) == 0, 10, what="the replica's row to leave")
        r = httpx.post(url + "/v1/completions", json={"prompt": "你好", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        shutdown()
