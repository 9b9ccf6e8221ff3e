"""``/v1/evals``: run a benchmark from the evals package against the served model.

``POST /v1/evals`` with ``{"benchmark": <name>, "split", "num_shots", "mode", "scoring",
"max_new_tokens", "chat", "max_items", "predictions"}`` scores the model the replica serves,
through its engine's public API (``prompt_logprobs``, ``generate``: evals/engine_backend.py),
never its weights directly: the engine's scheduler owns them, and a vLLM engine has none in
this process. Benchmarks are an allow-list from ``serve.benchmarks`` (name ->
directory in C-Eval layout on the server), so a request can never point the server at an
arbitrary path. Small runs (at most ``serve.eval_sync_items`` items) answer with the
report; larger ones answer 202 with a job id to poll at ``GET /v1/evals/{id}``; the newest
``serve.eval_keep_jobs`` finished jobs stay available. An engine at capacity answers 503.

The only module of steelworks/serve that imports steelworks.evals (docs/architecture.md's
layering, checked by tests/test_layers.py): the rest of serving runs without it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from steelworks.data.benchmarks import load_benchmark
from steelworks.evals.config import EvalConfig
from steelworks.evals.engine_backend import evaluate_engine
from steelworks.evals.runner import limit_items
from steelworks.inference.scheduler import QueueFullError
from steelworks.serve.protocol import APIError
from steelworks.serve.routes.state import AppState, ServeState, require_key

log = logging.getLogger("steelworks.serve")

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])


class EvalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    benchmark: str
    split: Literal["val", "dev", "test"] = "val"
    num_shots: int = Field(0, ge=0, le=5)
    mode: Literal["loglik", "generative"] = "loglik"
    scoring: Literal["letter", "option_text"] = "letter"  # what loglik mode scores
    max_new_tokens: int = Field(32, ge=1, le=1024)  # generative mode's reply budget
    chat: bool = True
    max_items: int | None = Field(None, ge=1)
    predictions: bool = False  # also return every item's record (pred, scores or reply)


def _resolve(state: ServeState, req: EvalRequest) -> tuple[str, EvalConfig, int]:
    """The benchmark's directory, the eval config, and how many items the run scores."""
    benchmarks = state.config.benchmarks
    if req.benchmark not in benchmarks:
        names = ", ".join(sorted(benchmarks)) or "none (set serve.benchmarks)"
        raise APIError(400, f"unknown benchmark {req.benchmark!r}; available: {names}",
                       param="benchmark")
    directory = benchmarks[req.benchmark]
    cfg = EvalConfig(benchmark=directory, split=req.split, num_shots=req.num_shots,
                     mode=req.mode, scoring=req.scoring, max_new_tokens=req.max_new_tokens,
                     chat=req.chat, max_items=req.max_items)
    try:
        _, by_subject = load_benchmark(directory, req.split)
    except (FileNotFoundError, ValueError) as e:
        raise APIError(400, f"benchmark {req.benchmark!r}: {e}", param="split") from e
    return directory, cfg, len(limit_items(by_subject, req.max_items))


def _run(state: ServeState, directory: str, cfg: EvalConfig, req: EvalRequest) -> dict[str, Any]:
    """Through the engine's public API only (evals/engine_backend.py): the built-in engine
    runs the scoring on its scheduler thread, the vLLM engine in its process."""
    with state.eval_lock:
        summary, predictions = evaluate_engine(state.engine, directory, cfg)
    summary["meta"].update(benchmark=req.benchmark, model=state.engine.name,
                           config=dataclasses.asdict(cfg))
    return {"report": summary, **({"predictions": predictions} if req.predictions else {})}


def _start_job(state: ServeState, directory: str, cfg: EvalConfig, req: EvalRequest,
               n: int) -> dict[str, Any]:
    """Run the eval in a thread of its own; the job record, updated in place, is what
    ``GET /v1/evals/{id}`` answers."""
    jid = f"eval-{uuid.uuid4().hex[:12]}"
    job = {"id": jid, "object": "eval", "status": "running", "items": n,
           "created": int(time.time()), "report": None, "error": None}
    state.eval_jobs.add(job)

    def work() -> None:
        try:
            job.update(_run(state, directory, cfg, req))
            job["status"] = "completed"
        except Exception as e:  # reported to the poller, not lost in a thread
            log.exception("eval job %s failed", jid)
            job["status"], job["error"] = "failed", f"{type(e).__name__}: {e}"
        state.eval_jobs.prune(state.config.eval_keep_jobs)

    threading.Thread(target=work, name=jid, daemon=True).start()
    state.eval_jobs.prune(state.config.eval_keep_jobs)
    return job


@router.post("/evals")
async def create(req: EvalRequest, state: AppState) -> Any:
    directory, cfg, n = _resolve(state, req)
    if n > state.config.eval_sync_items:
        return JSONResponse(_start_job(state, directory, cfg, req, n), status_code=202)
    try:
        out = await run_in_threadpool(_run, state, directory, cfg, req)
    except QueueFullError as e:  # the engine is saturated: retry later, as for chat
        raise APIError(503, f"The server is overloaded: {e}.", type="server_error",
                       code="server_busy") from e
    return {"id": None, "object": "eval", "status": "completed", "items": n, **out}


@router.get("/evals/{jid}")
async def poll(jid: str, state: AppState) -> dict[str, Any]:
    job = state.eval_jobs.get(jid)
    if job is None:
        raise APIError(404, f"no eval job {jid!r} (finished jobs are kept up to "
                       f"serve.eval_keep_jobs)", param="id")
    return job
