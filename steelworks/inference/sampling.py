"""Sampling: what a request may ask for (``SamplingParams``, validated the way vLLM and
OpenAI bound each field) and how one row's next token is picked from its logits.

Both engines take ``SamplingParams``: the built-in one samples with ``pick_token`` in its
scheduler thread, vLLM translates them to its own. Evals ask for greedy decoding through the
same type.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

# Top alternatives per token, as OpenAI caps chat's top_logprobs (vLLM's default max_logprobs).
MAX_LOGPROBS = 20
# Stop strings per request: vLLM's cap (envs.VLLM_MAX_STOP_STRINGS, default 4), which is also
# OpenAI's documented "up to 4 sequences".
MAX_STOP_STRINGS = 4
# Characters per stop string. vLLM caps only the count; we also cap the length because the
# stream holds back and re-checks every prefix of every stop string that the tail of the text
# could begin (_TextAssembler._release), so a long stop string costs per token in the
# consumer's thread (the event loop, for HTTP). Real stop strings are delimiters ("\n\n",
# "Question:", "</answer>", a chat end tag), a few to a few dozen characters; 256 leaves ample
# room and keeps a request's worst case (4 x 256) well under a millisecond per token.
MAX_STOP_LENGTH = 256
# Integers an engine may have to hold in a torch.long / msgpack int64 (seed, top_k,
# max_tokens); vLLM's OpenAI protocol bounds seed the same way (_INT64_MIN/_INT64_MAX).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Below this a temperature means greedy decoding (vLLM's _SAMPLING_EPS): dividing logits by
# 1e-320 (0 in fp32) would turn them into inf and the distribution into NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5
# transformers and vLLM accept any repetition penalty > 0, but one that is 0 in fp32 (1e-320)
# divides by zero and very large ones overflow fp32 logits (together with a small
# temperature), both NaN distributions. Useful values lie around 1.0-1.5; this range keeps
# logits finite: |logit| * 100 / 1e-5 stays far below fp32's 3.4e38.
REPETITION_PENALTY_RANGE = (0.01, 100.0)

FinishReason = Literal["stop", "length", "cancelled"]


class InvalidTextError(ValueError):
    """Text that is not valid Unicode: a lone UTF-16 surrogate, which JSON's ``\\ud800``
    escape can carry but no tokenizer can encode (they raise a TypeError deep inside).
    ``param`` names the request field, for the HTTP layer's 400."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str, param: str) -> None:
    if (m := _SURROGATE.search(text)) is not None:
        raise InvalidTextError(f"{param} is not valid Unicode: a lone surrogate "
                               f"U+{ord(m.group()):04X} at character {m.start()}", param)


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
    logprobs: int | None = None  # record each token's logprob and this many top alternatives
    ignore_eos: bool = False  # keep going past stop tokens (benchmarks, as vLLM's ignore_eos)

    def __post_init__(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        # Messages start with the field's name: the HTTP layer reports it as the error's param.
        if not is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT64_MAX:
            raise ValueError(f"max_tokens must be an integer in [1, 2**63 - 1], got {self.max_tokens!r}")
        if not is_num(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.temperature < GREEDY_BELOW_TEMPERATURE:  # frozen: set through object
            object.__setattr__(self, "temperature", 0.0)
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or not 0 <= self.top_k <= INT64_MAX:
            raise ValueError(f"top_k must be an integer in [0, 2**63 - 1] (0 disables it), "
                             f"got {self.top_k!r}")
        low, high = REPETITION_PENALTY_RANGE
        if not is_num(self.repetition_penalty) or not low <= self.repetition_penalty <= high:
            raise ValueError(f"repetition_penalty must be a number in [{low}, {high}], "
                             f"got {self.repetition_penalty!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must hold at most {MAX_STOP_STRINGS} strings, "
                             f"got {len(self.stop)}")
        if any(len(s) > MAX_STOP_LENGTH for s in self.stop):  # not echoed: it may be huge
            raise ValueError(f"stop strings must be at most {MAX_STOP_LENGTH} characters long, "
                             f"got one of {max(len(s) for s in self.stop)}")
        if self.seed is not None and not (is_int(self.seed) and INT64_MIN <= self.seed <= INT64_MAX):
            raise ValueError(f"seed must be an integer in [-2**63, 2**63 - 1] or None, "
                             f"got {self.seed!r}")
        if self.logprobs is not None and not (is_int(self.logprobs)
                                              and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, "
                             f"got {self.logprobs!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")


def pick_token(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None,
          gen: torch.Generator) -> torch.Tensor:
    """Next token (0-d tensor) from one row's last logits, in the order transformers applies
    its processors: repetition penalty, temperature, top-k, top-p."""
    if seen is not None:  # CTRL-style penalty, as transformers' RepetitionPenaltyLogitsProcessor
        penalised = torch.where(logits < 0, logits * p.repetition_penalty,
                                logits / p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if p.temperature == 0:
        return torch.argmax(logits)
    logits = logits / p.temperature
    if 0 < p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top one always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        # Explicitly: a top_p below fp32's smallest value (5e-324) compares as 0 >= 0 and would
        # drop every token, leaving a NaN distribution.
        drop[0] = False
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, -math.inf))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[0]
