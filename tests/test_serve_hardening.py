"""HTTP-level hardening of the OpenAI-compatible server: stop-string caps, request-size and
numeric-range limits, 503 on a full queue on every path, and the API key (environment
variable, never in a manifest, a log or stdout; the docs behind it). Each test reproduces a
fault found in the server before its fix."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_engine_batching import Gate
from test_serve import AUTH, HELLO, KEY, assert_openai_error

from steelworks.inference.engine import Engine
from steelworks.inference.sampling import MAX_STOP_LENGTH, MAX_STOP_STRINGS, SamplingParams
from steelworks.serve.app import build_app
from steelworks.serve.config import ServeConfig

INT64_MAX = 2**63 - 1


@pytest.fixture(scope="module")
def engine(shaken_model_dir) -> Engine:
    eng = Engine.from_dir(shaken_model_dir)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def client(engine) -> TestClient:
    # raise_server_exceptions=False: a fault must show up as the 500 a real client would see.
    app = build_app(engine, ServeConfig(api_key=KEY, model_name="steel", max_tokens=8,
                                        max_request_bytes=64 * 1024))
    return TestClient(app, raise_server_exceptions=False)


def chat(client: TestClient, **fields) -> object:
    return client.post("/v1/chat/completions", headers=AUTH,
                       json={"messages": HELLO, "max_tokens": 4, **fields})


# --- 1. stop strings -----------------------------------------------------------------------

def test_stop_strings_are_capped_in_sampling_params():
    SamplingParams(stop=["x"] * MAX_STOP_STRINGS)
    SamplingParams(stop=["x" * MAX_STOP_LENGTH])
    with pytest.raises(ValueError, match="^stop"):
        SamplingParams(stop=["x"] * (MAX_STOP_STRINGS + 1))
    with pytest.raises(ValueError, match="^stop"):
        SamplingParams(stop=["x" * (MAX_STOP_LENGTH + 1)])


def test_huge_stop_string_is_refused_with_400(client):
    # Before: a 200 KB stop string cost seconds of quadratic matching per request (and held
    # the event loop, delaying /health); now it is refused before any work. (50 KB here: the
    # body limit of this client would answer 413 first.)
    for stop in ("x" * 50_000, ["a", "b", "c", "d", "e"], ["ok", "y" * (MAX_STOP_LENGTH + 1)]):
        assert_openai_error(chat(client, stop=stop), 400, "stop", "invalid_value")
        r = client.post("/v1/completions", headers=AUTH,
                        json={"prompt": "北京", "max_tokens": 4, "stop": stop})
        assert_openai_error(r, 400, "stop")


def test_long_held_back_stop_prefix_stays_cheap(engine):
    """A stop string cannot start inside text already emitted, so the prefix search is
    bounded by the held-back tail, not by the stop string's length: per token it stays a few
    slices however long the stop string is."""
    from steelworks.inference.engine import _TextAssembler

    slices = 0

    class CountingStr(str):
        def __getitem__(self, key):
            nonlocal slices
            slices += 1
            return str.__getitem__(self, key)

    ids = engine.encode("The quick brown fox jumps over the lazy dog. " * 3)
    asm = _TextAssembler(engine.tokenizer, [CountingStr("Z" * MAX_STOP_LENGTH)])
    text = "".join(asm.add(t) for t in ids) + asm.finish()
    assert text == engine.tokenizer.decode(ids, skip_special_tokens=True)
    # Before: MAX_STOP_LENGTH - 1 slices per token.
    assert slices <= 8 * len(ids), slices


# --- 2. limits -----------------------------------------------------------------------------

@pytest.mark.parametrize("fields, param", [
    ({"seed": 2**64}, "seed"), ({"seed": 2**70}, "seed"), ({"seed": -(2**63) - 1}, "seed"),
    ({"top_k": 2**70}, "top_k"), ({"max_tokens": 2**70}, "max_tokens"),
    ({"max_completion_tokens": 2**64}, "max_completion_tokens"),
    ({"repetition_penalty": 1e-320}, "repetition_penalty"),
    ({"repetition_penalty": 1e308}, "repetition_penalty"),
])
def test_out_of_range_numbers_get_400_not_500(client, fields, param):
    assert_openai_error(chat(client, **fields), 400, param)


@pytest.mark.parametrize("raw, param", [
    (b'"temperature": NaN', "temperature"), (b'"temperature": Infinity', "temperature"),
    (b'"top_p": NaN', "top_p"), (b'"repetition_penalty": Infinity', "repetition_penalty"),
    (b'"repetition_penalty": NaN', "repetition_penalty"), (b'"seed": 1e400', "seed"),
])
def test_non_finite_numbers_get_400(client, raw, param):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, ' + raw + b"}"
    r = client.post("/v1/chat/completions", content=body,
                    headers={**AUTH, "Content-Type": "application/json"})
    assert_openai_error(r, 400, param)


@pytest.mark.parametrize("fields", [
    {"seed": INT64_MAX}, {"seed": -(2**63)}, {"top_k": INT64_MAX, "temperature": 1},
    {"temperature": 1e-320}, {"temperature": 1e-30, "top_k": 5},
    {"top_p": 1e-320, "temperature": 1}, {"top_p": 5e-324, "temperature": 0.7},
])
def test_extreme_but_valid_sampling_values_answer_200(client, fields):
    # Before: seeds past 64 bits overflowed torch's manual_seed, and temperatures or top_p
    # that round to 0 in fp32 turned the distribution into NaNs; each was a 500.
    r = chat(client, **fields)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_tiny_temperature_is_greedy():
    # vLLM's rule (_SAMPLING_EPS): below 1e-5 a temperature means greedy decoding.
    assert SamplingParams(temperature=1e-9).temperature == 0.0
    assert SamplingParams(temperature=0.5).temperature == 0.5
    with pytest.raises(ValueError, match="^seed"):
        SamplingParams(seed=2**64)
    with pytest.raises(ValueError, match="^repetition_penalty"):
        SamplingParams(repetition_penalty=1e-320)


@pytest.mark.parametrize("body", [
    b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfff"}]}]}',
])
def test_lone_surrogate_in_chat_gets_400(client, body):
    r = client.post("/v1/chat/completions", content=body,
                    headers={**AUTH, "Content-Type": "application/json"})
    assert_openai_error(r, 400, "messages")


def test_lone_surrogate_in_prompt_gets_400(client):
    r = client.post("/v1/completions", content=b'{"prompt": "x\\ud83d", "max_tokens": 2}',
                    headers={**AUTH, "Content-Type": "application/json"})
    assert_openai_error(r, 400)


def test_request_body_limit_on_content_length(client):
    big = {"messages": [{"role": "user", "content": "你" * 40_000}], "max_tokens": 1}
    r = client.post("/v1/chat/completions", headers=AUTH, json=big)
    err = assert_openai_error(r, 413)
    assert "65536" in err["message"]
    # Unauthenticated and oversized: still refused without reading the body.
    assert_openai_error(client.post("/v1/completions", json={"prompt": "x" * 100_000}), 413)


def test_request_body_limit_on_chunked_upload(client):
    sent = []

    def chunks():  # no Content-Length: the limit must hold on the bytes as they arrive
        for _ in range(40):
            sent.append(1)
            yield b" " * 4096
        yield b'{"prompt": "x", "max_tokens": 1}'

    r = client.post("/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                    content=chunks())
    assert_openai_error(r, 413)
    ok = client.post("/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                     content=iter([b'{"prompt": "x", ', b'"max_tokens": 1}']))
    assert ok.status_code == 200, ok.text


def test_body_limit_over_real_http(engine):
    """The same limits through uvicorn: a chunked upload is cut off at the limit."""
    import http.client
    from urllib.parse import urlsplit

    from conftest import uvicorn_in_thread

    app = build_app(engine, ServeConfig(max_request_bytes=1024, api_key_env=""))
    with uvicorn_in_thread(app) as url:
        host = urlsplit(url)
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=30)
        conn.request("POST", "/v1/completions", body=iter([b" " * 800, b" " * 800, b"{}"]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 413 and "1024" in json.loads(r.read())["error"]["message"]
        conn.close()
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=30)
        conn.request("POST", "/v1/completions", body=b"x" * 2000,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 413 and json.loads(r.read())["error"]["type"] == "invalid_request_error"
        conn.close()


def test_echo_with_out_of_vocab_ids_gets_400(client):
    r = client.post("/v1/completions", headers=AUTH,
                    json={"prompt": [-1], "echo": True, "max_tokens": 1})
    assert_openai_error(r, 400, "prompt")


def test_body_limit_is_configurable_and_validated():
    with pytest.raises(ValueError, match="max_request_bytes"):
        ServeConfig(max_request_bytes=0)
    assert ServeConfig().max_request_bytes == 4 * 1024 * 1024


# --- 3. full queue -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_engine(shaken_model_dir) -> Engine:
    eng = Engine.from_dir(shaken_model_dir, max_batch_size=1, max_queue=0)
    yield eng
    eng.shutdown()


@pytest.fixture
def saturated(small_engine):
    """The one batch slot taken by a generation parked at its first forward pass, and the
    one model-call place taken by a prompt-logprobs call waiting behind it."""
    with Gate(small_engine.model, 1) as gate:
        stream = small_engine.stream([5, 6, 7], SamplingParams(max_tokens=50, temperature=0))
        gate.wait_parked()
        done = threading.Event()
        waiter = threading.Thread(target=lambda: (small_engine.prompt_logprobs([5, 6, 7]), done.set()),
                                  daemon=True)
        waiter.start()
        while not small_engine._scheduler._jobs:  # the waiter queues its call at once
            time.sleep(0.001)
        try:
            yield small_engine
        finally:
            stream.cancel()
            gate.release()
            waiter.join(20)


def test_full_queue_gives_503_on_every_generation_path(saturated):
    client = TestClient(build_app(saturated, ServeConfig(model_name="steel")),
                        raise_server_exceptions=False)
    for path, body in [
        ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 2, "stream": True}),
        ("/v1/completions", {"prompt": "北京", "max_tokens": 2}),
        # echo + logprobs scores the prompt through the scheduler's model-call queue
        ("/v1/completions", {"prompt": "北京", "max_tokens": 0, "echo": True, "logprobs": 0}),
        ("/v1/completions", {"prompt": "北京", "max_tokens": 2, "echo": True, "logprobs": 1}),
    ]:
        r = client.post(path, json=body)
        assert_openai_error(r, 503, code="server_busy")
        assert r.headers["retry-after"] == "1", (path, body)


# --- 4. the API key ------------------------------------------------------------------------

def test_api_key_from_environment(engine, monkeypatch):
    monkeypatch.setenv("STEELWORKS_API_KEY", "sk-from-env")
    cfg = ServeConfig()
    assert cfg.resolve_api_key() == "sk-from-env" and cfg.api_key is None
    client = TestClient(build_app(engine, cfg))
    assert_openai_error(client.get("/v1/models"), 401)
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-from-env"}).status_code == 200
    # The config file's key wins; a custom variable name works; "" turns the lookup off.
    assert ServeConfig(api_key="sk-file").resolve_api_key() == "sk-file"
    monkeypatch.setenv("MY_KEY", "sk-custom")
    assert ServeConfig(api_key_env="MY_KEY").resolve_api_key() == "sk-custom"
    assert ServeConfig(api_key_env="").resolve_api_key() is None
    assert "sk-file" not in repr(ServeConfig(api_key="sk-file"))


def test_docs_and_schema_sit_behind_the_key(client, engine):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert_openai_error(client.get(path), 401, code="invalid_api_key")
        assert client.get(path, headers=AUTH).status_code == 200, path
    schema = client.get("/openapi.json", headers=AUTH).json()
    assert "/v1/chat/completions" in schema["paths"]
    open_client = TestClient(build_app(engine, ServeConfig(api_key_env="")))
    assert open_client.get("/openapi.json").status_code == 200  # no key configured: public
    assert "/openapi.json" in open_client.get("/docs").text


SECRET = "sk-secret-4f1c9e"


def test_key_never_reaches_manifest_logs_or_stdout(shaken_model_dir, tmp_path, monkeypatch,
                                                   capsys, caplog):
    import steelworks.serve.deployment as deployment
    from steelworks.core.config import load
    from steelworks.platform import cli, pipeline
    from steelworks.platform.settings import PipelineConfig

    caplog.set_level(logging.DEBUG)
    deployed = []
    monkeypatch.setattr(deployment, "deploy", lambda model, cfg: deployed.append(cfg) or "http://h:1")
    monkeypatch.setattr(deployment, "shutdown", lambda *a: None)
    monkeypatch.setattr(cli, "_connect", lambda cfg: None)
    asked = []
    monkeypatch.setattr(pipeline, "_ask", lambda url, cfg, q: asked.append(cfg.resolve_api_key())
                        or {"question": q, "answer": "ok"})

    # a) the key in the config file: the pipeline's serve stage writes its manifest.
    cfg = load(PipelineConfig, None, [f"runs_dir={tmp_path}", "run=r", f"serve.api_key={SECRET}"])
    manifest = pipeline.run_serve(cfg, model_dir=str(shaken_model_dir))
    assert asked == [SECRET]  # the smoke test still authenticates
    text = (tmp_path / "r" / "serve" / "manifest.json").read_text()
    assert SECRET not in text and SECRET not in json.dumps(manifest)
    assert json.loads(text)["config"]["api_key"] == "<redacted>"

    # b) the key in the environment: `steelworks serve` prints a curl line without it.
    monkeypatch.setenv("STEELWORKS_API_KEY", SECRET)

    def stop(_s: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("time.sleep", stop)
    assert cli.main(["serve", "--model", str(shaken_model_dir), "--set", f"runs_dir={tmp_path}"]) == 0
    out = capsys.readouterr()
    assert "Authorization: Bearer $STEELWORKS_API_KEY" in out.out
    # c) and with the key in the config file: a placeholder.
    assert cli.main(["serve", "--model", str(shaken_model_dir), "--set", f"runs_dir={tmp_path}",
                     "--set", f"serve.api_key={SECRET}"]) == 0
    out2 = capsys.readouterr()
    assert "<your key>" in out2.out
    # The deployment still receives the key: it is resolved on the driver, where it was set.
    assert [c.resolve_api_key() for c in deployed] == [SECRET] * 3

    # d) the server: requests with right and wrong keys log nothing of either.
    engine = Engine.from_dir(shaken_model_dir)
    try:
        client = TestClient(build_app(engine, ServeConfig(api_key=SECRET)))
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {SECRET}"}).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {SECRET}x"}).status_code == 401
        r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {SECRET}"},
                        json={"messages": HELLO, "max_tokens": 2})
        assert r.status_code == 200
        assert SECRET not in r.text
    finally:
        engine.shutdown()
    captured = capsys.readouterr()
    for where in (out.out, out.err, out2.out, out2.err, captured.out, captured.err, caplog.text):
        assert SECRET not in where
    for rec in caplog.records:
        assert SECRET not in rec.getMessage()
    assert not list(Path(tmp_path).rglob("*.tmp"))
