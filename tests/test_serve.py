"""Serve stage: the engine against transformers, the OpenAI-compatible app through TestClient,
and one Ray Serve deployment driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import socket
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from steelworks.inference.engine import Engine
from steelworks.inference.sampling import PromptTooLongError, SamplingParams
from steelworks.serve.app import build_app
from steelworks.serve.config import ServeConfig
from steelworks.serve.routes.streaming import _deltas

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "你好，你是谁？"}]


@pytest.fixture(scope="module")
def engine(shaken_model_dir) -> Engine:
    eng = Engine.from_dir(shaken_model_dir)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def client(engine) -> TestClient:
    return TestClient(build_app(engine, ServeConfig(api_key=KEY, model_name="steel", max_tokens=24)))


def sse_events(text: str) -> list:
    lines = [ln for ln in text.split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


def assert_openai_error(r, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


# --- engine ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(stop=["ok", ""]), "stop"),
    (dict(stop="x"), "stop"), (dict(seed=1.5), "seed"), (dict(temperature=float("nan")), "temperature"),
])
def test_sampling_params_rejects_bad_values(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)


def test_greedy_matches_transformers_generate(engine):
    for messages in (HELLO, [{"role": "user", "content": "What is the capital of China?"}]):
        ids = engine.encode_chat(messages)
        res = engine.generate(ids, SamplingParams(max_tokens=48, temperature=0))
        ref = engine.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=48,
                                    eos_token_id=sorted(engine.stop_token_ids))
        assert res.token_ids == ref[0, len(ids):].tolist()
        assert len(set(res.token_ids)) > 5  # a real sequence, not one repeated token
        assert res.prompt_tokens == len(ids) and res.completion_tokens == len(res.token_ids)
        assert res.text == engine.tokenizer.decode(res.token_ids, skip_special_tokens=True)
        assert res.finish_reason == ("stop" if res.token_ids[-1] in engine.stop_token_ids
                                     else "length")


def test_repetition_penalty_matches_transformers(engine):
    ids = engine.encode_chat(HELLO)
    res = engine.generate(ids, SamplingParams(max_tokens=32, temperature=0, repetition_penalty=1.3))
    ref = engine.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32,
                                repetition_penalty=1.3, eos_token_id=sorted(engine.stop_token_ids))
    assert res.token_ids == ref[0, len(ids):].tolist()


def test_sampling_is_seeded_and_filters_work(engine):
    ids = engine.encode_chat(HELLO)
    greedy = engine.generate(ids, SamplingParams(max_tokens=24, temperature=0)).token_ids

    def sample(**kw):
        return engine.generate(ids, SamplingParams(max_tokens=24, temperature=1.0, **kw)).token_ids

    assert sample(seed=1) == sample(seed=1)
    assert sample(seed=1) != sample(seed=2)
    assert sample(seed=3, top_k=1) == greedy  # top-k 1 leaves only the argmax
    assert sample(seed=3, top_p=1e-6) == greedy  # so does a vanishing nucleus


class ScriptedLM(torch.nn.Module):
    """Emits a fixed token script whatever it is fed; the "cache" is the step count."""

    def __init__(self, script: list[int], vocab_size: int) -> None:
        super().__init__()
        self.script, self.vocab_size = script, vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # Engine reads the device from it
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=512)

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=1):
        step = past_key_values or 0
        logits = torch.full((1, 1, self.vocab_size), -1e9)
        logits[0, -1, self.script[min(step, len(self.script) - 1)]] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=step + 1)


def byte_token_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte, so every Chinese character spans three tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    return tokenizer.convert_tokens_to_ids([b2u[b] for b in text.encode()])


def test_stream_never_splits_a_character_and_honours_stop(tiny_tokenizer_dir):
    from steelworks.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    text = "北京是中国的首都。你好，世界！"
    script = byte_token_ids(tok, text) + [tok.eos_token_id]
    eng = Engine(ScriptedLM(script, len(tok)), tok)
    greedy = SamplingParams(max_tokens=100, temperature=0)

    stream = eng.stream([5], greedy)
    deltas = list(stream)
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas) and len(deltas) > 5
    assert stream.result.finish_reason == "stop" and stream.result.token_ids == script

    stream = eng.stream([5], SamplingParams(max_tokens=100, temperature=0, stop=["中国的", "世界"]))
    deltas = list(stream)
    assert "".join(deltas) == "北京是" == stream.result.text
    assert stream.result.finish_reason == "stop"

    cut = eng.generate([5], SamplingParams(max_tokens=7, temperature=0))  # ends mid-character
    assert cut.finish_reason == "length" and cut.completion_tokens == 7
    assert cut.text == tok.decode(script[:7]) and cut.text.startswith("北京")


def test_cancel_and_disconnect_stop_generation(engine):
    ids = engine.encode_chat(HELLO)
    params = SamplingParams(max_tokens=400, temperature=1.0, seed=0)
    stream = engine.stream(ids, params)
    next(stream)
    stream.cancel()
    assert list(stream) == [] and stream.result.finish_reason == "cancelled"
    assert stream.result.completion_tokens < 50

    class GoneRequest:  # the client hangs up after the first delta
        async def is_disconnected(self) -> bool:
            return True

    async def consume(s):
        return [d async for d in _deltas(s, GoneRequest())]

    stream = engine.stream(ids, params)
    assert len(asyncio.run(consume(stream))) == 1
    assert list(stream) == [] and stream.result.finish_reason == "cancelled"


def test_prompt_too_long_is_rejected_before_work(engine):
    with pytest.raises(PromptTooLongError, match="maximum context length is 512"):
        engine.stream([7] * 500, SamplingParams(max_tokens=20))


# --- HTTP app --------------------------------------------------------------------------------

def test_models_and_health(client, shaken_model_dir, engine):
    assert client.get("/health").status_code == 200
    r = client.get("/v1/models", headers=AUTH)
    assert r.json()["object"] == "list" and [m["id"] for m in r.json()["data"]] == ["steel"]
    unnamed = TestClient(build_app(engine, ServeConfig()))
    assert unnamed.get("/v1/models").json()["data"][0]["id"] == shaken_model_dir.name


def test_auth_required_except_health(client):
    assert client.get("/health").json()["status"] == "ok"  # no key needed
    assert_openai_error(client.get("/v1/models"), 401, code="invalid_api_key")
    assert_openai_error(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    # Authentication comes before body validation: no key, bad body -> still 401.
    assert_openai_error(client.post("/v1/chat/completions", json={}), 401)
    assert client.get("/v1/models", headers=AUTH).status_code == 200


def test_chat_completion_format_and_usage(client, engine):
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json={"model": "steel", "messages": HELLO, "temperature": 0, "max_tokens": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "steel"
    (choice,) = body["choices"]
    ids = engine.encode_chat(HELLO)
    ref = engine.generate(ids, SamplingParams(max_tokens=20, temperature=0))
    assert choice["message"] == {"role": "assistant", "content": ref.text}
    assert choice["finish_reason"] == ref.finish_reason
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": ref.completion_tokens,
                             "total_tokens": len(ids) + ref.completion_tokens}


def test_chat_stream_matches_non_stream(client):
    req = {"messages": HELLO, "temperature": 0, "max_tokens": 30}
    full = client.post("/v1/chat/completions", headers=AUTH, json=req).json()
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json={**req, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    *content, final, usage = events
    assert final["choices"][0]["delta"] == {}
    assert final["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
    assert text == full["choices"][0]["message"]["content"] and len(content) > 3
    assert usage["choices"] == [] and usage["usage"] == full["usage"]


def test_completions_plain_and_stream(client, engine):
    req = {"prompt": "北京是", "temperature": 0, "max_tokens": 16}
    body = client.post("/v1/completions", headers=AUTH, json=req).json()
    assert body["object"] == "text_completion"
    ref = engine.generate(engine.encode("北京是"), SamplingParams(max_tokens=16, temperature=0))
    assert body["choices"][0]["text"] == ref.text
    assert body["usage"]["prompt_tokens"] == len(engine.encode("北京是"))
    events = sse_events(client.post("/v1/completions", headers=AUTH,
                                    json={**req, "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in events) == ref.text
    assert events[-1]["choices"][0]["finish_reason"] == ref.finish_reason


@pytest.mark.parametrize("body, param, code", [
    ({"model": "steel"}, "messages", None),
    ({"messages": []}, "messages", None),
    ({"messages": [{"role": "user"}]}, "messages.0.content", None),
    ({"messages": HELLO, "temperature": -1}, "temperature", None),
    ({"messages": HELLO, "temperature": 2.5}, "temperature", None),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens", None),
    ({"messages": HELLO, "stop": [""]}, None, None),
    ({"messages": HELLO, "n": 3}, "n", None),
    ({"messages": [{"role": "user", "content": "北京 " * 600}]}, "messages", "context_length_exceeded"),
    ({"messages": HELLO, "max_tokens": 500}, "messages", "context_length_exceeded"),
])
def test_bad_chat_requests_get_openai_400(client, body, param, code):
    assert_openai_error(client.post("/v1/chat/completions", headers=AUTH, json=body), 400, param, code)


def test_other_bad_requests(client):
    r = client.post("/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"},
                    content=b"{not json")
    assert_openai_error(r, 400)
    assert_openai_error(client.post("/v1/completions", headers=AUTH,
                                    json={"prompt": [1, 2, 100000]}), 400, "prompt")
    err = assert_openai_error(client.post("/v1/chat/completions", headers=AUTH,
                                          json={"model": "gpt-4", "messages": HELLO}),
                              404, "model", "model_not_found")
    assert "gpt-4" in err["message"]


# --- Ray Serve -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.parametrize("engine, model", [("builtin", "tiny_model_dir"),
                                           ("vllm", "vllm_model_dir")])
def test_ray_serve_with_openai_client(ray_local, engine, model, request):
    """A Ray Serve replica with either engine; with vLLM, its AsyncLLM (and engine-core
    process) runs inside the replica."""
    from openai import AuthenticationError, OpenAI

    from steelworks.serve.deployment import deploy, shutdown

    port = free_port()
    url = deploy(request.getfixturevalue(model),
                 ServeConfig(port=port, api_key=KEY, model_name="steel", max_tokens=12,
                             engine=engine))
    try:
        assert url == f"http://127.0.0.1:{port}"
        client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["steel"]
        out = client.chat.completions.create(model="steel", messages=HELLO, temperature=0,
                                             max_tokens=12)
        assert out.usage.completion_tokens == 12 and out.choices[0].finish_reason == "length"
        chunks = list(client.chat.completions.create(model="steel", messages=HELLO, temperature=0,
                                                     max_tokens=12, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason == "length"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == out.choices[0].message.content and text
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        shutdown()


def test_fast_decode_equals_the_tokenizers_decode(tiny_tokenizer_dir):
    """The stream decodes with the Rust tokenizer directly (for speed); on any ids, special
    tokens included, that is the text transformers' decode gives."""
    import random

    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.inference.engine import _TextAssembler

    tok = load_tokenizer(tiny_tokenizer_dir)
    assembler = _TextAssembler(tok, [])
    assert assembler._fast is not None  # the fast path is what this test checks
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        assert assembler._decode(ids) == tok.decode(ids, skip_special_tokens=True)
