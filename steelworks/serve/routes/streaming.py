"""From engine streams to HTTP: the text deltas of a generation as the engine decodes them,
several prompts' generations merged, and the OpenAI response built from them (one JSON body,
or server-sent events). The OpenAI routes (routes/openai.py) say what each choice holds;
everything about timing, disconnects and the SSE framing is here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from steelworks.inference.engine import GenerationStream
from steelworks.serve.metrics import ServeMetrics
from steelworks.serve.protocol import SamplingRequest
from steelworks.serve.routes.state import ServeState

logger = logging.getLogger("steelworks.serve")

# How often a generation that yields no text checks whether its client is still there.
DISCONNECT_POLL_S = 0.5

# What a route says of choice ``i``: ``choice(i, text, finish_reason)`` for its content (the
# whole text, or one delta when streaming), ``first(i)`` for what opens its stream.
Choice = Callable[[int, str, str | None], dict[str, Any]]
First = Callable[[int], dict[str, Any]]


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


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


# One waker per event loop, not per app: it batches wake-ups for the loop, whichever app's
# streams they belong to. Weak keys: a closed loop's waker goes with it.
_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Waker] = weakref.WeakKeyDictionary()


def _waker(loop: asyncio.AbstractEventLoop) -> _Waker:
    if (w := _wakers.get(loop)) is None:
        w = _wakers[loop] = _Waker(loop)
    return w


async def _deltas(stream: GenerationStream, request: Request,
                  metrics: ServeMetrics | None = None) -> AsyncIterator[str]:
    """Text deltas as the engine decodes them. The scheduler thread wakes this coroutine
    through the event loop (no thread hop per token), and a client that fell behind gets the
    tokens decoded meanwhile as one delta. Generation stops when the client goes away
    (disconnect seen here, or this task cancelled). The token counts and time to first token
    go to ``metrics``, when given, however the generation ends."""
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
        if metrics is not None:
            metrics.observe_generation(stream.prompt_tokens, r.completion_tokens if r else 0, first)
        logger.info("generation %s: %d prompt + %d completion tokens",
                    r.finish_reason if r else "cancelled", stream.prompt_tokens,
                    r.completion_tokens if r else -1)


async def _merged(streams: list[GenerationStream], request: Request,
                  metrics: ServeMetrics | None = None) -> AsyncIterator[tuple[int, str | None]]:
    """The text deltas of several generations as they come: ``(i, delta)`` for
    ``streams[i]``, then ``(i, None)`` once it has ended. Each stream is read by ``_deltas``
    in a task of its own, so one prompt's tokens never wait for another's. A generation that
    ends cancelled (``_deltas`` saw the client go) ends them all, as does leaving this early
    or failing: every stream is cancelled on the way out, so nothing keeps running for a
    request that is over."""
    events: asyncio.Queue[tuple[int, str | Exception | None]] = asyncio.Queue()

    async def pump(i: int, stream: GenerationStream) -> None:
        try:
            async for delta in _deltas(stream, request, metrics):
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


def _usage(streams: list[GenerationStream]) -> dict[str, int]:
    prompt = sum(s.prompt_tokens for s in streams)
    done = sum(s.result.completion_tokens for s in streams if s.result)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _finish_reason(stream: GenerationStream) -> str:
    return stream.result.finish_reason if stream.result else "stop"


async def respond(state: ServeState, req: SamplingRequest, request: Request,
                  streams: list[GenerationStream], kind: str, choice: Choice,
                  first: First | None = None) -> Any:
    """The non-streaming body, or an SSE stream of chunks, for one generation per prompt:
    choice ``i`` is ``streams[i]``'s, and each streamed chunk carries one choice, tagged
    with its ``index`` (vLLM's layout for several prompts). ``first(i)``, if given, opens
    each choice's stream (the chat role; the echoed prompt). ``kind``: "chat" or
    "completion"."""
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    head = {"id": rid, "created": int(time.time()), "model": state.model_name}
    if not req.stream:
        parts: list[list[str]] = [[] for _ in streams]
        async for i, delta in _merged(streams, request, state.metrics):
            if delta is not None:
                parts[i].append(delta)
        choices = [{"index": i, **choice(i, "".join(p), _finish_reason(s))}
                   for i, (p, s) in enumerate(zip(parts, streams, strict=True))]
        obj = "chat.completion" if kind == "chat" else "text_completion"
        return {**head, "object": obj, "choices": choices, "usage": _usage(streams)}
    events = _events(state, req, request, streams, kind, head, choice, first)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _events(state: ServeState, req: SamplingRequest, request: Request,
                  streams: list[GenerationStream], kind: str, head: dict[str, Any],
                  choice: Choice, first: First | None) -> AsyncIterator[str]:
    """The SSE body of ``respond``: each choice's opening chunk, its deltas, a chunk with its
    finish reason, the usage chunk if asked for, then ``[DONE]``."""
    chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    with_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(i: int, body: dict[str, Any]) -> str:
        extra = {"usage": None} if with_usage else {}
        return _sse({**head, "object": chunk_obj, "choices": [{"index": i, **body}], **extra})

    try:
        if first is not None:
            for i in range(len(streams)):
                yield chunk(i, first(i))
        async for i, delta in _merged(streams, request, state.metrics):
            if delta is not None:
                yield chunk(i, choice(i, delta, None))
            else:  # choice i is complete: its finish reason, in a chunk of its own
                end = choice(i, "", _finish_reason(streams[i]))
                yield chunk(i, end | ({"delta": {}} if kind == "chat" else {}))
        if with_usage:
            yield _sse({**head, "object": chunk_obj, "choices": [], "usage": _usage(streams)})
    except Exception as e:  # headers are gone: report in-band, as OpenAI does
        logger.error("error while streaming", exc_info=e)
        yield _sse({"error": {"message": f"internal error: {type(e).__name__}",
                              "type": "server_error", "param": None, "code": None}})
    yield "data: [DONE]\n\n"
