"""The built-in inference engine: continuous batching over the Hugging Face KV cache, and
incremental detokenization that never splits a character.

``Engine.stream`` validates a request and queues it; a scheduler thread (scheduler.py, which
documents the batched cache) decodes all running sequences together, one token per step,
letting requests join and leave between steps. Each request's tokens reach its
``GenerationStream``, which turns them into text deltas in the consumer's thread. Chat
serving and evaluation both go through this engine (docs/architecture.md, principle 10).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from steelworks.data.tokenizer import EOS, load_tokenizer
from steelworks.inference.sampling import (
    MAX_LOGPROBS,
    FinishReason,
    PromptTooLongError,
    SamplingParams,
    check_text,
)
from steelworks.inference.scheduler import Finished, Request, Scheduler

__all__ = ["Engine", "EngineBase", "GenerationResult", "GenerationStream", "PromptLogprobs"]

@dataclass
class GenerationResult:
    text: str  # the completion, stop string excluded
    token_ids: list[int]  # every sampled token, the final end-of-turn token included
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    # With SamplingParams.logprobs set, one entry per token of token_ids: its logprob under
    # the model's raw distribution (before penalties and temperature) and the top-N tokens.
    token_logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


class PromptLogprobs(NamedTuple):
    """Per prompt token: log p(token | the tokens before it) and the top-N alternatives at
    that position; ``None`` for the first token, which has no context."""

    token_logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None]


class _TextAssembler:
    """Token ids in, text deltas out.

    Decoding a window that starts one emitted chunk back (the prefix/read offsets of TGI and
    vLLM) keeps per-token cost constant and keeps decoders that strip a leading space honest.
    Text ending in U+FFFD is a character whose bytes are still arriving, so it is held back;
    so is a tail that could be the start of a stop string.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # decoded text made of complete characters
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False
        # The Rust tokenizer behind a fast HF tokenizer decodes the same text without the
        # Python wrapper's argument handling (to_py_obj and friends), which was a third of
        # the serving process's time at thousands of tokens/s (py-spy; RESULTS.md). Only
        # when the wrapper would not post-process: no clean_up_tokenization_spaces.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast = backend.decode if backend is not None and not getattr(
            tokenizer, "clean_up_tokenization_spaces", False) else None

    def _decode(self, ids: list[int]) -> str:
        if self._fast is not None:
            return self._fast(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool) -> None:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new = self._decode(self.ids[self.prefix_offset :])
        if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
            self.text += new[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        self._advance(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what is held back; bytes of an unfinished character decode to U+FFFD, exactly
        as decoding all the ids at once shows them."""
        self._advance(final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self.stop:
            # A stop string cannot start inside emitted text: that text was held back while
            # it could still begin one.
            hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
                end = len(self.text)
            elif not final:
                # Only the not-yet-emitted tail can begin a stop string (see above), so the
                # prefixes to try are bounded by that tail's length, not by the stop string's:
                # a constant handful per token instead of len(stop) slices.
                room = len(self.text) - self.emitted
                end -= max((k for s in self.stop for k in range(1, min(len(s), room + 1))
                            if self.text.endswith(s[:k])), default=0)
        delta, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return delta



class GenerationStream(Iterator[str]):
    """Text deltas of one generation, assembled from the scheduler's tokens in the thread
    that iterates. ``result`` is set once the iterator is exhausted. ``token_ids`` (and, when
    requested, ``token_logprobs`` / ``top_logprobs``) grow as deltas are read: the tokens
    behind the text so far. ``cancel()`` (safe from any thread) ends it at once: no further
    deltas, finish reason "cancelled", and the scheduler frees its batch row before its next
    step."""

    def __init__(self, engine: EngineBase, request: Request) -> None:
        self.prompt_tokens = len(request.prompt)
        self.result: GenerationResult | None = None
        self.token_ids: list[int] = []
        want = request.params.logprobs is not None
        self.token_logprobs: list[float] | None = [] if want else None
        self.top_logprobs: list[dict[int, float]] | None = [] if want else None
        self._stop_ids = frozenset() if request.params.ignore_eos else engine.stop_token_ids
        self._req = request
        self._assembler = _TextAssembler(engine.tokenizer, request.params.stop)
        self._cancelled = threading.Event()
        self._failed = False

    def __next__(self) -> str:
        while self.result is None and not self._failed:
            event = None if self._cancelled.is_set() else self._req.events.get()
            if piece := self._handle(event):
                return piece
        raise StopIteration

    def drain(self) -> str:
        """The text of every token already decoded and not yet read, without waiting ("" when
        there is none yet): a consumer that fell behind catches up in one piece."""
        out = []
        while self.result is None and not self._failed:
            if self._cancelled.is_set():
                self._finish("cancelled")
                break
            try:
                event = self._req.events.get_nowait()
            except queue.Empty:
                break
            out.append(self._handle(event))
        return "".join(out)

    def set_listener(self, wake: Callable[[], None] | None) -> None:
        """Call ``wake()`` (from the scheduler thread) whenever a token or the end arrives."""
        self._req.events.listener = wake

    @property
    def done(self) -> bool:
        return self.result is not None or self._failed

    def _handle(self, event: Any) -> str:
        """Apply one scheduler event; return the text it completes ("" for none)."""
        if event is None or self._cancelled.is_set():
            self._finish("cancelled")
            return ""
        if isinstance(event, Finished):
            if event.error is not None:
                self._failed = True
                raise RuntimeError(f"generation failed: {event.error!r}") from event.error
            return self._finish(event.reason)
        self.token_ids.append(event.token_id)
        if self.token_logprobs is not None:
            self.token_logprobs.append(event.logprob)
            self.top_logprobs.append(event.top)
        if event.token_id in self._stop_ids:
            return ""  # not text; Finished("stop") comes next
        delta = self._assembler.add(event.token_id)
        if self._assembler.stopped:  # a stop string: free the row now
            self._req.abort.set()
            self._finish("stop")
        return delta

    def _finish(self, reason: str) -> str:
        """Set ``result``; return the held-back tail when the generation ended normally."""
        a = self._assembler
        tail = a.finish() if reason in ("stop", "length") and not a.stopped else ""
        self.result = GenerationResult(
            a.text, list(self.token_ids), reason, self.prompt_tokens,  # type: ignore[arg-type]
            len(self.token_ids),
            None if self.token_logprobs is None else list(self.token_logprobs),
            None if self.top_logprobs is None else list(self.top_logprobs))
        return tail

    def cancel(self) -> None:
        self._cancelled.set()
        self._req.abort.set()

    def close(self) -> None:
        """Cancel; the scheduler releases the row's KV cache before its next step."""
        self.cancel()

    def __del__(self) -> None:  # an abandoned stream must not keep its batch row
        req = getattr(self, "_req", None)
        if req is not None:
            req.abort.set()


class EngineBase:
    """What every engine shares: the tokenizer side of a request (chat template, prompt
    validation, context check) and the blocking ``generate`` over ``stream``. Subclasses
    (the built-in ``Engine`` below, ``VLLMEngine`` in vllm_engine.py) own the model and
    provide ``stream``, ``prompt_logprobs``, ``max_context``, ``vocab_size``, ``stats``,
    ``check_health`` and ``shutdown``, so the app and evals never know which one runs."""

    def __init__(self, tokenizer: Any, name: str, generation_eos: int | list[int] | None = None
                 ) -> None:
        self.tokenizer = tokenizer
        self.name = name
        # End of generation: the tokenizer's EOS, our chat end-of-turn token and whatever the
        # model's generation_config adds.
        stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOS)}
        stop.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        self.stop_token_ids = frozenset(
            t for t in stop if isinstance(t, int) and t != tokenizer.unk_token_id
        )

    kind = "builtin"  # serve.engine's name for it; /health reports it
    max_context: int  # the model's context window in tokens (a property in subclasses)
    vocab_size: int

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationStream:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        check_text(text, "prompt")
        return list(self.tokenizer.encode(text))

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Render ``[{"role", "content"}, ...]`` with the chat template, assistant turn opened."""
        if not messages:
            raise ValueError("messages must hold at least one message")
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] needs a string 'role' and a string 'content'")
            check_text(m["content"], "messages")
        ids = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding here, 4.x a plain list.
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.max_context:
            raise PromptTooLongError(prompt_tokens, max_tokens, self.max_context)

    def _validate(self, prompt_ids: Sequence[int]) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.vocab_size
        if any(t < 0 or t >= vocab for t in prompt):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        return prompt

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationResult:
        stream = self.stream(prompt_ids, params)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result


class Engine(EngineBase):
    """Tokenization, validation and the request API over a continuous-batching scheduler.

    ``max_batch_size`` sequences decode together; ``max_queue`` more wait for a slot, and
    beyond that ``stream`` raises ``QueueFullError`` (the app answers 503).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str = "model",
                 max_batch_size: int = 16, max_queue: int = 64) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        super().__init__(tokenizer, name, gen_eos)
        self._scheduler = Scheduler(self.model, self.stop_token_ids, max_batch_size, max_queue)

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "cpu",
                 dtype: torch.dtype | None = None, max_batch_size: int = 16,
                 max_queue: int = 64) -> Engine:
        """Load a local HF model directory that also holds its tokenizer."""
        from steelworks.train.models import load_model

        if dtype is None:  # bf16 where the hardware has it; CPU matmuls stay in fp32
            cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
            dtype = torch.bfloat16 if cuda_bf16 else torch.float32
        model = load_model(model_dir, dtype=dtype, device=device)
        return cls(model, load_tokenizer(model_dir), name=Path(model_dir).resolve().name,
                   max_batch_size=max_batch_size, max_queue=max_queue)

    @property
    def max_context(self) -> int:
        # The tokenizer's model_max_length is a placeholder (1 << 20); positions are the limit.
        return int(self.model.config.max_position_embeddings)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def max_batch_size(self) -> int:
        """Effective batch size: 1 for models that cannot take a padded batch."""
        return self._scheduler.max_batch_size

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationStream:
        """Validate and queue now (so callers can answer 400, or 503 on ``QueueFullError``,
        before streaming); tokens arrive as the scheduler decodes."""
        prompt = self._validate(prompt_ids)
        self.check_fits(len(prompt), params.max_tokens)
        request = Request(prompt, params)
        self._scheduler.submit(request)
        return GenerationStream(self, request)

    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int = 0) -> PromptLogprobs:
        """Logprob of each prompt token given those before it (OpenAI's ``echo`` with
        ``logprobs``), from one forward pass run on the scheduler thread between steps."""
        prompt = self._validate(prompt_ids)
        self.check_fits(len(prompt), 0)
        if not (isinstance(top, int) and 0 <= top <= MAX_LOGPROBS):
            raise ValueError(f"top must be an integer in [0, {MAX_LOGPROBS}], got {top!r}")
        return self._scheduler.call(lambda: self._prompt_logprobs(prompt, top))

    def _prompt_logprobs(self, prompt: list[int], top: int) -> PromptLogprobs:
        ids = torch.tensor([prompt], device=self.device)
        logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=0).logits[0, :-1]
        chosen: list[float | None] = [None]
        tops: list[dict[int, float] | None] = [None]
        # Position i predicts token i + 1. In chunks: [n, vocab] fp32 rows add up fast.
        for start in range(0, logits.shape[0], 256):
            lp = torch.log_softmax(logits[start : start + 256].float(), dim=-1)
            targets = ids[0, start + 1 : start + 1 + lp.shape[0]]
            chosen += lp.gather(1, targets[:, None])[:, 0].tolist()
            values, indices = (t.tolist() for t in lp.topk(top, dim=-1))
            tops += [dict(zip(i, v, strict=True)) for i, v in zip(indices, values, strict=True)]
        return PromptLogprobs(chosen, tops)

    def stats(self) -> dict[str, int]:
        """Queue and batch sizes and running totals, for /metrics: ``waiting``, ``running``,
        ``max_batch_size``, ``max_queue``, ``requests_total``, ``rejected_total``,
        ``prompt_tokens_total``, ``generation_tokens_total``, ``decode_steps_total``,
        ``batch_size_peak``."""
        return self._scheduler.stats()

    def check_health(self) -> None:
        """Raise ``RuntimeError`` naming the reason when this engine can no longer serve (its
        scheduler thread died, or it was shut down); return quietly otherwise, also before
        its first request. ``/health`` and the Ray Serve deployment's health check call this
        and nothing else, so every engine (this one, the vLLM one) defines its own failure."""
        self._scheduler.check_health()

    def shutdown(self, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the scheduler thread: new requests are refused; queued and running ones are
        cancelled (their streams end with "cancelled") or, with ``drain``, finished first."""
        self._scheduler.shutdown(drain=drain, timeout=timeout)
