"""The OpenAI-compatible routes: ``GET /v1/models``, ``GET /v1/models/{model}``,
``POST /v1/chat/completions`` and ``POST /v1/completions`` (several prompts, echo, logprobs),
streamed or not, all behind the API key.

Each route turns its request into engine calls, refusing bad input with a 400 before any work
starts; routes/streaming.py turns the engine's streams into the response.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from steelworks.inference.engine import EngineBase, GenerationStream, PromptLogprobs
from steelworks.inference.sampling import PromptTooLongError, SamplingParams
from steelworks.inference.scheduler import QueueFullError
from steelworks.serve.protocol import (
    MAX_PROMPTS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    split_prompts,
)
from steelworks.serve.routes.state import AppState, ServeState, require_key
from steelworks.serve.routes.streaming import respond

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])


# --- request -> engine -----------------------------------------------------------------------

def _check_model(state: ServeState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"The model `{name}` does not exist; this server serves "
                       f"`{state.model_name}`.", param="model", code="model_not_found")


def _sampling(state: ServeState, req: SamplingRequest, prompt_tokens: int,
              max_tokens: int | None, param: str) -> SamplingParams:
    engine = state.engine
    if max_tokens is None:  # the default shrinks to fit; an explicit value must fit as asked
        max_tokens = min(state.config.max_tokens, engine.max_context - prompt_tokens)
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


def _start(engine: EngineBase, prompt_ids: list[int], params: SamplingParams, param: str
           ) -> GenerationStream:
    try:
        return engine.stream(prompt_ids, params)
    except PromptTooLongError as e:
        raise APIError(400, str(e), param=param, code="context_length_exceeded") from e
    except ValueError as e:
        raise APIError(400, str(e), param=param, code="invalid_value") from e
    except QueueFullError as e:  # backpressure: the client should retry later
        raise APIError(503, f"The server is overloaded: {e}.", type="server_error",
                       code="server_busy") from e


def _logprobs_body(engine: EngineBase, ids: list[int], logprobs: list[float | None],
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


def _prompt_cap(engine: EngineBase) -> int:
    """MAX_PROMPTS, or fewer: what the engine can hold at once (see MAX_PROMPTS)."""
    stats = engine.stats()
    room = int(stats.get("max_batch_size", 0)) + int(stats.get("max_queue", 0))
    return min(MAX_PROMPTS, room) if room > 0 else MAX_PROMPTS


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


# --- models ----------------------------------------------------------------------------------

def _model_card(state: ServeState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "steelworks", "max_model_len": state.engine.max_context}


@router.get("/models")
async def list_models(state: AppState) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/models/{model:path}")
async def get_model(model: str, state: AppState) -> dict[str, Any]:
    _check_model(state, model)
    return _model_card(state)


# --- chat ------------------------------------------------------------------------------------

@router.post("/chat/completions")
async def chat(req: ChatCompletionRequest, request: Request, state: AppState) -> Any:
    _check_model(state, req.model)
    roles = {"developer": "system"}
    try:
        prompt_ids = state.engine.encode_chat([{"role": roles.get(m.role, m.role),
                                                "content": m.text()} for m in req.messages])
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = _sampling(state, req, len(prompt_ids), max_tokens, "messages")
    stream = _start(state.engine, prompt_ids, params, "messages")

    def choice(_: int, text: str, finish: str | None) -> dict[str, Any]:
        if not req.stream:
            return {"message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}
        return {"delta": {"content": text}, "logprobs": None, "finish_reason": finish}

    def first(_: int) -> dict[str, Any]:
        return {"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    return await respond(state, req, request, [stream], "chat", choice, first)


# --- completions -----------------------------------------------------------------------------
# Bad input is refused before any work: the options, each prompt, the sampling parameters and
# each prompt's fit in the context. Then the prompts are scored (echo with logprobs), one model
# call at a time, and only then are the generations started, all together: an engine that
# counts model calls against its capacity (vLLM's) never needs more than one place per prompt,
# so a request within _prompt_cap() always finds room on an idle engine. A 400 or 503 on
# prompt i cancels those already started: nothing of a refused request runs on.

def _check_options(req: CompletionRequest) -> None:
    if req.logprobs is not None and req.stream:
        raise APIError(400, "logprobs are supported without stream only", param="logprobs")
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens must be >= 1 (0 only with echo)", param="max_tokens")
    if req.max_tokens == 0 and req.stream:
        raise APIError(400, "max_tokens=0 (score the prompt only) is supported without "
                       "stream only", param="max_tokens")


def _about(e: APIError, i: int, all_ids: list[list[int]]) -> APIError:
    """``e``, naming prompt ``i`` when the request has several (which one is at fault)."""
    if len(all_ids) > 1 and e.param == "prompt":
        e.message = f"prompt[{i}]: {e.message}"
    return e


def _plan(state: ServeState, req: CompletionRequest, all_ids: list[list[int]]
          ) -> list[SamplingParams]:
    """Each prompt's sampling parameters, checked to fit in the context; none when
    max_tokens=0 (score the prompts only)."""
    params: list[SamplingParams] = []
    for i, ids in enumerate(all_ids if req.max_tokens != 0 else []):
        try:
            params.append(_sampling(state, req, len(ids), req.max_tokens, "prompt"))
            state.engine.check_fits(len(ids), params[-1].max_tokens)
        except PromptTooLongError as e:
            raise _about(APIError(400, str(e), param="prompt", code="context_length_exceeded"),
                         i, all_ids) from e
        except APIError as e:
            raise _about(e, i, all_ids) from e
    return params


async def _score_prompts(engine: EngineBase, req: CompletionRequest, all_ids: list[list[int]],
                         request: Request) -> list[PromptLogprobs | None]:
    """The prompts' own logprobs, for echo with logprobs (else all None)."""
    prompt_lps: list[PromptLogprobs | None] = [None] * len(all_ids)
    if not (req.echo and req.logprobs is not None):
        return prompt_lps
    for i, ids in enumerate(all_ids):
        if i and await request.is_disconnected():  # nobody left to answer
            raise APIError(499, "client disconnected", code="client_closed")
        try:  # a QueueFullError here is a 503 by the app's handler
            prompt_lps[i] = await run_in_threadpool(engine.prompt_logprobs, ids, req.logprobs)
        except ValueError as e:
            raise _about(APIError(400, str(e), param="prompt", code="invalid_value"),
                         i, all_ids) from e
    return prompt_lps


def _start_all(engine: EngineBase, all_ids: list[list[int]], params: list[SamplingParams]
               ) -> list[GenerationStream]:
    """One generation per planned prompt, all or none: a refusal cancels those started."""
    streams: list[GenerationStream] = []
    try:
        for i, p in enumerate(params):
            try:
                streams.append(_start(engine, all_ids[i], p, "prompt"))
            except APIError as e:
                raise _about(e, i, all_ids) from e
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    return streams


@router.post("/completions")
async def completions(req: CompletionRequest, request: Request, state: AppState) -> Any:
    _check_model(state, req.model)
    _check_options(req)
    engine = state.engine
    all_ids = _prompt_ids(engine, req.prompt, _prompt_cap(engine))
    texts = [engine.tokenizer.decode(ids) if req.echo else "" for ids in all_ids]
    params = _plan(state, req, all_ids)
    prompt_lps = await _score_prompts(engine, req, all_ids, request)
    streams = _start_all(engine, all_ids, params)

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
                "created": int(time.time()), "model": state.model_name, "choices": choices,
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

    return await respond(state, req, request, streams, "completion", choice,
                         first if req.echo else None)
