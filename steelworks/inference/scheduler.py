"""Continuous batching for ``Engine``: one scheduler thread owns the model and decodes every
running sequence together, one token per step; requests join and leave between steps.

The batch is the one Hugging Face ``DynamicCache`` of all running rows (the approach of HF's
batched ``generate`` and of TGI's first Python server, before paged attention):

- Its per-layer ``keys``/``values`` are ``[B, Hkv, L, D]`` and LEFT-padded: row b's real
  tokens are its last ``lengths[b]`` columns. A 2D ``attention_mask`` ``[B, L]`` marks them,
  and explicit ``position_ids`` (the number of real tokens before the new one) keep RoPE
  blind to the padding, so a row computes what it would compute alone.
- A new request is prefilled alone (unpadded, so no attention row is ever fully masked),
  its first token is sampled, and its cache is concatenated on the batch dimension after
  zero-padding both sides on the left to the longer length.
- A finished or cancelled row leaves by ``index_select`` on the batch dimension; then the
  leading columns that are padding in every row are cut, so L stays the longest live row.
- A decode step feeds every row's last token (``[B, 1]``, ``logits_to_keep=1``) and samples
  each row with its own ``SamplingParams`` and its own seeded ``torch.Generator``.

Each request's tokens go to its own queue; the consumer (``GenerationStream``) turns them
into text and tells the scheduler to drop the row (``abort``) when it sees a stop string or
is cancelled. Models that cannot take a padded batch (no ``attention_mask``/``position_ids``
in ``forward``, or a cache that is not plain full-attention ``DynamicLayer``s, e.g. sliding
window) run the same loop with a batch of one and their cache left opaque.
"""

from __future__ import annotations

import inspect
import logging
import queue
import random
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from steelworks.inference.sampling import SamplingParams, pick_token

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFullError(RuntimeError):
    """Every batch slot and queue place is taken: answer 503 and let the client retry.
    Not a ValueError, so callers that map ValueError to 400 do not mistake it for bad input."""


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token; ``logprob``/``top`` only when the request asked for logprobs."""

    token_id: int
    logprob: float | None = None
    top: dict[int, float] | None = None


@dataclass(frozen=True)
class Finished:
    """The last event of every request. ``reason``: "stop" (a stop token), "length",
    "cancelled" (aborted by the consumer, or shutdown) or "error" (``error`` set)."""

    reason: str
    error: BaseException | None = None


class EventQueue:
    """The scheduler-to-consumer channel of one request: a thread-safe FIFO that can also
    wake an asyncio consumer (``listener``, e.g. ``loop.call_soon_threadsafe(event.set)``),
    so the HTTP side awaits tokens without a thread hop per token."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self.listener: Callable[[], None] | None = None

    def put(self, item: Any) -> None:
        self._q.put(item)
        if (wake := self.listener) is not None:
            wake()

    def get(self) -> Any:
        return self._q.get()

    def get_nowait(self) -> Any:
        return self._q.get_nowait()


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    events: EventQueue = field(default_factory=EventQueue)
    abort: threading.Event = field(default_factory=threading.Event)  # set by the consumer
    # Owned by the scheduler thread once admitted.
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # [V] bool, only with a repetition penalty
    generated: int = 0


def supports_padded_batch(model: torch.nn.Module) -> bool:
    """Whether ``model`` can decode a left-padded batch: its forward takes ``attention_mask``
    and ``position_ids``, and its cache is plain full-attention ``DynamicLayer``s (a sliding
    window layer drops old columns per row count, which breaks the shared left padding)."""
    if not {"attention_mask", "position_ids"} <= inspect.signature(model.forward).parameters.keys():
        return False
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=model.config).layers
    except Exception:  # not a transformers config: treat the cache as opaque
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad ``x`` on the left of ``dim`` (a negative index) up to ``width``."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    return F.pad(x, (0, 0) * (-dim - 1) + (missing, 0))


class _Batch:
    """The running rows: one left-padded KV cache, its mask, and each row's next input."""

    def __init__(self) -> None:
        self.rows: list[Request] = []
        self.lengths: list[int] = []  # real tokens cached per row (its next position id)
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, L], 1 where a real token is cached
        self.next_ids: torch.Tensor | None = None  # [B], sampled but not yet fed

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, req: Request, cache: Any, length: int, token: torch.Tensor) -> None:
        """Join a freshly prefilled row (``cache`` holds ``length`` tokens, ``token`` is [1])."""
        mask = token.new_ones(1, length)
        if not self.rows:  # nothing to merge with: adopt (also the path of opaque caches)
            self.cache, self.mask, self.next_ids = cache, mask, token
        else:
            width = max(self.mask.shape[1], length)
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_left_pad(mine.keys, width, -2),
                                       _left_pad(theirs.keys, width, -2)])
                mine.values = torch.cat([_left_pad(mine.values, width, -2),
                                         _left_pad(theirs.values, width, -2)])
            self.mask = torch.cat([_left_pad(self.mask, width, -1), _left_pad(mask, width, -1)])
            self.next_ids = torch.cat([self.next_ids, token])
        self.rows.append(req)
        self.lengths.append(length)

    def keep(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in order), then cut the all-padding leading columns."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.__init__()
            return
        cut = self.mask.shape[1] - max(self.lengths[i] for i in keep)
        idx = torch.tensor(keep, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, cut:]
            layer.values = layer.values.index_select(0, idx)[:, :, cut:]
        self.mask = self.mask.index_select(0, idx)[:, cut:]
        self.next_ids = self.next_ids.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]

    def forward(self, model: torch.nn.Module, padded: bool) -> torch.Tensor:
        """One decode step for every row: feed ``next_ids``, return last logits [B, V]."""
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        extra = {}
        if padded:
            positions = torch.tensor(self.lengths, device=mask.device)[:, None]
            extra = {"attention_mask": mask, "position_ids": positions}
        out = model(input_ids=self.next_ids[:, None], past_key_values=self.cache, use_cache=True,
                    logits_to_keep=1, **extra)
        self.cache, self.mask = out.past_key_values, mask
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1]


class Scheduler:
    """Owns the model on a daemon thread (started on first use); see the module docstring.

    At most ``max_batch_size`` rows decode together and ``max_queue`` more requests wait;
    beyond that ``submit`` raises ``QueueFullError``. ``call`` runs other model work (prompt
    logprobs) on the same thread between steps, so it never races the batch.
    """

    def __init__(self, model: torch.nn.Module, stop_ids: frozenset[int], max_batch_size: int,
                 max_queue: int) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"need max_batch_size >= 1 and max_queue >= 0, got "
                             f"{max_batch_size} and {max_queue}")
        self.model, self.stop_ids = model, stop_ids
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.config.vocab_size)
        self.padded = supports_padded_batch(model)
        self.max_batch_size = max_batch_size if self.padded else 1
        self.max_queue = max_queue
        self._cv = threading.Condition()  # guards everything below that other threads read
        self._waiting: deque[Request] = deque()
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._running = 0  # rows in the batch plus rows being prefilled
        self._closing: str | None = None  # None, "drain" or "cancel"
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None  # what ended the thread, if it died
        self._counts = dict.fromkeys(("requests_total", "rejected_total", "prompt_tokens_total",
                                      "generation_tokens_total", "decode_steps_total",
                                      "batch_size_peak"), 0)
        # Scheduler-thread state.
        self._batch = _Batch()
        self._admitted: list[Request] = []
        self._calls: list[tuple[Callable[[], Any], Future]] = []  # taken from _jobs, to run

    # --- called from any thread ---------------------------------------------------------------

    def submit(self, req: Request) -> None:
        with self._cv:
            self._check_open()
            if len(self._waiting) + self._running >= self.max_batch_size + self.max_queue:
                self._counts["rejected_total"] += 1
                raise QueueFullError(
                    f"the engine is at capacity ({self._running} running, {len(self._waiting)} "
                    f"queued); retry later")
            self._waiting.append(req)
            self._counts["requests_total"] += 1
            self._wake()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the scheduler thread (in inference mode) and return its result."""
        fut: Future = Future()
        with self._cv:
            self._check_open()
            if len(self._jobs) >= self.max_batch_size + self.max_queue:
                self._counts["rejected_total"] += 1
                raise QueueFullError("too many model calls are queued; retry later")
            self._jobs.append((fn, fut))
            self._wake()
        return fut.result()

    def stats(self) -> dict[str, int]:
        with self._cv:
            return {"waiting": len(self._waiting), "running": self._running,
                    "max_batch_size": self.max_batch_size, "max_queue": self.max_queue,
                    **self._counts}

    def shutdown(self, drain: bool = False, timeout: float | None = None) -> None:
        """Refuse new work; finish (``drain``) or cancel what is queued and running; join."""
        with self._cv:
            if self._closing != "cancel":
                self._closing = "drain" if drain else "cancel"
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def check_health(self) -> None:
        """Raise ``RuntimeError`` with the reason when this scheduler can no longer serve: its
        thread died, or it was shut down. A thread not started yet (it starts on first use)
        is healthy."""
        with self._cv:
            error, closing, thread = self._error, self._closing, self._thread
        if error is not None:
            raise RuntimeError(f"the engine's scheduler thread died: {error!r}") from error
        if closing is not None:
            state = "draining" if closing == "drain" else "stopped"
            raise RuntimeError(f"the engine is shut down ({state})")
        if thread is not None and not thread.is_alive():  # only with _closing set; belt and braces
            raise RuntimeError("the engine's scheduler thread is gone")

    def _check_open(self) -> None:
        if self._closing is not None:
            raise RuntimeError("the engine is shut down")

    def _wake(self) -> None:  # under self._cv
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="steelworks-engine", daemon=True)
            self._thread.start()
        self._cv.notify()

    # --- the scheduler thread -----------------------------------------------------------------

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            with torch.inference_mode():
                while self._iteration():
                    pass
        except BaseException as e:  # a bug here must not leave consumers waiting forever
            log.exception("the engine's scheduler stopped")
            error = e
        finally:
            with self._cv:
                self._closing, self._error = "cancel", error
                left = [*self._waiting, *self._admitted, *self._batch.rows]
                jobs, self._waiting, self._jobs = list(self._jobs), deque(), deque()
                self._batch, self._admitted, self._running = _Batch(), [], 0
            end = Finished("error", error) if error else Finished("cancelled")
            for req in left:
                req.events.put(end)
            # Also the calls of the iteration that died, some possibly already running.
            for _, fut in [*self._calls, *jobs]:
                if not fut.done() and (fut.running() or fut.set_running_or_notify_cancel()):
                    fut.set_exception(RuntimeError("the engine is shut down") if error is None
                                      else RuntimeError(f"the engine failed: {error!r}"))
            self._calls = []

    def _iteration(self) -> bool:
        """Drop cancelled work, run queued calls, admit and prefill, one decode step."""
        with self._cv:
            while not (self._waiting or self._jobs or self._batch.rows or self._closing):
                self._cv.wait()
            if self._closing == "cancel" or (self._closing and not self._waiting
                                             and not self._jobs and not self._batch.rows):
                return False
            self._calls, self._jobs = list(self._jobs), deque()
            dropped = [r for r in self._waiting if r.abort.is_set()]
            self._waiting = deque(r for r in self._waiting if not r.abort.is_set())
            while self._waiting and len(self._batch) + len(self._admitted) < self.max_batch_size:
                self._admitted.append(self._waiting.popleft())
            self._running = len(self._batch) + len(self._admitted)
        for req in dropped:
            req.events.put(Finished("cancelled"))
        for fn, fut in self._calls:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:
                    fut.set_exception(e)
        self._calls = []
        self._drop_aborted()
        prompt_tokens = 0
        while self._admitted:
            # Popped only once prefilled: if the thread dies inside, _run's cleanup still
            # finds the request (and ends its stream) instead of leaving its consumer waiting.
            req = self._admitted[0]
            prompt_tokens += len(req.prompt)
            self._prefill(req)
            self._admitted.pop(0)
        peak = len(self._batch)
        if self._batch.rows:
            self._decode()
        with self._cv:
            self._running = len(self._batch)
            self._counts["prompt_tokens_total"] += prompt_tokens
            self._counts["batch_size_peak"] = max(self._counts["batch_size_peak"], peak)
        return True

    def _drop_aborted(self) -> None:
        aborted = [req.abort.is_set() for req in self._batch.rows]  # read once: it can change
        for req, gone in zip(self._batch.rows, aborted, strict=True):
            if gone:
                req.events.put(Finished("cancelled"))
        self._batch.keep([i for i, gone in enumerate(aborted) if not gone])

    def _prefill(self, req: Request) -> None:
        """Run the prompt alone, sample its first token, and join the batch if not done."""
        p = req.params
        try:
            seed = p.seed if p.seed is not None else random.SystemRandom().getrandbits(63)
            req.generator = torch.Generator(device=self.device).manual_seed(seed)
            ids = torch.tensor([req.prompt], device=self.device)
            if p.repetition_penalty != 1.0:
                req.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
                req.seen[ids[0]] = True
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            token, (done,) = self._emit([req], out.logits[:, -1])
        except Exception as e:  # this request fails; the batch goes on
            log.exception("prefill failed")
            req.events.put(Finished("error", e))
            return
        if done:
            return
        try:
            self._batch.add(req, out.past_key_values, len(req.prompt), token)
        except Exception as e:  # the batch cache may be half merged: fail it all
            self._fail_batch(e, req)

    def _decode(self) -> None:
        try:
            logits = self._batch.forward(self.model, self.padded)
            self._batch.next_ids, done = self._emit(self._batch.rows, logits)
            self._batch.keep([i for i, d in enumerate(done) if not d])
        except Exception as e:
            self._fail_batch(e)
            return
        with self._cv:
            self._counts["decode_steps_total"] += 1

    def _fail_batch(self, error: Exception, *extra: Request) -> None:
        log.exception("decoding failed; failing %d request(s)", len(self._batch) + len(extra))
        for req in [*self._batch.rows, *extra]:
            req.events.put(Finished("error", error))
        self._batch = _Batch()

    def _emit(self, rows: list[Request], logits: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """Sample one token per row, send it to its request; which rows are finished.

        A row whose own sampling fails (NaN/inf probabilities reach ``torch.multinomial``, its
        generator errs, its consumer's wake-up raises) ends with that error alone and is
        reported done, so the caller drops it: one bad request must not fail the rows it
        happens to share a decode step with (they compute what they would alone)."""
        logits = logits.float()
        tokens = logits.argmax(-1)  # one kernel for every plain greedy row
        plain = [r.params.temperature == 0 and r.seen is None for r in rows]
        failed: dict[int, Exception] = {}
        if not all(plain):
            picked = []
            for i, r in enumerate(rows):
                if not plain[i]:
                    try:
                        picked.append(pick_token(logits[i], r.params, r.seen, r.generator))
                        continue
                    except Exception as e:
                        failed[i] = e
                picked.append(tokens[i])  # greedy, or a placeholder for a failed row
            tokens = torch.stack(picked)
        logprobs = _logprobs(rows, logits, tokens)
        done = []
        for i, (req, tid) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            reason = None
            if i not in failed:
                try:
                    req.generated += 1
                    if req.seen is not None:
                        req.seen[tid] = True
                    req.events.put(TokenEvent(tid, *logprobs.get(i, (None, None))))
                    reason = ("stop" if tid in self.stop_ids and not req.params.ignore_eos
                              else "length" if req.generated >= req.params.max_tokens else None)
                    if reason is not None:
                        req.events.put(Finished(reason))
                except Exception as e:
                    failed[i] = e
            if i in failed:
                self._fail_row(req, failed[i])
            done.append(reason is not None or i in failed)
        with self._cv:
            self._counts["generation_tokens_total"] += len(rows) - len(failed)
        return tokens, done

    @staticmethod
    def _fail_row(req: Request, error: Exception) -> None:
        log.error("request failed while sampling; the rest of the batch goes on",
                  exc_info=error)
        try:
            req.events.put(Finished("error", error))
        except Exception:  # queued all the same; only waking its consumer failed
            log.exception("could not wake the consumer of a failed request")


def _logprobs(rows: list[Request], logits: torch.Tensor, tokens: torch.Tensor
              ) -> dict[int, tuple[float, dict[int, float]]]:
    """Row index -> (logprob of its token, its top-N alternatives) for rows that asked, under
    the raw distribution (log-softmax before penalties and temperature, as vLLM reports)."""
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not want:
        return {}
    idx = torch.tensor(want, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, idx), dim=-1)
    chosen = lp.gather(1, tokens.index_select(0, idx)[:, None])[:, 0].tolist()
    k = min(max(rows[i].params.logprobs for i in want), lp.shape[-1])
    top_v, top_i = (t.tolist() for t in lp.topk(k, dim=-1))
    out = {}
    for j, i in enumerate(want):
        n = rows[i].params.logprobs
        out[i] = (chosen[j], dict(zip(top_i[j][:n], top_v[j][:n], strict=True)))
    return out
