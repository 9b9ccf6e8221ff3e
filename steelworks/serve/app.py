"""OpenAI-compatible HTTP API over an ``Engine``: /health, /v1/models, /v1/chat/completions,
/v1/completions. The same app runs under plain uvicorn, FastAPI's TestClient and Ray Serve
(deployment.py), so routes live only here.

Errors always carry OpenAI's body ``{"error": {"message", "type", "param", "code"}}``; bad
input is a 4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from steelworks.serve.config import ServeConfig
from steelworks.serve.engine import (
    Engine,
    GenerationStream,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
)
from steelworks.serve.evals_api import build_eval_router
from steelworks.serve.metrics import ServeMetrics

logger = logging.getLogger("steelworks.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status, headers=headers)


# --- request bodies -------------------------------------------------------------------------
# Unknown fields are ignored (clients send many optional ones); fields that would change the
# response's shape and are not implemented (n > 1; logprobs on chat) are rejected instead.

StopText = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # optional, as in vLLM; when given it must name the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default and range
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # vLLM-style extensions
    repetition_penalty: float = Field(1.0, gt=0)
    stop: StopText | list[StopText] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    ignore_eos: bool = False  # vLLM extension: generate max_tokens even past end-of-text


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # "developer" is what newer OpenAI clients call the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Literal[False, None] = None
    max_completion_tokens: int | None = Field(None, ge=1)  # newer name for max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]  # a text, a one-text list, or token ids
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only (lm-eval)
    # Legacy completions logprobs: how many alternatives per position (0: the chosen only).
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False  # prepend the prompt to the text (and its logprobs)



# --- helpers ---------------------------------------------------------------------------------

def _validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return APIError(400, f"{param or 'body'}: {err.get('msg', 'invalid value')}", param=param,
                    code="invalid_value")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _deltas(stream: GenerationStream, request: Request) -> AsyncIterator[str]:
    """Text deltas as the engine decodes them. The scheduler thread wakes this coroutine
    through the event loop (no thread hop per token), and a client that fell behind gets the
    tokens decoded meanwhile as one delta. Generation stops when the client goes away
    (disconnect seen here, or this task cancelled)."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    stream.set_listener(lambda: loop.call_soon_threadsafe(ready.set))
    started, first = time.perf_counter(), None
    try:
        while True:
            ready.clear()
            delta = stream.drain()
            if delta:
                if first is None:
                    first = time.perf_counter() - started
                yield delta
                if await request.is_disconnected():
                    return
            if stream.done:
                return
            if not delta:
                await ready.wait()
    finally:
        stream.set_listener(None)
        stream.cancel()
        r = stream.result  # None when cancelled mid-step: the worker thread still holds it
        metrics = getattr(getattr(getattr(request, "app", None), "state", None), "metrics", None)
        if metrics is not None:
            metrics.observe_generation(stream.prompt_tokens, r.completion_tokens if r else 0, first)
        logger.info("generation %s: %d prompt + %d completion tokens",
                    r.finish_reason if r else "cancelled", stream.prompt_tokens,
                    r.completion_tokens if r else -1)


def _logprobs_body(engine: Engine, ids: list[int], logprobs: list[float | None],
                   tops: list[dict[int, float] | None]) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object: tokens as text, their logprobs, the top
    alternatives per position (the chosen token always among them, as vLLM does) and each
    token's character offset in the text."""
    tokens = [engine.tokenizer.decode([t]) for t in ids]
    top_out: list[dict[str, float] | None] = []
    for tid, lp, top in zip(ids, logprobs, tops):
        if top is None:
            top_out.append(None)
            continue
        merged = {engine.tokenizer.decode([k]): v for k, v in top.items()}
        if lp is not None:
            merged.setdefault(engine.tokenizer.decode([tid]), lp)
        top_out.append(merged)
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top_out, "text_offset": offsets}


CHAT_PAGE = Path(__file__).with_name("static") / "chat.html"


def build_app(engine: Engine, config: ServeConfig) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``config`` (name, API key, default length)."""
    model_name = config.model_name or engine.name
    created = int(time.time())
    app = FastAPI(title="steelworks", version="0.1.0")
    app.state.engine, app.state.config = engine, config
    metrics = app.state.metrics = ServeMetrics(model_name, engine.stats)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable) -> Any:
        started = time.perf_counter()
        metrics.inflight.inc()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.inflight.dec()
            route = request.scope.get("route")
            metrics.observe_request(getattr(route, "path", "unmatched"), status, started)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 503:
            headers = {"Retry-After": "1"}
        return exc.response(headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()  # OpenAI answers 400 where FastAPI says 422

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), code=str(exc.status_code)).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    async def require_key(request: Request) -> None:
        if not config.api_key:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        if not secrets.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                           f"`{model_name}`.", param="model", code="model_not_found")

    def sampling(req: _Sampling, prompt_tokens: int, max_tokens: int | None, param: str
                 ) -> SamplingParams:
        if max_tokens is None:  # the default shrinks to fit; an explicit value must fit as asked
            max_tokens = min(config.max_tokens, engine.max_context - prompt_tokens)
            if max_tokens < 1:
                e = PromptTooLongError(prompt_tokens, 1, engine.max_context)
                raise APIError(400, str(e), param=param, code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=req.temperature,
                                  top_p=req.top_p, top_k=req.top_k, stop=stop, seed=req.seed,
                                  repetition_penalty=req.repetition_penalty,
                                  logprobs=req.logprobs if isinstance(req.logprobs, int) else None,
                                  ignore_eos=req.ignore_eos)
        except ValueError as e:  # SamplingParams' messages start with the field's name
            raise APIError(400, str(e), param=str(e).split()[0], code="invalid_value") from e

    def start(prompt_ids: list[int], params: SamplingParams, param: str) -> GenerationStream:
        try:
            return engine.stream(prompt_ids, params)
        except PromptTooLongError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from e
        except ValueError as e:
            raise APIError(400, str(e), param=param, code="invalid_value") from e
        except QueueFullError as e:  # backpressure: the client should retry later
            raise APIError(503, f"The server is overloaded ({e}); retry later.", type="server_error",
                           code="server_busy") from e

    def usage(stream: GenerationStream) -> dict[str, int]:
        r = stream.result
        done = r.completion_tokens if r else 0
        return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": done,
                "total_tokens": stream.prompt_tokens + done}

    async def respond(req: _Sampling, request: Request, stream: GenerationStream, kind: str,
                      choice: Callable[[str, str | None], dict[str, Any]],
                      first: dict[str, Any] | None = None) -> Any:
        """The non-streaming body, or an SSE stream of chunks, for one generation."""
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion" if kind == "chat" else "text_completion"
        head = {"id": rid, "created": int(time.time()), "model": model_name}
        if not req.stream:
            text = "".join([d async for d in _deltas(stream, request)])
            finish = stream.result.finish_reason if stream.result else "stop"
            return {**head, "object": obj, "choices": [{"index": 0, **choice(text, finish)}],
                    "usage": usage(stream)}
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        with_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(body: dict[str, Any]) -> str:
            extra = {"usage": None} if with_usage else {}
            return _sse({**head, "object": chunk_obj, "choices": [{"index": 0, **body}], **extra})

        async def events() -> AsyncIterator[str]:
            try:
                if first is not None:
                    yield chunk(first)
                async for delta in _deltas(stream, request):
                    yield chunk(choice(delta, None))
                finish = stream.result.finish_reason if stream.result else "stop"
                yield chunk(choice("", finish) | ({"delta": {}} if kind == "chat" else {}))
                if with_usage:
                    yield _sse({**head, "object": chunk_obj, "choices": [], "usage": usage(stream)})
            except Exception as e:  # headers are gone: report in-band, as OpenAI does
                logger.error("error while streaming", exc_info=e)
                yield _sse({"error": {"message": f"internal error: {type(e).__name__}",
                                      "type": "server_error", "param": None, "code": None}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": model_name}

    @app.get("/metrics", dependencies=[Depends(require_key)], include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # The web chat page is static (no model data in it), so it loads without the API key; it
    # asks for the key and sends it with every API call, which is where auth applies.
    @app.get("/", include_in_schema=False)
    @app.get("/chat", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "steelworks",
                "max_model_len": engine.max_context}

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        check_model(model)
        return model_card()

    @v1.post("/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        check_model(req.model)
        roles = {"developer": "system"}
        try:
            prompt_ids = engine.encode_chat([{"role": roles.get(m.role, m.role), "content": m.text()}
                                             for m in req.messages])
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        max_tokens = req.max_completion_tokens or req.max_tokens
        stream = start(prompt_ids, sampling(req, len(prompt_ids), max_tokens, "messages"),
                       "messages")

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            if not req.stream:
                return {"message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": finish}
            return {"delta": {"content": text}, "logprobs": None, "finish_reason": finish}

        first = {"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
        return await respond(req, request, stream, "chat", choice, first)

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        prompt_ids = engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if req.logprobs is not None and req.stream:
            raise APIError(400, "logprobs are supported without stream only", param="logprobs")
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo)", param="max_tokens")
        prompt_text = engine.tokenizer.decode(prompt_ids) if req.echo else ""
        prompt_lp = None
        if req.echo and req.logprobs is not None:
            try:
                prompt_lp = await run_in_threadpool(engine.prompt_logprobs, prompt_ids, req.logprobs)
            except ValueError as e:
                raise APIError(400, str(e), param="prompt", code="invalid_value") from e
        if req.max_tokens == 0:  # echo only: score the prompt, generate nothing
            lp = _logprobs_body(engine, prompt_ids, prompt_lp.token_logprobs, prompt_lp.top_logprobs) \
                if prompt_lp else None
            n = len(prompt_ids)
            return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": model_name, "choices": [{"index": 0, "text": prompt_text, "logprobs": lp,
                                                       "finish_reason": "length"}],
                    "usage": {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}}
        stream = start(prompt_ids, sampling(req, len(prompt_ids), req.max_tokens, "prompt"), "prompt")

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            if req.stream or finish is None:
                return {"text": text, "logprobs": None, "finish_reason": finish}
            lp = None
            if req.logprobs is not None and stream.result is not None:
                r = stream.result
                ids, lps, tops = list(r.token_ids), list(r.token_logprobs or []), list(r.top_logprobs or [])
                if prompt_lp is not None:
                    ids = prompt_ids + ids
                    lps = prompt_lp.token_logprobs + lps
                    tops = prompt_lp.top_logprobs + tops
                lp = _logprobs_body(engine, ids, lps, tops)
            return {"text": prompt_text + text, "logprobs": lp, "finish_reason": finish}

        return await respond(req, request, stream, "completion", choice)

    app.include_router(v1)
    app.include_router(build_eval_router(engine, config, require_key, APIError))
    return app
