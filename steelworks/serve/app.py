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
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from steelworks.inference.engine import Engine, EngineBase, GenerationStream, PromptLogprobs
from steelworks.inference.sampling import InvalidTextError, PromptTooLongError, SamplingParams
from steelworks.inference.scheduler import QueueFullError
from steelworks.serve.config import ServeConfig
from steelworks.serve.evals_api import build_eval_router
from steelworks.serve.metrics import ServeMetrics
from steelworks.serve.middleware import BodyLimit, RequestMetrics
from steelworks.serve.protocol import (
    MAX_PROMPTS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    split_prompts,
    validation_error,
)

logger = logging.getLogger("steelworks.serve")


# --- helpers ---------------------------------------------------------------------------------

def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# How often a generation that yields no text checks whether its client is still there.
DISCONNECT_POLL_S = 0.5


class _Waker:
    """Sets asyncio events of one loop from engine threads, with one
    ``call_soon_threadsafe`` per burst instead of one per token: an engine step produces a
    token for every running request at nearly the same moment, and each thread-safe call
    writes to the loop's self-pipe and takes the GIL back and forth. At 16 streams and
    thousands of tokens/s that was the largest per-token cost left in the app."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[asyncio.Event] = []

    def wake(self, event: asyncio.Event) -> None:
        with self._lock:
            first = not self._pending
            self._pending.append(event)
        if first:  # later wakes of this burst ride on the flush already scheduled
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for event in pending:
            event.set()


_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Waker] = weakref.WeakKeyDictionary()


def _waker(loop: asyncio.AbstractEventLoop) -> _Waker:
    if (w := _wakers.get(loop)) is None:
        w = _wakers[loop] = _Waker(loop)
    return w


async def _deltas(stream: GenerationStream, request: Request) -> AsyncIterator[str]:
    """Text deltas as the engine decodes them. The scheduler thread wakes this coroutine
    through the event loop (no thread hop per token), and a client that fell behind gets the
    tokens decoded meanwhile as one delta. Generation stops when the client goes away
    (disconnect seen here, or this task cancelled)."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    wake = _waker(loop).wake
    stream.set_listener(lambda: wake(ready))
    started, first = time.perf_counter(), None
    checked, polled = time.monotonic(), False
    try:
        while True:
            ready.clear()
            delta = stream.drain()
            if delta:
                if first is None:
                    first = time.perf_counter() - started
                yield delta
            if stream.done:
                return
            # Every DISCONNECT_POLL_S, whether tokens bring text or not (special tokens,
            # held-back characters): a non-streaming request has nothing else that would
            # notice its client leave, and would keep its batch row to max_tokens. Not per
            # token: is_disconnected() costs a cancel scope each time, and at thousands of
            # tokens/s that was a measurable share of the server's CPU.
            # (And right after the first delta: a client that left at once is let go at once.)
            now = time.monotonic()
            if (delta and not polled) or now - checked >= DISCONNECT_POLL_S:
                checked, polled = now, True
                if await request.is_disconnected():
                    return
            if not delta:
                # A timer handle, not asyncio.wait_for (which makes a task per wait): wakes
                # this loop for the next disconnect check when no token comes.
                timer = loop.call_later(DISCONNECT_POLL_S, ready.set)
                try:
                    await ready.wait()
                finally:
                    timer.cancel()
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


async def _merged(streams: list[GenerationStream], request: Request
                  ) -> AsyncIterator[tuple[int, str | None]]:
    """The text deltas of several generations as they come: ``(i, delta)`` for
    ``streams[i]``, then ``(i, None)`` once it has ended. Each stream is read by ``_deltas``
    in a task of its own, so one prompt's tokens never wait for another's. A generation that
    ends cancelled (``_deltas`` saw the client go) ends them all, as does leaving this early
    or failing: every stream is cancelled on the way out, so nothing keeps running for a
    request that is over."""
    events: asyncio.Queue[tuple[int, str | Exception | None]] = asyncio.Queue()

    async def pump(i: int, stream: GenerationStream) -> None:
        try:
            async for delta in _deltas(stream, request):
                events.put_nowait((i, delta))
            events.put_nowait((i, None))
        except Exception as e:  # raised again by the reader below
            events.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await events.get()
            if isinstance(item, Exception):
                raise item
            yield i, item
            if item is None:
                left -= 1
                r = streams[i].result
                if r is None or r.finish_reason == "cancelled":
                    return
    finally:
        for stream in streams:
            stream.cancel()  # a no-op on a finished stream
        for task in tasks:
            task.cancel()


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


def _prompt_ids(engine: EngineBase, prompt: Any, cap: int) -> list[list[int]]:
    """Each prompt of a completions request as token ids, every one checked before any work
    (an empty prompt, text that is not valid Unicode, ids outside the vocabulary, more
    prompts than ``cap``): a 400 that names the prompt at fault."""
    prompts = split_prompts(prompt)
    if len(prompts) > cap:
        raise APIError(400, f"Too many prompts: {len(prompts)}; this server takes at most "
                       f"{cap} per request (all of a request's prompts must fit in the "
                       f"engine together). Send them in smaller batches.", param="prompt",
                       code="too_many_prompts")
    where = (lambda i: f"prompt[{i}]: ") if len(prompts) > 1 else (lambda i: "")
    all_ids: list[list[int]] = []
    for i, p in enumerate(prompts):
        try:
            ids = engine.encode(p) if isinstance(p, str) else list(p)
        except ValueError as e:  # text that is not valid Unicode
            raise APIError(400, where(i) + str(e), param="prompt", code="invalid_value") from e
        if not ids:
            raise APIError(400, f"prompt[{i}] is empty" if len(prompts) > 1 else
                           "prompt must not be empty", param="prompt")
        # Checked here, before anything is decoded (echo) or started: the engine checks ids
        # too, but only those it is given, and only when given them.
        if max(ids) >= engine.vocab_size:
            raise APIError(400, where(i) + f"prompt token ids must lie in [0, "
                           f"{engine.vocab_size})", param="prompt", code="invalid_value")
        all_ids.append(ids)
    return all_ids


CHAT_PAGE = Path(__file__).with_name("static") / "chat.html"


def build_app(engine: Engine, config: ServeConfig) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``config`` (name, API key, default length)."""
    model_name = config.model_name or engine.name
    created = int(time.time())
    # FastAPI's /docs, /redoc and /openapi.json are public; ours (below) take the API key.
    app = FastAPI(title="steelworks", version="0.1.0", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine, app.state.config = engine, config
    metrics = app.state.metrics = ServeMetrics(model_name, engine.stats)
    api_key = config.resolve_api_key()  # config, else $STEELWORKS_API_KEY (config.api_key_env)
    # Added before RequestMetrics, so it sits inside it: 413s are counted like other answers.
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)

    app.add_middleware(RequestMetrics, metrics=metrics)  # added last: the outermost

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 503:
            headers = {"Retry-After": "1"}
        return exc.response(headers)

    @app.exception_handler(QueueFullError)
    async def _busy(_: Request, exc: QueueFullError) -> JSONResponse:
        # Every path into the engine (generation, prompt logprobs for echo, evals) can find
        # its queue full; whichever route it surfaces in, the client gets 503 and a retry hint.
        return APIError(503, f"The server is overloaded: {exc}.", type="server_error",
                        code="server_busy").response({"Retry-After": "1"})

    @app.exception_handler(InvalidTextError)
    async def _bad_text(_: Request, exc: InvalidTextError) -> JSONResponse:
        return APIError(400, str(exc), param=exc.param, code="invalid_value").response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()  # OpenAI answers 400 where FastAPI says 422

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), code=str(exc.status_code)).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    async def require_key(request: Request) -> None:
        if not api_key:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        if not secrets.compare_digest(key.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                           f"`{model_name}`.", param="model", code="model_not_found")

    def sampling(req: SamplingRequest, prompt_tokens: int, max_tokens: int | None, param: str
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
            raise APIError(503, f"The server is overloaded: {e}.", type="server_error",
                           code="server_busy") from e

    def usage(streams: list[GenerationStream]) -> dict[str, int]:
        prompt = sum(s.prompt_tokens for s in streams)
        done = sum(s.result.completion_tokens for s in streams if s.result)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def finish_reason(stream: GenerationStream) -> str:
        return stream.result.finish_reason if stream.result else "stop"

    async def respond(req: SamplingRequest, request: Request, streams: list[GenerationStream],
                      kind: str, choice: Callable[[int, str, str | None], dict[str, Any]],
                      first: Callable[[int], dict[str, Any]] | None = None) -> Any:
        """The non-streaming body, or an SSE stream of chunks, for one generation per prompt:
        choice ``i`` is ``streams[i]``'s, and each streamed chunk carries one choice, tagged
        with its ``index`` (vLLM's layout for several prompts). ``first(i)``, if given, opens
        each choice's stream (the chat role; the echoed prompt)."""
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion" if kind == "chat" else "text_completion"
        head = {"id": rid, "created": int(time.time()), "model": model_name}
        if not req.stream:
            parts: list[list[str]] = [[] for _ in streams]
            async for i, delta in _merged(streams, request):
                if delta is not None:
                    parts[i].append(delta)
            choices = [{"index": i, **choice(i, "".join(p), finish_reason(s))}
                       for i, (p, s) in enumerate(zip(parts, streams, strict=True))]
            return {**head, "object": obj, "choices": choices, "usage": usage(streams)}
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        with_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(i: int, body: dict[str, Any]) -> str:
            extra = {"usage": None} if with_usage else {}
            return _sse({**head, "object": chunk_obj, "choices": [{"index": i, **body}], **extra})

        async def events() -> AsyncIterator[str]:
            try:
                if first is not None:
                    for i in range(len(streams)):
                        yield chunk(i, first(i))
                async for i, delta in _merged(streams, request):
                    if delta is not None:
                        yield chunk(i, choice(i, delta, None))
                    else:  # choice i is complete: its finish reason, in a chunk of its own
                        end = choice(i, "", finish_reason(streams[i]))
                        yield chunk(i, end | ({"delta": {}} if kind == "chat" else {}))
                if with_usage:
                    yield _sse({**head, "object": chunk_obj, "choices": [], "usage": usage(streams)})
            except Exception as e:  # headers are gone: report in-band, as OpenAI does
                logger.error("error while streaming", exc_info=e)
                yield _sse({"error": {"message": f"internal error: {type(e).__name__}",
                                      "type": "server_error", "param": None, "code": None}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, str]:
        # Load balancers and Kubernetes probes read the status: a replica whose engine can no
        # longer serve (scheduler thread dead, engine process gone) must say so. Only the
        # engine's public check_health is called, so every engine defines its own failure.
        try:
            engine.check_health()
        except Exception as e:
            raise APIError(503, f"The engine cannot serve: {e}", type="server_error",
                           code="engine_unhealthy") from e
        return {"status": "ok", "model": model_name, "engine": engine.kind}

    @app.get("/metrics", dependencies=[Depends(require_key)], include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # The web chat page is static (no model data in it), so it loads without the API key; it
    # asks for the key and sends it with every API call, which is where auth applies.
    @app.get("/", include_in_schema=False)
    @app.get("/chat", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    # The schema and its two viewers, behind the key when one is set: the schema lists every
    # route and field. (With a key, a browser cannot send the header; fetch the schema with
    # it, e.g. `curl -H "Authorization: Bearer $STEELWORKS_API_KEY" .../openapi.json`.)
    docs = APIRouter(dependencies=[Depends(require_key)], include_in_schema=False)

    @docs.get("/openapi.json")
    async def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    def schema_url(request: Request) -> str:  # under Ray Serve's route prefix too
        return request.scope.get("root_path", "").rstrip("/") + "/openapi.json"

    @docs.get("/docs")
    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=schema_url(request), title="steelworks API")

    @docs.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url=schema_url(request), title="steelworks API")

    app.include_router(docs)

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

        def choice(_: int, text: str, finish: str | None) -> dict[str, Any]:
            if not req.stream:
                return {"message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": finish}
            return {"delta": {"content": text}, "logprobs": None, "finish_reason": finish}

        def first(_: int) -> dict[str, Any]:
            return {"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}

        return await respond(req, request, [stream], "chat", choice, first)

    def prompt_cap() -> int:
        """MAX_PROMPTS, or fewer: what the engine can hold at once (see MAX_PROMPTS)."""
        stats = engine.stats()
        room = int(stats.get("max_batch_size", 0)) + int(stats.get("max_queue", 0))
        return min(MAX_PROMPTS, room) if room > 0 else MAX_PROMPTS

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        check_model(req.model)
        if req.logprobs is not None and req.stream:
            raise APIError(400, "logprobs are supported without stream only", param="logprobs")
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo)", param="max_tokens")
        if req.max_tokens == 0 and req.stream:
            raise APIError(400, "max_tokens=0 (score the prompt only) is supported without "
                           "stream only", param="max_tokens")
        all_ids = _prompt_ids(engine, req.prompt, prompt_cap())
        several = len(all_ids) > 1

        def about(i: int, e: APIError) -> APIError:  # with several prompts, name the culprit
            if several and e.param == "prompt":
                e.message = f"prompt[{i}]: {e.message}"
            return e

        texts = [engine.tokenizer.decode(ids) if req.echo else "" for ids in all_ids]

        # Bad input is refused before any work: the sampling parameters and each prompt's fit
        # in the context. Then the prompts are scored (echo with logprobs), one model call at a
        # time, and only then are the generations started, all together: an engine that counts
        # model calls against its capacity (vLLM's) never needs more than one place per prompt,
        # so a request within prompt_cap() always finds room on an idle engine. A 400 or 503
        # on prompt i cancels those already started: nothing of a refused request runs on.
        params: list[SamplingParams] = []
        for i, ids in enumerate(all_ids if req.max_tokens != 0 else []):
            try:
                params.append(sampling(req, len(ids), req.max_tokens, "prompt"))
                engine.check_fits(len(ids), params[-1].max_tokens)
            except PromptTooLongError as e:
                raise about(i, APIError(400, str(e), param="prompt",
                                        code="context_length_exceeded")) from e
            except APIError as e:
                raise about(i, e) from e
        prompt_lps: list[PromptLogprobs | None] = [None] * len(all_ids)
        if req.echo and req.logprobs is not None:
            for i, ids in enumerate(all_ids):
                if i and await request.is_disconnected():  # nobody left to answer
                    raise APIError(499, "client disconnected", code="client_closed")
                try:  # a QueueFullError here is a 503 by the app's handler
                    prompt_lps[i] = await run_in_threadpool(engine.prompt_logprobs, ids,
                                                            req.logprobs)
                except ValueError as e:
                    raise about(i, APIError(400, str(e), param="prompt",
                                            code="invalid_value")) from e
        streams: list[GenerationStream] = []
        try:
            for i, p in enumerate(params):  # none for max_tokens=0
                try:
                    streams.append(start(all_ids[i], p, "prompt"))
                except APIError as e:
                    raise about(i, e) from e
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise

        def logprobs(i: int, ids: list[int], lps: list[float | None],
                     tops: list[dict[int, float] | None]) -> dict[str, Any] | None:
            if req.logprobs is None:
                return None
            plp = prompt_lps[i]
            if plp is not None:  # echo: the prompt's tokens first
                ids, lps, tops = all_ids[i] + ids, plp.token_logprobs + lps, plp.top_logprobs + tops
            return _logprobs_body(engine, ids, lps, tops)

        if req.max_tokens == 0:  # echo only: score the prompts, generate nothing
            n = sum(len(ids) for ids in all_ids)
            choices = [{"index": i, "text": texts[i], "logprobs": logprobs(i, [], [], []),
                        "finish_reason": "length"} for i in range(len(all_ids))]
            return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                    "created": int(time.time()), "model": model_name, "choices": choices,
                    "usage": {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}}

        def choice(i: int, text: str, finish: str | None) -> dict[str, Any]:
            if req.stream or finish is None:
                return {"text": text, "logprobs": None, "finish_reason": finish}
            lp, r = None, streams[i].result
            if r is not None:
                lp = logprobs(i, list(r.token_ids), list(r.token_logprobs or []),
                              list(r.top_logprobs or []))
            return {"text": texts[i] + text, "logprobs": lp, "finish_reason": finish}

        def first(i: int) -> dict[str, Any]:  # echo, streamed: the prompt opens its choice
            return {"text": texts[i], "logprobs": None, "finish_reason": None}

        return await respond(req, request, streams, "completion", choice,
                             first if req.echo else None)

    app.include_router(v1)
    app.include_router(build_eval_router(engine, config, require_key, APIError))
    return app
