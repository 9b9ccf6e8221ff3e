"""The built-in inference engine: one sequence at a time, a hand-written decode loop over the
Hugging Face KV cache, and incremental detokenization that never splits a character.

It is deliberately simple (no batching yet) but its surface is what a batching engine would
expose too: ``encode_chat`` / ``generate`` / ``stream`` over token ids with ``SamplingParams``.
Chat serving and evaluation both go through it (DESIGN principle 10).
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from steelworks.data.tokenizer import EOS, load_tokenizer

FinishReason = Literal["stop", "length", "cancelled"]


class PromptTooLongError(ValueError):
    """The prompt plus the requested completion does not fit in the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, max_context: int) -> None:
        self.prompt_tokens, self.max_tokens, self.max_context = prompt_tokens, max_tokens, max_context
        # Worded like OpenAI's context_length_exceeded error, which clients already recognise.
        super().__init__(
            f"This model's maximum context length is {max_context} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for "
            f"the completion). Please reduce the length of the prompt or the max_tokens."
        )


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy; ``top_k == 0`` disables top-k."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not is_num(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}"
            )
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")


@dataclass
class GenerationResult:
    text: str  # the completion, stop string excluded
    token_ids: list[int]  # every sampled token, the final end-of-turn token included
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


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

    def _decode(self, ids: list[int]) -> str:
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
                end -= max((k for s in self.stop for k in range(1, len(s))
                            if self.text.endswith(s[:k])), default=0)
        delta, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return delta


class GenerationStream(Iterator[str]):
    """Text deltas of one generation. ``result`` is set once the iterator is exhausted;
    ``cancel()`` (safe from any thread) stops it before its next forward pass."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams) -> None:
        self.prompt_tokens = len(prompt_ids)
        self.result: GenerationResult | None = None
        self._cancel = threading.Event()
        self._gen = self._run(engine, prompt_ids, params)

    def __next__(self) -> str:
        return next(self._gen)

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        """Cancel and release the KV cache (call from the consuming thread)."""
        self.cancel()
        self._gen.close()

    def _run(self, engine: Engine, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        assembler = _TextAssembler(engine.tokenizer, params.stop)
        token_ids: list[int] = []
        finish: FinishReason = "length"
        tokens = engine._decode_loop(prompt_ids, params, self._cancel)
        try:
            for tid in tokens:
                token_ids.append(tid)
                if tid in engine.stop_token_ids:
                    finish = "stop"
                    break
                delta = assembler.add(tid)
                if delta:
                    yield delta
                if assembler.stopped:
                    finish = "stop"
                    break
        finally:
            tokens.close()
        if self._cancel.is_set():
            finish = "cancelled"
        elif not assembler.stopped:
            tail = assembler.finish()
            if tail:
                yield tail
        self.result = GenerationResult(assembler.text, token_ids, finish, len(prompt_ids),
                                       len(token_ids))


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str = "model") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device
        # One forward pass at a time: sequences interleave step by step, each with its own
        # cache, and CPU threads are not oversubscribed. Batching replaces this later.
        self._lock = threading.Lock()
        stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOS)}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stop.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.stop_token_ids = frozenset(
            t for t in stop if isinstance(t, int) and t != tokenizer.unk_token_id
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "cpu",
                 dtype: torch.dtype | None = None) -> Engine:
        """Load a local HF model directory that also holds its tokenizer."""
        from steelworks.train.models import load_model

        if dtype is None:  # bf16 where the hardware has it; CPU matmuls stay in fp32
            cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
            dtype = torch.bfloat16 if cuda_bf16 else torch.float32
        model = load_model(model_dir, dtype=dtype, device=device)
        return cls(model, load_tokenizer(model_dir), name=Path(model_dir).resolve().name)

    @property
    def max_context(self) -> int:
        # The tokenizer's model_max_length is a placeholder (1 << 20); positions are the limit.
        return int(self.model.config.max_position_embeddings)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Render ``[{"role", "content"}, ...]`` with the chat template, assistant turn opened."""
        if not messages:
            raise ValueError("messages must hold at least one message")
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] needs a string 'role' and a string 'content'")
        ids = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding here, 4.x a plain list.
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.max_context:
            raise PromptTooLongError(prompt_tokens, max_tokens, self.max_context)

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationStream:
        """Validate now (so callers can answer 400 before streaming), generate lazily."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in prompt):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        self.check_fits(len(prompt), params.max_tokens)
        return GenerationStream(self, prompt, params)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationResult:
        stream = self.stream(prompt_ids, params)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def _decode_loop(self, prompt_ids: list[int], params: SamplingParams,
                     cancel: threading.Event) -> Iterator[int]:
        """Prefill the prompt once, then feed back one token per step through the KV cache."""
        seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        input_ids = torch.tensor([prompt_ids], device=self.device)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            seen[input_ids[0]] = True
        past = None
        for _ in range(params.max_tokens):
            if cancel.is_set():
                return
            with self._lock, torch.inference_mode():
                out = self.model(input_ids=input_ids, past_key_values=past, use_cache=True,
                                 logits_to_keep=1)
                past = out.past_key_values
                tid = _pick(out.logits[0, -1].float(), params, seen, gen)
            if seen is not None:
                seen[tid] = True
            yield tid
            input_ids = torch.tensor([[tid]], device=self.device)


def _pick(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None,
          gen: torch.Generator) -> int:
    """Next token from last-position logits, in the order transformers applies processors."""
    if seen is not None:  # CTRL-style penalty, as transformers' RepetitionPenaltyLogitsProcessor
        penalised = torch.where(logits < 0, logits * p.repetition_penalty,
                                logits / p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if p.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if 0 < p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top one always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, -math.inf))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))
