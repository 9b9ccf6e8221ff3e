"""The legacy ``/v1/completions`` contract as vLLM implements it, and the clients that rely on it.

``prompt`` may be a string, a list of strings, a list of token ids or a list of token-id
lists: one choice per prompt, in order, each with its ``index``, ``logprobs`` and
``finish_reason``; ``usage`` sums over the prompts; streamed chunks carry their prompt's
``index``.  Checked through TestClient, through the official ``openai`` client over real
HTTP, and through lm-eval 0.4.13's ``local-completions`` model, whose per-item CMMLU
predictions must equal those of lm-eval's in-process HF backend on the same model.

The server fixtures are built from ``served_model_dir`` / ``served_engine`` only, so another
engine (vLLM's) can be swapped in by parametrizing those two fixtures.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED, cmmlu_dir, uvicorn_in_thread, wait_idle
from fastapi.testclient import TestClient
from test_serve import assert_openai_error, sse_events

from steelworks.inference.engine import Engine
from steelworks.inference.sampling import SamplingParams
from steelworks.serve.app import build_app
from steelworks.serve.config import ServeConfig

KEY = "sk-contract"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "steel"
PROMPTS = ["北京是", "The quick brown", "答案是A。以下"]


@pytest.fixture(scope="module", params=["builtin", "vllm"])
def engine_kind(request) -> str:
    """Every test of this module runs against both engines."""
    return request.param


@pytest.fixture(scope="module")
def served_model_dir(engine_kind: str, request) -> Path:
    """The model every server in this module serves (the HF reference loads it too): for
    vLLM the tiny model with 32-dim heads, which its CPU attention supports."""
    return request.getfixturevalue("vllm_model_dir" if engine_kind == "vllm"
                                   else "shaken_model_dir")


@pytest.fixture(scope="module")
def served_engine(engine_kind: str, served_model_dir: Path, request) -> Iterator[Engine]:
    """The engine behind the app: the built-in one, or the session's vLLM engine."""
    if engine_kind == "vllm":
        yield request.getfixturevalue("vllm_engine")
        return
    eng = Engine.from_dir(served_model_dir, max_batch_size=8, max_queue=64)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def app(served_engine: Engine) -> Any:
    return build_app(served_engine, ServeConfig(api_key=KEY, model_name=MODEL, max_tokens=16))


@pytest.fixture(scope="module")
def client(app: Any) -> TestClient:
    return TestClient(app)


@pytest.fixture(scope="module")
def server_url(app: Any) -> Iterator[str]:
    with uvicorn_in_thread(app) as url:
        yield url


def complete(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/completions", headers=AUTH, json={"temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def greedy(engine: Engine, ids: list[int], max_tokens: int) -> Any:
    return engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0))


# --- prompt forms ------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["strings", "token_id_lists"])
def test_one_choice_per_prompt_in_order(client: TestClient, served_engine: Engine,
                                        form: str) -> None:
    ids = [served_engine.encode(p) for p in PROMPTS]
    body = complete(client, prompt=PROMPTS if form == "strings" else ids, max_tokens=8)
    refs = [greedy(served_engine, x, 8) for x in ids]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [r.text for r in refs]
    assert [c["finish_reason"] for c in body["choices"]] == [r.finish_reason for r in refs]
    assert len({c["text"] for c in body["choices"]}) == 3  # the prompts were not mixed up
    prompt_tokens = sum(len(x) for x in ids)
    completion_tokens = sum(r.completion_tokens for r in refs)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}


def test_single_prompt_forms_agree(client: TestClient, served_engine: Engine) -> None:
    ids = served_engine.encode(PROMPTS[0])
    bodies = [complete(client, prompt=p, max_tokens=8)
              for p in (PROMPTS[0], [PROMPTS[0]], ids, [ids])]
    assert all(len(b["choices"]) == 1 and b["choices"][0]["index"] == 0 for b in bodies)
    assert len({b["choices"][0]["text"] for b in bodies}) == 1
    assert bodies[0]["choices"][0]["text"] == greedy(served_engine, ids, 8).text


def test_echo_logprobs_per_prompt(client: TestClient, served_engine: Engine) -> None:
    """lm-eval's log-likelihood payload: token-id lists, echo, logprobs=1, max_tokens=1.
    Each choice carries its own prompt's logprobs, then the one generated token's."""
    ids = [served_engine.encode(p) for p in PROMPTS]
    body = complete(client, prompt=ids, echo=True, logprobs=1, max_tokens=1)
    for i, (choice, x) in enumerate(zip(body["choices"], ids, strict=True)):
        assert choice["index"] == i
        ref = served_engine.prompt_logprobs(x, 1)
        gen = greedy(served_engine, x, 1)
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(x) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:len(x)] == pytest.approx(ref.token_logprobs[1:], abs=1e-5)
        assert all(len(top) >= 1 for top in lp["top_logprobs"][1:])
        assert choice["text"] == served_engine.tokenizer.decode(x) + gen.text
        assert choice["finish_reason"] == gen.finish_reason
    assert body["usage"]["prompt_tokens"] == sum(map(len, ids))
    assert body["usage"]["completion_tokens"] == 3

    # max_tokens=0: score the prompts only.
    body = complete(client, prompt=PROMPTS, echo=True, logprobs=0, max_tokens=0)
    assert [c["text"] for c in body["choices"]] == PROMPTS
    assert [len(c["logprobs"]["tokens"]) for c in body["choices"]] == [len(x) for x in ids]
    assert body["usage"] == {"prompt_tokens": sum(map(len, ids)), "completion_tokens": 0,
                             "total_tokens": sum(map(len, ids))}


def test_stream_chunks_carry_their_prompt_index(client: TestClient) -> None:
    full = complete(client, prompt=PROMPTS, max_tokens=12)
    r = client.post("/v1/completions", headers=AUTH,
                    json={"prompt": PROMPTS, "max_tokens": 12, "temperature": 0, "stream": True,
                          "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    *events, usage = sse_events(r.text)
    assert all(e["object"] == "text_completion" and len(e["choices"]) == 1 for e in events)
    by_index: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_index[e["choices"][0]["index"]].append(e["choices"][0])
    assert sorted(by_index) == [0, 1, 2]
    for i, choices in by_index.items():
        # One finish per prompt, on its last chunk; the deltas add up to the full text.
        assert [c["finish_reason"] is not None for c in choices] == [False] * (len(choices) - 1) + [True]
        assert choices[-1]["finish_reason"] == full["choices"][i]["finish_reason"]
        assert "".join(c["text"] for c in choices) == full["choices"][i]["text"]
    assert usage["choices"] == [] and usage["usage"] == full["usage"]

    # echo: each prompt's text comes first in its own stream, as vLLM sends it.
    r = client.post("/v1/completions", headers=AUTH,
                    json={"prompt": PROMPTS, "max_tokens": 12, "temperature": 0, "stream": True,
                          "echo": True})
    texts: dict[int, str] = defaultdict(str)
    for e in sse_events(r.text):
        texts[e["choices"][0]["index"]] += e["choices"][0]["text"]
    assert [texts[i] for i in range(3)] == [p + c["text"] for p, c in zip(PROMPTS, full["choices"],
                                                                          strict=True)]


# --- bad requests ------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, needle", [
    ([], "empty"),
    ("", "empty"),
    ([""], "empty"),
    (["北京", ""], "prompt[1]"),
    ([[5, 6], []], "prompt[1]"),
    (["北京", 5], "mix"),
    ([[5, 6], "北京"], "mix"),
    ([5, [6]], "mix"),
    ([5, 1.5], None),
    ([True, 5], None),
    ([["北京"]], None),
    ([[[5]]], None),
    ({"text": "北京"}, None),
    ([[5], [6, 100000]], "prompt[1]"),
    ([-1, 5], "negative"),
    ([[5], [-1]], "prompt[1]"),
    ([1 << 70], None),
])
def test_bad_prompts_get_openai_400(client: TestClient, prompt: Any, needle: str | None) -> None:
    r = client.post("/v1/completions", headers=AUTH, json={"prompt": prompt, "max_tokens": 2})
    err = assert_openai_error(r, 400, "prompt")
    if needle is not None:
        assert needle in err["message"], err["message"]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_out_of_vocab_ids_with_echo_get_400(client: TestClient, max_tokens: int) -> None:
    r = client.post("/v1/completions", headers=AUTH,
                    json={"prompt": [[5], [6, 100000]], "echo": True, "max_tokens": max_tokens})
    assert "prompt[1]" in assert_openai_error(r, 400, "prompt", "invalid_value")["message"]


def test_prompt_schema_states_the_four_forms(app: Any) -> None:
    schema = app.openapi()["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    assert len(schema["anyOf"]) == 4


def test_prompt_count_is_capped(client: TestClient, served_engine: Engine) -> None:
    # Batch rows + queue places: more prompts than that could never be admitted together.
    stats = served_engine.stats()
    cap = stats["max_batch_size"] + stats["max_queue"]
    r = client.post("/v1/completions", headers=AUTH,
                    json={"prompt": [[5, 6]] * (cap + 1), "max_tokens": 1})
    err = assert_openai_error(r, 400, "prompt", "too_many_prompts")
    assert f"at most {cap} " in err["message"]
    # A full-size request of lm-eval's kind finds room on an idle engine, prompt scoring
    # included (an engine may count those model calls against the same places).
    body = complete(client, prompt=[[5, 6]] * cap, max_tokens=1, echo=True, logprobs=1)
    assert len(body["choices"]) == cap


def test_queue_full_partway_cancels_what_started(served_engine: Engine) -> None:
    """Long generations fill every batch row and queue place but one. Of a two-prompt
    request the first gets the last place, the second finds the engine full: the answer is
    503 and the first is cancelled, so nothing of the request is left in the engine."""
    eng = served_engine
    wait_idle(eng)  # it counts capacity: nothing of an earlier test may be in flight
    client = TestClient(build_app(eng, ServeConfig(model_name=MODEL)))
    stats = eng.stats()
    hog = SamplingParams(max_tokens=400, ignore_eos=True, seed=0)
    hogs = [eng.stream([5, 6, 7], hog)
            for _ in range(stats["max_batch_size"] + stats["max_queue"] - 1)]
    try:
        before = eng.stats()
        r = client.post("/v1/completions", json={"prompt": [[5, 6], [7, 8]], "max_tokens": 50})
        assert_openai_error(r, 503, code="server_busy")
        assert r.headers["retry-after"]
        after = eng.stats()
        assert after["requests_total"] - before["requests_total"] == 1  # the first got in
        assert after["rejected_total"] - before["rejected_total"] == 1  # the second did not
    finally:
        for h in hogs:
            h.cancel()
    deadline = time.monotonic() + 20
    while (s := eng.stats())["waiting"] + s["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert s["waiting"] == s["running"] == 0, s


def test_merged_streams_stop_together_when_the_client_goes(served_engine: Engine) -> None:
    import asyncio

    from steelworks.serve.routes.streaming import _merged

    class GoneRequest:  # the client hangs up after the first delta
        async def is_disconnected(self) -> bool:
            return True

    params = SamplingParams(max_tokens=300, ignore_eos=True, seed=0)
    streams = [served_engine.stream(served_engine.encode(p), params) for p in PROMPTS]

    async def consume() -> list[tuple[int, str | None]]:
        return [item async for item in _merged(streams, GoneRequest())]

    asyncio.run(consume())
    for s in streams:
        assert list(s) == [] and s.result.finish_reason == "cancelled"
        assert s.result.completion_tokens < 100


# --- the official openai client ----------------------------------------------------------------

def test_openai_client_several_prompts(server_url: str, served_engine: Engine) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server_url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    out = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=8, temperature=0,
                                    logprobs=2)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for c, p in zip(out.choices, PROMPTS, strict=True):
        ref = greedy(served_engine, served_engine.encode(p), 8)
        assert c.text == ref.text and c.finish_reason == ref.finish_reason
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == ref.completion_tokens
        assert all(1 <= len(top) <= 3 for top in c.logprobs.top_logprobs)
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices)

    ids = [served_engine.encode(p) for p in PROMPTS]
    echoed = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0,
                                       echo=True, logprobs=1)
    assert [len(c.logprobs.tokens) for c in echoed.choices] == [len(x) + 1 for x in ids]

    texts: dict[int, str] = defaultdict(str)
    finishes: dict[int, str] = {}
    for chunk in client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=8,
                                           temperature=0, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert [texts[i] for i in range(3)] == [c.text for c in out.choices]
    assert [finishes[i] for i in range(3)] == [c.finish_reason for c in out.choices]


# --- lm-eval's local-completions over HTTP vs its in-process HF backend -----------------------

# lm-eval's default path (token ids, one request at a time) runs the whole CMMLU dev split:
# 67 subjects x 5 items = 335 items, 1,340 scored requests. The concurrent text path runs
# the first 20 subjects (100 items), to keep the suite's time in bounds.
LMEVAL_SUBJECTS = {"token-ids": 67, "text-concurrent": 20}
SCORE_TOLERANCE = 1e-4  # absolute, on summed log-likelihoods (float32, different batching)



def lmeval_subjects(n: int = 67) -> list[str]:
    from steelworks.data.benchmarks import cmmlu_subjects

    return [s.name for s in cmmlu_subjects()[:n]]


@pytest.fixture(scope="module")
def hf_reference(served_model_dir: Path, datasets_cache: Path) -> dict[tuple[str, str], Any]:
    """lm-eval's in-process HF backend on the served model's weights, computed once."""
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.evals.lmeval_tasks import lmeval_predictions
    from steelworks.train.models import load_model

    bench = cmmlu_dir(SHARED)
    model, tok = load_model(served_model_dir).eval(), load_tokenizer(served_model_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        return lmeval_predictions(model, tok, bench, split="dev", num_shots=0, batch_size=16,
                                  subjects=lmeval_subjects(), cache_dir=datasets_cache)


@pytest.mark.parametrize(("tokenized", "concurrent"), [(True, 1), (False, 2)],
                         ids=["token-ids", "text-concurrent"])
def test_lmeval_local_completions_matches_hf_backend(
        server_url: str, served_model_dir: Path, served_engine: Engine, shared_dir: Path,
        hf_reference: dict[tuple[str, str], Any], datasets_cache: Path, offline: None,
        monkeypatch: pytest.MonkeyPatch, tokenized: bool, concurrent: int) -> None:
    """lm-eval 0.4.13's ``local-completions`` against this server gives the in-process HF
    backend's predictions on CMMLU dev, item for item, 0-shot.  Batches of (up to) 16 prompts
    per request: lists of token-id lists sent one request at a time (lm-eval's ``requests``
    path), or, with ``tokenized_requests=False``, lists of strings, two requests at a time
    (its ``aiohttp`` path)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from steelworks.evals.lmeval_tasks import run_lmeval

    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # local-completions sends it as the bearer key
    # The prompts in flight must fit in the engine (batch rows + queue places), with room
    # for one more request: engines free a finished request's places a moment after its
    # answer, when a client may already have sent the next one. Otherwise requests get 503
    # (the server's backpressure) and lm-eval's retries decide how long this test takes.
    stats = served_engine.stats()
    batch_size = min(16, (stats["max_batch_size"] + stats["max_queue"]) // (concurrent + 1))
    lm = LocalCompletionsAPI(
        base_url=f"{server_url}/v1/completions", model=MODEL, tokenizer=str(served_model_dir),
        tokenizer_backend="huggingface", tokenized_requests=tokenized, batch_size=batch_size,
        num_concurrent=concurrent,
        # lm-eval keeps one position for the generated token: prompts of up to max_context - 1
        # tokens plus max_tokens=1 fit the server's window (a longer one would get a 400).
        max_length=served_engine.max_context)
    subjects = lmeval_subjects(LMEVAL_SUBJECTS["token-ids" if tokenized else "text-concurrent"])
    theirs = run_lmeval(lm, cmmlu_dir(shared_dir), split="dev", num_shots=0,
                        subjects=subjects, cache_dir=datasets_cache)
    ref = {k: v for k, v in hf_reference.items() if k[0] in subjects}
    assert len(ref) == 5 * len(subjects) and set(theirs) == set(ref)  # no vacuous pass
    assert len({r["pred"] for r in ref.values()}) > 1  # nor one letter everywhere
    assert all(theirs[k]["context"] == ref[k]["context"] for k in ref)
    disagree = [(k, theirs[k]["pred"], ref[k]["pred"]) for k in ref if theirs[k]["pred"] != ref[k]["pred"]]
    assert not disagree, f"{len(disagree)}/{len(ref)} predictions differ, e.g. {disagree[:3]}"
    worst = max(abs(theirs[k]["scores"][x] - ref[k]["scores"][x]) for k in ref for x in "ABCD")
    assert worst < SCORE_TOLERANCE, f"log-likelihoods differ by up to {worst}"
