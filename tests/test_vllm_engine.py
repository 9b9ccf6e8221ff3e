"""The vLLM engine behind the built-in engine's interface: engine choice, token-for-token
parity with the built-in engine on the same weights, and the OpenAI API (official client over
real HTTP) with either engine."""

from __future__ import annotations

import json
import time

import pytest
from conftest import uvicorn_in_thread, wait_idle

from steelworks.inference.loader import choose_engine, count_params
from steelworks.inference.sampling import SamplingParams
from steelworks.inference.scheduler import QueueFullError
from steelworks.serve.app import build_app
from steelworks.serve.config import ServeConfig

KEY = "sk-test"
HELLO = [{"role": "user", "content": "你好，你是谁？"}]


# --- choosing an engine (no engine started) --------------------------------------------------

def test_auto_choice_and_its_reasons(tiny_model_dir, vllm_model_dir) -> None:
    kind, why = choose_engine(tiny_model_dir, ServeConfig(engine="auto", auto_vllm_min_params=0),
                              "cpu")
    assert kind == "builtin" and "head_dim 16" in why  # no vLLM CPU kernel for 16-dim heads
    with pytest.raises(ValueError, match="head_dim 16"):
        choose_engine(tiny_model_dir, ServeConfig(engine="vllm"), "cpu")
    kind, why = choose_engine(vllm_model_dir, ServeConfig(engine="auto"), "cpu")
    assert kind == "builtin" and "auto_vllm_min_params" in why  # a 0.1M model: built-in wins
    assert choose_engine(vllm_model_dir, ServeConfig(engine="auto", auto_vllm_min_params=0),
                         "cpu")[0] == "vllm"
    assert choose_engine(vllm_model_dir, ServeConfig(engine="builtin"), "cpu")[0] == "builtin"
    assert choose_engine(vllm_model_dir, ServeConfig(engine="vllm"), "cpu")[0] == "vllm"


def test_param_count_matches_the_model(vllm_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(vllm_model_dir))
    config = json.loads((vllm_model_dir / "config.json").read_text())
    assert count_params(config) == sum(p.numel() for p in model.parameters())


# --- the engine itself -----------------------------------------------------------------------

def test_greedy_tokens_and_logprobs_equal_the_builtin_engine(vllm_engine, builtin_vllm_twin) -> None:
    prompts = [vllm_engine.encode_chat(HELLO), vllm_engine.encode("北京是中国的首都。"),
               vllm_engine.encode("The quick brown fox")]
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=3)
    for ids in prompts:
        ours, theirs = vllm_engine.generate(ids, params), builtin_vllm_twin.generate(ids, params)
        assert ours.token_ids == theirs.token_ids
        assert ours.finish_reason == theirs.finish_reason and ours.text == theirs.text
        assert ours.token_logprobs == pytest.approx(theirs.token_logprobs, abs=1e-4)
        for a, b in zip(ours.top_logprobs, theirs.top_logprobs, strict=True):
            assert list(a) == list(b) and list(a.values()) == pytest.approx(list(b.values()),
                                                                            abs=1e-4)
        # echo + logprobs: every prompt token's logprob and its top-2
        pa, pb = vllm_engine.prompt_logprobs(ids, 2), builtin_vllm_twin.prompt_logprobs(ids, 2)
        assert pa.token_logprobs[0] is None and pa.top_logprobs[0] is None
        assert pa.token_logprobs[1:] == pytest.approx(pb.token_logprobs[1:], abs=1e-4)
        assert [list(t) for t in pa.top_logprobs[1:]] == [list(t) for t in pb.top_logprobs[1:]]


def test_stop_tokens_strings_and_seeds(vllm_engine, builtin_vllm_twin) -> None:
    ids = vllm_engine.encode("北京")
    long = vllm_engine.generate(ids, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    stop = long.text[4:6]  # a stop string that greedy decoding certainly meets
    assert stop
    for engine in (vllm_engine, builtin_vllm_twin):
        r = engine.generate(ids, SamplingParams(max_tokens=24, temperature=0, stop=[stop],
                                                ignore_eos=True))
        assert r.finish_reason == "stop" and r.text == long.text[: long.text.index(stop)]
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    assert vllm_engine.generate(ids, sampled).token_ids == vllm_engine.generate(ids, sampled).token_ids


def test_cancel_frees_the_request_and_full_queue_is_refused(vllm_engine) -> None:
    wait_idle(vllm_engine)  # it counts capacity: nothing of an earlier test may be in flight
    ids = vllm_engine.encode("北京")
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    streams = [vllm_engine.stream(ids, long) for _ in range(8 + 16)]  # batch + queue
    with pytest.raises(QueueFullError):
        vllm_engine.stream(ids, long)
    with pytest.raises(QueueFullError):
        vllm_engine.prompt_logprobs(ids)
    assert next(streams[0])  # it runs
    for s in streams:
        s.cancel()
    deadline = time.monotonic() + 20
    while vllm_engine.stats()["running"] + vllm_engine.stats()["waiting"]:
        assert time.monotonic() < deadline, vllm_engine.stats()
        time.sleep(0.05)
    tokens = vllm_engine.stats()["generation_tokens_total"]
    time.sleep(0.5)
    assert vllm_engine.stats()["generation_tokens_total"] == tokens  # nothing decodes for them
    assert all(list(s) == [] and s.result.finish_reason == "cancelled" for s in streams)
    vllm_engine.check_health()  # still serving
    assert vllm_engine.generate(ids, SamplingParams(max_tokens=3, temperature=0)).completion_tokens == 3


def test_prompt_validation_is_the_builtin_engines(vllm_engine) -> None:
    from steelworks.inference.sampling import PromptTooLongError

    with pytest.raises(ValueError, match="token ids must lie in"):
        vllm_engine.stream([vllm_engine.vocab_size], SamplingParams(max_tokens=1))
    with pytest.raises(PromptTooLongError):
        vllm_engine.stream([1] * vllm_engine.max_context, SamplingParams(max_tokens=1))


# --- the OpenAI API over HTTP, with either engine --------------------------------------------

@pytest.fixture(params=["builtin", "vllm"])
def api(request, vllm_engine, builtin_vllm_twin):
    engine = vllm_engine if request.param == "vllm" else builtin_vllm_twin
    app = build_app(engine, ServeConfig(api_key=KEY, model_name="steel", max_tokens=16))
    with uvicorn_in_thread(app) as url:
        yield request.param, url


def test_openai_client_chat_stream_and_completion_logprobs(api) -> None:
    from openai import OpenAI

    kind, url = api
    import httpx

    assert httpx.get(url + "/health").json() == {"status": "ok", "model": "steel", "engine": kind}
    client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    out = client.chat.completions.create(model="steel", messages=HELLO, temperature=0,
                                         max_tokens=12)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="steel", messages=HELLO, temperature=0,
                                                 max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    comp = client.completions.create(model="steel", prompt="北京是", max_tokens=4, temperature=0,
                                     logprobs=2, echo=True)
    lp = comp.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == comp.usage.total_tokens
    # Top alternatives are keyed by their text, and byte-level pieces can share one ("\ufffd"),
    # so a position may list fewer than 2; the chosen token is always among them.
    assert all(tok in top for tok, top in zip(lp.tokens[1:], lp.top_logprobs[1:], strict=True))


def test_both_engines_answer_the_same_over_http(vllm_engine, builtin_vllm_twin) -> None:
    import httpx

    body = {"model": "steel", "prompt": "北京是中国", "max_tokens": 8, "temperature": 0,
            "logprobs": 1, "echo": True}
    answers = []
    for engine in (vllm_engine, builtin_vllm_twin):
        app = build_app(engine, ServeConfig(model_name="steel"))
        with uvicorn_in_thread(app) as url:
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            answers.append(r.json())
    a, b = (x["choices"][0] for x in answers)
    assert a["text"] == b["text"] and a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
    assert a["logprobs"]["token_logprobs"][1:] == pytest.approx(b["logprobs"]["token_logprobs"][1:],
                                                                abs=1e-4)
    assert answers[0]["usage"] == answers[1]["usage"]


def test_v1_evals_through_vllm_equal_the_builtin_engine(vllm_engine, builtin_vllm_twin,
                                                        mini_ceval_dir) -> None:
    """/v1/evals scores through the engine's public API, so it runs on vLLM unchanged."""
    from fastapi.testclient import TestClient

    answers = []
    for engine in (vllm_engine, builtin_vllm_twin):
        client = TestClient(build_app(engine, ServeConfig(benchmarks={"mini": str(mini_ceval_dir)})))
        for body in ({"benchmark": "mini", "scoring": "letter", "num_shots": 1, "predictions": True},
                     {"benchmark": "mini", "mode": "generative", "max_new_tokens": 4,
                      "predictions": True}):
            r = client.post("/v1/evals", json=body)
            assert r.status_code == 200, r.text
            answers.append(r.json()["predictions"])
    for ours, theirs in zip(answers[:2], answers[2:], strict=True):
        assert [p["pred"] for p in ours] == [p["pred"] for p in theirs]
    for g, w in zip(answers[0], answers[2], strict=True):
        assert list(g["scores"].values()) == pytest.approx(list(w["scores"].values()), abs=1e-4)


@pytest.mark.parametrize("stream", [True, False])
def test_http_client_hanging_up_frees_the_vllm_request(vllm_engine, stream: bool) -> None:
    """A client that closes its socket mid-generation (uvicorn, real TCP): the vLLM request
    is aborted and nothing decodes for it any more."""
    import socket
    from urllib.parse import urlparse

    wait_idle(vllm_engine)  # "running" below must be this request's alone
    app = build_app(vllm_engine, ServeConfig(model_name="steel"))
    body = json.dumps({"prompt": "北京", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
                       "stream": stream}).encode()
    with uvicorn_in_thread(app) as url:
        u = urlparse(url)
        sock = socket.create_connection((u.hostname, u.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while vllm_engine.stats()["generation_tokens_total"] == 0 or \
                vllm_engine.stats()["running"] == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)
        if stream:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # chunks are flowing
        sock.close()
        while vllm_engine.stats()["running"]:
            assert time.monotonic() < deadline, vllm_engine.stats()
            time.sleep(0.05)
        tokens = vllm_engine.stats()["generation_tokens_total"]
        time.sleep(0.5)
        assert vllm_engine.stats()["generation_tokens_total"] == tokens
