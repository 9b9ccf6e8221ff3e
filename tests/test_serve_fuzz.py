"""Schemathesis against the server's own OpenAPI schema: whatever request a client can form
(valid, or breaking the schema on purpose), the answer is never a 5xx.

The engine comes from one fixture, ``fuzz_engine``: to fuzz another engine with the same
public API (the vLLM one), override that fixture. The model is the tiny test model with a
96-token context, so no generated ``max_tokens`` can make a request slow; validation is the
production code unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from steelworks.inference.engine import Engine
from steelworks.serve.app import build_app
from steelworks.serve.config import ServeConfig

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 96  # tokens: bounds every generation the fuzzer can ask for


@pytest.fixture(scope="module")
def fuzz_model_dir(tmp_path_factory, shaken_model_dir) -> Path:
    """The shaken tiny model with a short context window (RoPE has no table to shrink, so
    only the limit the engine enforces changes)."""
    out = tmp_path_factory.mktemp("fuzz_model")
    for f in shaken_model_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = CONTEXT
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module", params=["builtin", "vllm"])
def fuzz_engine(request, fuzz_model_dir) -> Engine:
    """The engine under the app, each engine in turn. The vLLM one is the session's shared
    engine (starting another costs a minute); its context is the test model's 512 tokens, so
    its generations can be longer, and its 2-head model differs from the built-in's."""
    if request.param == "vllm":
        yield request.getfixturevalue("vllm_engine")
        return
    eng = Engine.from_dir(fuzz_model_dir, max_batch_size=4, max_queue=4)
    yield eng
    eng.shutdown()




@pytest.fixture(scope="module")
def fuzz_app(fuzz_engine, mini_ceval_dir) -> FastAPI:
    # eval_sync_items=2: larger evals answer 202 at once and run in a thread, so a fuzzed
    # max_items cannot hold a test for long.
    cfg = ServeConfig(api_key=KEY, model_name="steel", max_tokens=8, eval_sync_items=2,
                      benchmarks={"mini": str(mini_ceval_dir)})
    return build_app(fuzz_engine, cfg)


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_app):
    # /openapi.json sits behind the key like every other route but /health.
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app, headers=AUTH)


schema = schemathesis.pytest.from_fixture("fuzz_schema")
# Examples per operation. 25 keeps the run near 25 s on 2 cores; a deeper search (e.g. 200,
# about 80 s) is one environment variable away.
EXAMPLES = int(os.environ.get("STEELWORKS_FUZZ_EXAMPLES", "25"))


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case) -> None:
    # Only this check: the body and status of a 4xx are the app's own tests' business, and
    # schemathesis' negative cases are expected to be refused.
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error])
