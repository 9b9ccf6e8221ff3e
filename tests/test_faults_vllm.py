"""Fault: the vLLM engine-core process dies under a running server. ``/health`` must say so
(503), so Ray Serve's ``check_health`` (deployment.py calls ``engine.check_health``) replaces
the replica; requests in flight end with an error instead of hanging."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest
from conftest import uvicorn_in_thread

from steelworks.inference.sampling import SamplingParams
from steelworks.serve.app import build_app
from steelworks.serve.config import ServeConfig

pytestmark = pytest.mark.faults


def test_killed_engine_process_fails_health_and_in_flight_requests(vllm_model_dir) -> None:
    from steelworks.inference.vllm_engine import VLLMEngine

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    engine = VLLMEngine(vllm_model_dir, max_batch_size=4, max_queue=4)
    try:
        with uvicorn_in_thread(build_app(engine, ServeConfig(model_name="steel"))) as url:
            assert httpx.get(url + "/health").status_code == 200
            ids = engine.encode("北京")
            stream = engine.stream(ids, SamplingParams(max_tokens=400, temperature=0,
                                                       ignore_eos=True))
            assert next(stream)  # decoding
            mine = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
            assert mine, "the vLLM engine started no process"
            for p in mine:
                os.kill(p.pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            with pytest.raises(RuntimeError, match="generation failed"):
                for _ in stream:  # ends with an error, never hangs
                    assert time.monotonic() < deadline, "the stream hung on a dead engine"
            r = httpx.get(url + "/health")
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "engine_unhealthy"
            with pytest.raises(RuntimeError, match="engine"):
                engine.check_health()
    finally:
        engine.shutdown(timeout=30)
