"""The OpenAI-compatible server's API shapes: its error (``ApiError``, OpenAI's error body), the request
bodies as pydantic models with vLLM's field names, their validation (the first error becomes one 400
naming the field), and the translation of a chat body into the engine's (ChatRequest, SamplingParams)."""

from __future__ import annotations

import json
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from automem_jax.agent.types import ROLE_POLICY, ChatRequest


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# Request bodies: pydantic models with vLLM's field names; their errors become OpenAI's 400s

Role = Literal["system", "user", "assistant"]
_ROLES = get_args(Role)
# Fields whose non-default values would change the answer in ways this server does not implement:
# reject them rather than silently ignore them.
_UNSUPPORTED = {
    "tools": lambda v: bool(v), "tool_choice": lambda v: v not in (None, "none"),
    "functions": lambda v: bool(v), "function_call": lambda v: v not in (None, "none"),
    "logprobs": lambda v: bool(v), "top_logprobs": lambda v: v not in (None, 0),
    "logit_bias": lambda v: bool(v), "presence_penalty": lambda v: v not in (None, 0),
    "frequency_penalty": lambda v: v not in (None, 0),
    "response_format": lambda v: v not in (None, {"type": "text"}),
}
_OWN_CODES = ("unsupported", "invalid_value")  # error types our validators raise, with their own message


class _Body(BaseModel):
    # Unknown fields are ignored, as vLLM does; JSON values are not coerced ("8" is no integer,
    # true is no number).
    model_config = ConfigDict(extra="ignore", strict=True)


class ChatMessage(_Body):
    role: Role
    content: str  # content-part arrays and null content are not supported


class StreamOptions(_Body):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM's per-chunk usage

    @field_validator("continuous_usage_stats")
    @classmethod
    def _no_continuous_usage(cls, v):
        if v:
            raise PydanticCustomError("unsupported", "'stream_options.continuous_usage_stats' is not supported "
                                                     "by this server")
        return v


class ChatCompletionRequest(_Body):
    """The ``/v1/chat/completions`` body. Fields are validated in this order (the first error is
    answered). top_k, repetition_penalty and include_stop_str_in_output are vLLM's extensions."""
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    # Refused when set (see _UNSUPPORTED); any JSON value, so that setting one is never a type error.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    response_format: Any = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=1 << 30)  # -1 or 0 = off
    repetition_penalty: float | None = Field(None, gt=0, le=1_000_000)
    max_tokens: int | None = Field(None, ge=1, le=1 << 30)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 30)  # OpenAI's newer name; max_tokens wins
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 63) - 1)
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, v, info):
        if v is not None and not info.data.get("stream"):
            raise PydanticCustomError("invalid_value", "'stream_options' is only allowed when 'stream' is true")
        return v

    @field_validator("n")
    @classmethod
    def _only_one(cls, v):
        if v not in (None, 1):
            raise PydanticCustomError("unsupported", f"only n=1 is supported, got n={v}")
        return v

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v, info):
        if _UNSUPPORTED[info.field_name](v):
            raise PydanticCustomError("unsupported", f"'{info.field_name}' is not supported by this server")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):  # one message for every malformed stop (pydantic's would name union branches)
        s = [v] if isinstance(v, str) else v
        if v is not None and not (isinstance(s, list) and len(s) <= 16 and all(isinstance(x, str) and x for x in s)):
            raise PydanticCustomError("invalid_value", "'stop' must be a non-empty string or a list of at most 16 "
                                                       "non-empty strings")
        return v


class LoadLoRAAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's; names identify adapters here


_TYPE_NAMES = {"int_type": "an integer", "float_type": "a number", "bool_type": "a boolean",
               "string_type": "a string", "dict_type": "an object", "model_type": "an object", "list_type": "a list"}
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _param(loc) -> str | None:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None


def _show(v) -> str:
    s = json.dumps(v, default=repr)
    return s if len(s) <= 60 else s[:57] + "..."


def _api_error(err: dict, model_cls) -> ApiError:
    """OpenAI's 400 for one pydantic error: `param` is its location (``messages[0].role``), `code`
    one of invalid_type / out_of_range / missing / ours; messages name the value or the range."""
    loc, kind, v = err["loc"], err["type"], err.get("input")
    param = _param(loc)
    if kind in _OWN_CODES:
        return bad_request(err["msg"], param, kind)
    if loc[0] == "messages":
        where = _param(loc[:2])
        if len(loc) == 1:
            return bad_request("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages",
                               "missing_messages" if kind == "missing" or v is None else "invalid_messages")
        if len(loc) == 2:
            return bad_request(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        v = None if kind == "missing" else v
        if loc[2] == "role":
            return bad_request(f"{where}.role must be one of {', '.join(_ROLES)}; got {_show(v)}", param,
                               "invalid_role")
        return bad_request(f"{where}.content must be a string (content-part arrays and null content are not "
                           f"supported); got {'null' if v is None else type(v).__name__}", param, "invalid_content")
    if kind == "missing":
        return bad_request(f"'{param}' is required", param, "missing")
    if kind in _TYPE_NAMES:
        return bad_request(f"'{param}' must be {_TYPE_NAMES[kind]}, got {_show(v)}", param, "invalid_type")
    field = model_cls.model_fields.get(loc[0]) if len(loc) == 1 else None
    if kind in _RANGE_ERRORS and field is not None:  # both bounds, from the field's constraints
        rng = " and ".join(f"{op} {b:g}" if isinstance(b, float) else f"{op} {b}" for m in field.metadata
                           for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
                           if (b := getattr(m, k, None)) is not None)
        return bad_request(f"'{param}' must be {rng}, got {v}", param, "out_of_range")
    return bad_request(f"'{param}': {err['msg']}" if param else err["msg"], param, "invalid_value")


def validate_body(model_cls, body: Any):
    """A pydantic model from a JSON body; its first error becomes one OpenAI 400 naming the field."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        raise _api_error(e.errors(include_url=False)[0], model_cls) from None


def stream_settings(body: dict | ChatCompletionRequest) -> tuple[bool, bool]:
    """(stream, include_usage) of a chat body; raises ApiError for a malformed body."""
    r = body if isinstance(body, ChatCompletionRequest) else validate_body(ChatCompletionRequest, body)
    return bool(r.stream), bool(r.stream and r.stream_options and r.stream_options.include_usage)


def chat_request(r: ChatCompletionRequest, served_names: tuple[str, ...], max_len: int):
    """(ChatRequest, SamplingParams) of a validated body; ApiError 404 for a model not served."""
    from automem_jax.llm.sampling import SamplingParams
    if r.model and r.model not in served_names:
        raise ApiError(404, f"The model '{r.model}' does not exist; this server serves: {', '.join(served_names)}",
                       "model", "model_not_found")
    max_tokens = r.max_tokens if r.max_tokens is not None else r.max_completion_tokens
    stop = ([r.stop] if isinstance(r.stop, str) else r.stop) or None
    # top_p / top_k / repetition_penalty left out stay unset: the engine applies the checkpoint's
    # generation_config.json defaults (as vLLM does).
    given = {"top_p": r.top_p, "top_k": None if r.top_k is None else max(r.top_k, 0),
             "repetition_penalty": r.repetition_penalty}
    params = SamplingParams(
        temperature=1.0 if r.temperature is None else r.temperature,
        # Longer than the cache allows is not an error: the engine stops at its limit ("length").
        max_tokens=max_len if max_tokens is None else max_tokens,
        stop=stop, seed=r.seed, include_stop_str_in_output=r.include_stop_str_in_output,
        **{k: v for k, v in given.items() if v is not None})
    req = ChatRequest(messages=[m.model_dump() for m in r.messages], phase="chat", model_role=ROLE_POLICY,
                      stop=stop, max_tokens=params.max_tokens)
    return req, params


def parse_chat_body(body: Any, served_names: tuple[str, ...], max_len: int):
    """Validates a chat-completions body (``ChatCompletionRequest``); returns (ChatRequest,
    SamplingParams) or raises ApiError. Streaming fields are read with `stream_settings`."""
    return chat_request(validate_body(ChatCompletionRequest, body), served_names, max_len)
