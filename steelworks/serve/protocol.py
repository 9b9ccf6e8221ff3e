"""The OpenAI request bodies the app accepts, and its error type.

Unknown fields are ignored (clients send many optional ones); fields that would change the
response's shape and are not implemented (n > 1; logprobs on chat) are rejected instead.
Every error, whatever raised it, leaves as OpenAI's body
``{"error": {"message", "type", "param", "code"}}`` (``APIError.response``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from steelworks.inference.sampling import INT64_MAX, INT64_MIN, REPETITION_PENALTY_RANGE


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


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # optional, as in vLLM; when given it must name the served model
    # Integers stay within int64, as vLLM's protocol bounds them: engines hold them in
    # torch.long tensors or msgpack ints (2**70 was a 500 from torch's manual_seed).
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default and range
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=INT64_MAX)  # vLLM-style extensions
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_RANGE[0],
                                      le=REPETITION_PENALTY_RANGE[1])
    stop: StopText | list[StopText] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
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


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Literal[False, None] = None
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)  # newer name for max_tokens


# Most prompts one completions request may carry. vLLM takes any number; we bound it because
# the prompts of a request enter the engine together or not at all (so a 503 never leaves part
# of a request running), so more than the engine holds at once (batch rows + queue places,
# which lowers this cap per engine) could never be admitted and would get 503 forever, and
# because every prompt is tokenized and held from the start. Clients batch far fewer
# (lm-eval's batch_size is typically 1-64).
MAX_PROMPTS = 2048


def _check_prompt_shape(value: Any) -> Any:
    """``prompt`` must take one of its four forms (vLLM's and OpenAI's): a string, a list of
    strings, a list of token ids, or a list of token-id lists, none of them empty and no id
    negative. Say which rule a value breaks and where: pydantic's own union error reports the
    first alternative's complaint ("Input should be a valid string") whatever was sent. The
    annotation below states the same rules in the OpenAPI schema."""

    def is_id(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def kind(v: Any) -> str | None:
        if isinstance(v, str):
            return "strings"
        if is_id(v):
            return "token ids"
        if isinstance(v, list) and all(is_id(t) for t in v):
            return "token-id lists"
        return None

    if isinstance(value, str):
        if not value:
            raise PydanticCustomError("prompt_empty", "the prompt is empty")
        return value
    if not isinstance(value, list):
        raise PydanticCustomError("prompt_type", "expected a string, a list of strings, a list "
                                  "of token ids or a list of token-id lists")
    if not value:
        raise PydanticCustomError("prompt_empty", "the list of prompts is empty")
    kinds = [kind(v) for v in value]
    if None in kinds:
        raise PydanticCustomError("prompt_type", f"prompt[{kinds.index(None)}] is neither a "
                                  "string, a token id (an integer) nor a list of token ids")
    if len(set(kinds)) > 1:
        raise PydanticCustomError("prompt_mixed", "a list of prompts must not mix strings, "
                                  "token ids and token-id lists; this one mixes "
                                  + " and ".join(sorted(set(kinds))))  # type: ignore[arg-type]
    if kinds[0] == "token ids":
        value = [value]  # one prompt; checked below as the only entry of a list of prompts
    for i, v in enumerate(value):
        where = "the prompt" if len(value) == 1 else f"prompt[{i}]"
        if not v:
            raise PydanticCustomError("prompt_empty", f"{where} is empty")
        if not isinstance(v, str) and min(v) < 0:
            raise PydanticCustomError("prompt_token", f"{where} holds a negative token id")
    return value[0] if kinds[0] == "token ids" else value


_Text = Annotated[str, Field(min_length=1)]
_Ids = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
PromptInput = Annotated[_Text | Annotated[list[_Text], Field(min_length=1)] | _Ids
                        | Annotated[list[_Ids], Field(min_length=1)],
                        BeforeValidator(_check_prompt_shape)]


def split_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """One entry per prompt: a string, or one prompt's token ids."""
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


class CompletionRequest(SamplingRequest):
    # A text, token ids, or a list of either: one choice per prompt, in order (as vLLM).
    prompt: PromptInput
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only (lm-eval)
    # Legacy completions logprobs: how many alternatives per position (0: the chosen only).
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False  # prepend the prompt to the text (and its logprobs)



def validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return APIError(400, f"{param or 'body'}: {err.get('msg', 'invalid value')}", param=param,
                    code="invalid_value")


