"""The OpenAI request and response shapes (plus vLLM's sampling extras), as pydantic models.

Requests reject unknown fields, so a misspelt parameter is a 400 naming it rather than silently ignored.
`None` means "the default" for every optional field, as OpenAI clients send explicit nulls.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator
from pydantic_core import PydanticCustomError


def random_id(prefix: str) -> str:
    """An OpenAI-style object id such as `cmpl-…` or `chatcmpl-…`."""
    return f"{prefix}-{uuid.uuid4().hex}"


# Requests are strict: no "yes" for a boolean, no "4" for a number, no true for a token id.
_STRICT = ConfigDict(extra="forbid", strict=True)
_STRICT_ALIASED = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
MAX_STOP = 64  # stop strings (OpenAI allows 4)
MAX_TOKEN_LIST = 1024  # stop_token_ids, logit_bias entries
MAX_SEED = 2**64 - 1
# A repetition_penalty r divides positive logits by r: r near 0 (1e-36 at a low temperature, 1e-40 at any) makes
# float32 logits infinite and the draw fails. Under 0.01 a repeated token's logit is scaled by over 100 anyway.
MIN_REPETITION_PENALTY = 0.01
# llguidance's parser holds at most 2000 items in a row: a choice of 2000 strings compiled, then failed at the first
# token (a 500).
MAX_CHOICES = 1024
MAX_TOOLS = 128  # as OpenAI: each is a branch of the calls grammar of tool_choice "required"
# Arrays and objects in arrays and objects: what walks a request's JSON schema or tool parameters recurses, and
# 500 levels exhausted Python's stack (a 500); no real schema comes near this.
MAX_DEPTH = 100
_PROBLEMS = {"lone_surrogate": "not valid Unicode (a lone UTF-16 surrogate)",
             "too_deep": f"arrays and objects nested over {MAX_DEPTH} deep"}


class _Request(BaseModel):
    model_config = _STRICT

    @model_validator(mode="before")
    @classmethod
    def _valid_json(cls, data: Any) -> Any:
        """Refuse a string holding a lone UTF-16 surrogate (valid JSON, "\\ud800", but no text a tokenizer or
        a UTF-8 response can carry), and arrays or objects nested over MAX_DEPTH deep, naming where."""
        problem = json_problem(data)
        if problem is not None:
            kind, where = problem
            raise PydanticCustomError(kind, _PROBLEMS[kind], {"path": where})
        return data


def json_problem(value: Any) -> tuple[str, str] | None:
    """The first problem in a JSON value, as (kind, path): "lone_surrogate" where a string (or key) UTF-8 cannot
    encode is ("messages[0].content"), "too_deep" at the first array or object nested over MAX_DEPTH deep. The
    walk keeps its own stack, so however deep the value, it does not recurse."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "lone_surrogate", path
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            return "too_deep", path
        if isinstance(item, dict):
            for key, child in reversed(list(item.items())):  # popped in order, each key before its value
                at = f"{path}.{key}" if path else str(key)
                stack += [(child, at, depth + 1), (key, at, depth + 1)]
        else:
            for i in range(len(item) - 1, -1, -1):
                if isinstance(item[i], (str, dict, list)):  # not the numbers of a token id list
                    stack.append((item[i], f"{path}[{i}]", depth + 1))
    return None


class StreamOptions(_Request):
    """Options of a streamed response."""

    include_usage: bool | None = False


class JsonSchemaFormat(_Request):
    """`response_format.json_schema`: a named JSON schema (`strict` is accepted; outputs always follow it)."""

    model_config = _STRICT_ALIASED
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's `response_format`: text (no constraint), json_object (any JSON object) or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_Request):
    """vLLM's `structured_outputs` extra field: exactly one of json, json_object, regex, choice, grammar."""

    model_config = _STRICT_ALIASED
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: Annotated[list[str], Field(max_length=MAX_CHOICES)] | None = None
    grammar: str | None = None
    backend: str | None = None
    whitespace_flexible: bool | None = None


class SamplingRequest(_Request):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int | None = Field(1, ge=1, le=128)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY)
    seed: int | None = Field(None, ge=-(2**63), le=MAX_SEED)  # what a 64-bit generator takes
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_TOKEN_LIST)] | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = 0
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_TOKEN_LIST)] | None = None
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    prompt_logprobs: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    keep_alive: float | str | None = None  # Ollama's: how long the model stays loaded after this request
    logits_processors: Annotated[list[str | dict[str, Any]], Field(max_length=16)] | None = None  # by name (args)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


_NonEmptyText = Annotated[str, Field(min_length=1)]
_TokenIds = Annotated[list[int], Field(min_length=1)]


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: (_NonEmptyText | Annotated[list[_NonEmptyText], Field(min_length=1)]
             | Annotated[list[int], Field(min_length=1)] | Annotated[list[_TokenIds], Field(min_length=1)])
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Request):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    """A function call: the name and the arguments as JSON text."""

    model_config = _STRICT
    name: str
    arguments: str


class ToolCallItem(BaseModel):
    """One tool call of an assistant message."""

    model_config = _STRICT
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    """One message of a conversation: an assistant turn may carry tool calls instead of content, a tool turn
    the result of one (`tool_call_id`)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = None
    tool_call_id: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        """The message as chat templates expect it (developer messages are system messages; a tool call's
        arguments as an object, as HF templates render them)."""
        content = self.content if isinstance(self.content, str) or self.content is None else \
            "\n".join(p.text for p in self.content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": content if content is not None else ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in self.tool_calls]
        return message


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"messages: a tool call's arguments must be JSON text; got {text[:80]!r}") from exc


class FunctionDefinition(_Request):
    """A function the model may call: its name, description and parameters (a JSON schema)."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    """One entry of `tools`."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    """`tool_choice.function`."""

    name: str


class NamedToolChoice(_Request):
    """`tool_choice` naming one function the model must call."""

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True


class TokenizeRequest(_Request):
    """POST /tokenize: a prompt, or messages through the chat template."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "anyOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]


class Usage(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        """Usage with the total filled in."""
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs object."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    """One choice of a completion (or a chunk of one)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or token id, or why a constraint is cut
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionResponse(BaseModel):
    """A completion, or one streamed chunk of it (`object` is `text_completion` for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    """An alternative token at one position."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """The chosen token at one position and the most likely alternatives."""

    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    """Logprobs of a chat choice."""

    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    """The assistant's reply."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallItem] | None = None

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or token id, or why a constraint is cut


class ChatCompletionResponse(BaseModel):
    """A chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class _Sparse(BaseModel):
    """A streamed piece: fields left unset (None) are left out of the chunk."""

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunction(_Sparse):
    """A streamed piece of a function call: the name (once), then argument fragments."""

    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Sparse):
    """A streamed piece of tool call `index`: the id and type come with its first piece."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class Delta(_Sparse):
    """The increment of a streamed chat choice; unset fields are left out of the chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    """One choice of a streamed chat chunk."""

    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelActionRequest(_Request):
    """POST /v1/models/load and /v1/models/unload; with `adapter_path`, load registers an adapter (LoRA, soft
    prompt, prefix) named `model` on the server's model (unload then drops it)."""

    model: str
    keep_alive: float | str | None = None
    adapter_path: str | None = None


class EmbeddingRequest(_Request):
    """POST /v1/embeddings (OpenAI's shape; `truncate` cuts over-long inputs instead of refusing them)."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate: bool = False
    keep_alive: float | str | None = None


class ClassifyRequest(_Request):
    """POST /classify: label probabilities for one text or several."""

    model: str | None = None
    input: str | list[str]
    user: str | None = None
    truncate: bool = False
    keep_alive: float | str | None = None


# The shapes of the other endpoints' answers, for the OpenAPI document only (the routes build plain dicts);
# tests/server/test_fuzz.py checks every response against them.


class ModelCard(BaseModel):
    """A model as /v1/models lists it: OpenAI's fields plus its state, memory, last use and keep-alive."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int | None
    state: Literal["available", "loading", "loaded", "failed"]
    bytes_used: int
    last_used: float | None
    in_flight: int
    loads: int
    keep_alive: float
    error: str | None


class AdapterCard(BaseModel):
    """An adapter as /v1/models lists it: a model whose `parent` is the base model (state: in unload's answer)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    kind: str
    state: Literal["unloaded"] | None = None


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"]
    data: list[ModelCard | AdapterCard]


class PoolingUsage(BaseModel):
    """Token counts of an embedding or classification request."""

    prompt_tokens: int
    total_tokens: int


class Embedding(BaseModel):
    """One input's embedding: floats, or base64 of little-endian float32 bytes."""

    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    """POST /v1/embeddings."""

    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: PoolingUsage


class Classification(BaseModel):
    """One input's labels with their probabilities, and the likeliest."""

    index: int
    label: str
    probs: list[float]
    labels: list[str]
    num_classes: int


class ClassifyResponse(BaseModel):
    """POST /classify."""

    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[Classification]
    usage: PoolingUsage


class TokenizeResponse(BaseModel):
    """POST /tokenize."""

    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    """POST /detokenize."""

    prompt: str


class HealthResponse(BaseModel):
    """GET /health: "ok", "draining", or which engines stopped."""

    status: str


class VersionResponse(BaseModel):
    """GET /version: the tokenloom version and the CPU kernels' instruction-set levels."""

    version: str
    architecture: str
    cpu_isa: str
    supported: list[str]
    isa_in_use: str
    kernels: bool
