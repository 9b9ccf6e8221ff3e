"""Log-likelihood evaluation against a served model, over its OpenAI-compatible HTTP API.

``predict_http`` returns the same records as ``scoring.predict`` for the model behind the
server, so a deployed endpoint can be scored without loading the weights again (and so the
served model — its dtype, its kernels, its engine — is what gets measured).

Exactness rests on three choices:

- Token ids, not text, are sent.  Context and continuation are tokenized here, separately
  and without special tokens, with the model's own tokenizer, exactly as ``scoring`` does;
  letting the server tokenize the joined text would merge tokens across the boundary and
  (``Engine.encode``) add special tokens.
- Each request is the legacy lm-eval call ``echo: true, max_tokens: 0, logprobs: 0``: the
  server returns log p(token | the tokens before it) for every prompt token, and the
  continuation's score is the sum over its last ``len(continuation)`` tokens — the same
  positions ``scoring`` gathers from its own forward pass.
- Prompt construction, shot selection and the final decision mirror ``scoring.predict``
  step for step (``_contexts_and_continuations`` and ``_records``), and
  tests/test_http_eval.py checks the two agree; see the module's report for the small
  refactor of scoring.py that would let both call one implementation.

One unavoidable difference: ``scoring`` runs the model on context + continuation minus its
last token, so it scores sequences up to ``max_position_embeddings + 1`` tokens long, while
the server runs (and bounds) the whole prompt.  A request longer than the server's
``max_model_len`` is left-truncated to it, i.e. one context token more than ``scoring``
drops; such requests are counted in a warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from steelworks.data.benchmarks import LETTERS, Item, Subject
from steelworks.evals.config import EvalConfig
from steelworks.evals.scoring import _encode, build_requests, to_records

log = logging.getLogger(__name__)

# Statuses that mean "busy, retry later": our app's 503 backpressure (with Retry-After) and
# the 429 rate limits of other OpenAI-compatible servers.
_RETRY_STATUSES = (429, 503)


class HTTPEvalError(RuntimeError):
    """A scoring request failed; the message names the item, the choice and the server's error."""


@dataclass(frozen=True)
class _Request:
    ids: tuple[int, ...]  # what is sent: context + continuation ids, maybe left-truncated
    n_cont: int  # the last n_cont tokens are the continuation, whose logprobs are summed
    label: str  # "file:line (subject 'x', id 'y'), choice B" for error messages


def predict_http(
    base_url: str,
    items: Sequence[Item],
    subjects: Sequence[Subject],
    cfg: EvalConfig,
    shots: Mapping[str, Sequence[Item]] | None = None,
    api_key: str | None = None,
    model: str | None = None,
    concurrency: int = 8,
    tokenizer: Any | str | Path | None = None,
    progress: bool = False,
    timeout: float = 600.0,
    max_retries: int = 5,
) -> list[dict[str, Any]]:
    """``scoring.predict``'s records for the model served at ``base_url``.

    ``base_url`` is the server root or its ``/v1`` (an OpenAI client's base URL); ``model``
    names the served model when the server wants one.  ``tokenizer`` is required: the served
    model's tokenizer object or a local directory holding it (``load_tokenizer``), because an
    OpenAI API exposes no exact tokenization of its own.  ``concurrency`` requests are in
    flight at once so the server can overlap or batch them; 429/503 answers are retried up to
    ``max_retries`` times after their Retry-After.  Any other failure raises
    ``HTTPEvalError`` naming the item.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if tokenizer is None:
        raise ValueError(
            "predict_http needs the served model's tokenizer (an object, or the model "
            "directory to load it from): requests are sent as token ids so that they are "
            "tokenized exactly as scoring.predict tokenizes them"
        )
    if isinstance(tokenizer, (str, Path)):
        from steelworks.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)

    contexts, continuations = build_requests(tokenizer, items, subjects, cfg, shots)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=_v1(base_url), headers=headers, timeout=timeout,
                      limits=limits) as client:
        max_len = _max_model_len(client, model)
        requests, index = _tokenize(tokenizer, items, contexts, continuations, max_len)
        sums = _score_all(lambda req: _score_one(client, req, model, max_retries), requests,
                          concurrency, progress, "scoring (http)")
    raw = [[sums[k] for k in row] for row in index]
    return to_records(items, continuations, raw, cfg)


def _tokenize(
    tokenizer: Any,
    items: Sequence[Item],
    contexts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    max_len: int | None,
) -> tuple[list[_Request], list[list[int]]]:
    """Unique requests, and per item the request index of each continuation.

    Tokenized as ``score_continuations`` does (separately, no special tokens, concatenated);
    identical sequences (repeated option texts) are sent once.
    """
    unique: dict[tuple[int, ...], int] = {}
    requests: list[_Request] = []
    index: list[list[int]] = []
    truncated = 0
    for item, context, conts in zip(items, contexts, continuations, strict=True):
        where = f"{item.source}:{item.line} (subject {item.subject!r}, id {item.id!r})"
        ctx_ids = _encode(tokenizer, context)
        if not ctx_ids:
            raise ValueError(f"{where}: context is empty after tokenization")
        row = []
        for letter, cont in zip(LETTERS, conts, strict=True):
            cont_ids = _encode(tokenizer, cont)
            if not cont_ids:
                raise ValueError(f"{where}: continuation {cont!r} is empty after tokenization")
            full = ctx_ids + cont_ids
            if max_len is not None and len(full) > max_len:
                # The server needs one context token before the continuation to score it.
                if len(cont_ids) >= max_len:
                    raise ValueError(
                        f"{where}: continuation {cont!r} has {len(cont_ids)} tokens, too many "
                        f"for the server's {max_len}-token window"
                    )
                full = full[len(full) - max_len :]  # drop the oldest context tokens
                truncated += 1
            key = tuple(full)
            if key not in unique:
                unique[key] = len(requests)
                requests.append(_Request(key, len(cont_ids), f"{where}, choice {letter}"))
            row.append(unique[key])
        index.append(row)
    if truncated:
        log.warning("%d request(s) exceeded the server's %d tokens; their contexts were "
                    "left-truncated (one token more than in-process scoring drops)",
                    truncated, max_len)
    return requests, index


# --- HTTP -------------------------------------------------------------------------------------

def _v1(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _error_text(response: httpx.Response) -> str:
    """``HTTP 400: <message> (type, code)`` from an OpenAI error body, else the raw text."""
    try:
        err = response.json()["error"]
        detail = f"{err['message']} (type={err.get('type')}, code={err.get('code')})"
    except (ValueError, KeyError, TypeError):
        detail = response.text[:500]
    return f"HTTP {response.status_code}: {detail}"


def _max_model_len(client: httpx.Client, model: str | None) -> int | None:
    """The served context window, from ``/v1/models`` (``max_model_len``, as vLLM reports it);
    None when the server does not say, in which case over-long requests fail with its 400."""
    try:
        r = client.get(f"/models/{model}" if model else "/models")
    except httpx.HTTPError as e:
        raise HTTPEvalError(f"cannot reach {client.base_url}: {e}") from e
    if r.status_code != 200:
        raise HTTPEvalError(f"GET {r.request.url}: {_error_text(r)}")
    body = r.json()
    card = body if model else (body.get("data") or [{}])[0]
    value = card.get("max_model_len")
    return int(value) if value is not None else None


def _score_one(client: httpx.Client, req: _Request, model: str | None, max_retries: int) -> float:
    """Sum of the continuation tokens' logprobs for one request."""
    body: dict[str, Any] = {"prompt": list(req.ids), "max_tokens": 0, "echo": True,
                            "logprobs": 0, "temperature": 0}
    if model:
        body["model"] = model
    for attempt in range(max_retries + 1):
        try:
            r = client.post("/completions", json=body)
        except httpx.HTTPError as e:
            raise HTTPEvalError(f"{req.label}: request failed: {type(e).__name__}: {e}") from e
        if r.status_code in _RETRY_STATUSES and attempt < max_retries:
            time.sleep(_retry_after(r, attempt))
            continue
        if r.status_code != 200:
            raise HTTPEvalError(f"{req.label}: {_error_text(r)}")
        break
    try:
        logprobs = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise HTTPEvalError(f"{req.label}: response has no choices[0].logprobs.token_logprobs: "
                            f"{r.text[:500]}") from e
    if len(logprobs) != len(req.ids):
        raise HTTPEvalError(f"{req.label}: sent {len(req.ids)} token ids but got "
                            f"{len(logprobs)} token logprobs back (does the server echo ids?)")
    tail = logprobs[-req.n_cont :]
    if any(lp is None for lp in tail):
        raise HTTPEvalError(f"{req.label}: the server returned no logprob for a continuation token")
    return float(sum(tail))


def _retry_after(response: httpx.Response, attempt: int) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return min(0.5 * 2**attempt, 8.0)


def _score_all(score_one: Callable[[_Request], float], requests: Sequence[_Request],
               concurrency: int, progress: bool, desc: str) -> list[float]:
    """``score_one`` of every request with ``concurrency`` in flight; the first failure
    cancels the rest. Shared with engine_backend, which scores through an engine instead."""
    out: list[float] = [0.0] * len(requests)
    bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not progress)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="eval-score")
    try:
        futures: dict[Future[float], int] = {
            pool.submit(score_one, req): k for k, req in enumerate(requests)
        }
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                out[futures[f]] = f.result()  # raises the first error, naming its item
            bar.update(len(done))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return out
