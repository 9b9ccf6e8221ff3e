"""``/v1/evals``: run a benchmark from the evals package against the served model.

``POST /v1/evals`` with ``{"benchmark": <name>, "split", "num_shots", "scoring", "chat",
"max_items"}`` scores the model the replica holds (same weights as the chat endpoint, in
the same process). Benchmarks are an allow-list from ``serve.benchmarks`` (name ->
directory in C-Eval layout on the server), so a request can never point the server at an
arbitrary path. Small runs (at most ``serve.eval_sync_items`` items) answer with the
report; larger ones answer 202 with a job id to poll at ``GET /v1/evals/{id}``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from steelworks.evals.config import EvalConfig
from steelworks.serve.config import ServeConfig

log = logging.getLogger("steelworks.serve")


class EvalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    benchmark: str
    split: Literal["val", "dev", "test"] = "val"
    num_shots: int = Field(0, ge=0, le=5)
    scoring: Literal["letter", "option_text"] = "letter"
    chat: bool = True
    max_items: int | None = Field(None, ge=1)


def build_eval_router(engine: Any, config: ServeConfig, require_key: Callable,
                      error: Callable[..., Exception]) -> APIRouter:
    """The router; ``error(status, message, param=...)`` builds the app's OpenAI-style error."""
    from steelworks.evals.benchmarks import load_benchmark
    from steelworks.evals.runner import evaluate, limit_items

    router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
    jobs: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()  # one evaluation at a time per replica: they share the CPU/GPU

    def resolve(req: EvalRequest) -> tuple[str, EvalConfig, int]:
        if req.benchmark not in config.benchmarks:
            names = ", ".join(sorted(config.benchmarks)) or "none (set serve.benchmarks)"
            raise error(400, f"unknown benchmark {req.benchmark!r}; available: {names}", param="benchmark")
        directory = config.benchmarks[req.benchmark]
        cfg = EvalConfig(benchmark=directory, split=req.split, num_shots=req.num_shots,
                         scoring=req.scoring, chat=req.chat, max_items=req.max_items)
        try:
            _, by_subject = load_benchmark(directory, req.split)
        except (FileNotFoundError, ValueError) as e:
            raise error(400, f"benchmark {req.benchmark!r}: {e}", param="split") from e
        return directory, cfg, len(limit_items(by_subject, req.max_items))

    def run(directory: str, cfg: EvalConfig, name: str) -> dict[str, Any]:
        with lock:
            summary, _ = evaluate(engine.model, engine.tokenizer, directory, cfg)
        summary["meta"].update(benchmark=name, model=engine.name, config=dataclasses.asdict(cfg))
        return summary

    @router.post("/evals")
    async def create(req: EvalRequest) -> Any:
        directory, cfg, n = resolve(req)
        if n <= config.eval_sync_items:
            report = await run_in_threadpool(run, directory, cfg, req.benchmark)
            return {"id": None, "object": "eval", "status": "completed", "items": n, "report": report}
        jid = f"eval-{uuid.uuid4().hex[:12]}"
        job = jobs[jid] = {"id": jid, "object": "eval", "status": "running", "items": n,
                           "created": int(time.time()), "report": None, "error": None}

        def work() -> None:
            try:
                job["report"] = run(directory, cfg, req.benchmark)
                job["status"] = "completed"
            except Exception as e:  # reported to the poller, not lost in a thread
                log.exception("eval job %s failed", jid)
                job["status"], job["error"] = "failed", f"{type(e).__name__}: {e}"

        threading.Thread(target=work, name=jid, daemon=True).start()
        return JSONResponse(job, status_code=202)

    @router.get("/evals/{jid}")
    async def poll(jid: str) -> dict[str, Any]:
        if jid not in jobs:
            raise error(404, f"no eval job {jid!r}", param="id")
        return jobs[jid]

    return router
