"""OpenAI request -> engine input: prompts tokenized, lengths checked, SamplingParams built.

Pure apart from calling the server's tokenizer. Every refusal is an `APIError` whose fields become
OpenAI's `{"error": {...}}` body, raised before anything reaches the engine: a request the engine
would reject later (or, worse, run with a silently different meaning) costs the client a 400 here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

from lmforge.runtime import openai_protocol as proto
from lmforge.runtime.engine.guided import grammar_for
from lmforge.runtime.sampling_params import SamplingParams, StructuredOutputsParams

_UNION_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list"})
_MAX_VALIDATION_MESSAGES = 5  # a bad request lists at most this many fields


class APIError(Exception):
    """A request refused with an OpenAI error body; `code` defaults to the HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: int | str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code = status if code is None else code

    def body(self) -> proto.ErrorResponse:
        return proto.ErrorResponse(
            error=proto.ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        )


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


@dataclasses.dataclass(frozen=True, slots=True)
class ModelContext:
    """The loaded model as request preparation sees it (set once the model and tokenizer load)."""

    tokenizer: Any  # the server's own transformers tokenizer (the engine's stays on its thread)
    max_model_len: int  # prompt + completion tokens
    vocab_size: int  # valid token ids are [0, vocab_size)
    tool_call_parser: str | None = None  # --tool-call-parser
    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice
    task: str = "generate"  # --task: "generate" or "embed"
    hidden_size: int = 0  # the embeddings' width (task "embed")


@dataclasses.dataclass(frozen=True, slots=True)
class ToolMode:
    """How a chat request's output becomes tool calls. choice: "none" (plain text), "auto" (the
    model decides; `parser` reads its format), "required" / "named" (a grammar forces the calls)."""

    choice: str
    parser: str | None = None  # tool_parsers name: the --tool-call-parser, "required" or "named"
    function_name: str | None = None  # "named": the function
    parallel: bool = True  # parallel_tool_calls: false keeps at most one call


@dataclasses.dataclass(slots=True)
class Prepared:
    """A validated request: token ids per prompt and the engine parameters."""

    prompt_ids: list[list[int]]
    prompt_texts: list[str]  # per prompt, what `echo` puts before the completion ("" without echo)
    params: SamplingParams
    model: str  # the served model name responses report
    echo_only: bool = False  # completions echo + max_tokens=0: responses drop the one generated token
    tool_mode: ToolMode = ToolMode("none")


# --- pydantic validation errors --------------------------------------------------------------------


def param_from_loc(loc: Iterable[Any]) -> str:
    """A pydantic error location as an OpenAI `param`: 'messages.0.role'; 'body' and union branch
    tags ('str', 'list[constrained-int]') left out, since clients know the field, not our types."""
    parts: list[str] = []
    for part in loc:
        if part == "body" and not parts:
            continue
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part):
            break
        parts.append(str(part))
    return ".".join(parts)


def validation_error(errors: list[Mapping[str, Any]]) -> APIError:
    """FastAPI's RequestValidationError list as one 400. A union field fails once per branch, so each
    param is reported once, with its first message; `param` is the first failing field."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return bad_request(f"Malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
    seen: dict[str, str] = {}  # param -> first message
    for e in errors:
        seen.setdefault(param_from_loc(e.get("loc", ())), str(e.get("msg")).removeprefix("Value error, "))
    message = "; ".join(
        f"{param or 'body'}: {msg}" for param, msg in list(seen.items())[:_MAX_VALIDATION_MESSAGES]
    )
    return bad_request(message, next(iter(seen), None) or None)


# --- prompts ---------------------------------------------------------------------------------------


def encode(tokenizer: Any, text: str, add_special_tokens: bool, param: str) -> list[int]:
    try:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except Exception as exc:  # e.g. lone UTF-16 surrogates from a JSON "\ud83d" escape
        raise bad_request(f"the text could not be tokenized: {exc}", param) from None


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """Token-id prompts skip the tokenizer, so an id past the embedding table is caught here."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is out of range [0, {vocab_size})", param)


def template_message(m: proto.ChatMessage) -> dict[str, Any]:
    """A message as HF chat templates read it: tool calls with their arguments as a dict (Llama's
    and Qwen's templates `tojson` them), tool results with their tool_call_id."""
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)},
            }
            for c in m.tool_calls
        ]
    return out


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def chat_ids(
    tokenizer: Any,
    messages: list[proto.ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool,
    template_kwargs: dict | None,
    tools: list[proto.ChatTool] | None = None,
) -> list[int]:
    """The conversation (and the tools, for templates that render them) through the model's chat
    template, then tokenized without special tokens (the template already wrote them)."""
    try:
        conversation = [template_message(m) for m in messages]
        kwargs: dict[str, Any] = dict(template_kwargs or {})
        if continue_final_message:
            kwargs["continue_final_message"] = True
        if tools:
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in tools]
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from None
    except Exception as exc:  # jinja2 TemplateError and friends: the template rejected the conversation
        raise bad_request(f"chat template failed: {exc}", "messages") from None
    return encode(tokenizer, text, False, "messages")


# --- limits and sampling ---------------------------------------------------------------------------


def check_prompt_len(max_model_len: int, num_prompt: int, param: str, min_room: int) -> None:
    """A non-empty prompt leaving at least `min_room` tokens of the context window."""
    if num_prompt == 0:
        raise bad_request("The prompt is empty.", param)
    if max_model_len - num_prompt < min_room:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, "
            f"but the prompt is {num_prompt} tokens. Please shorten it.",
            param,
        )


def resolve_max_tokens(
    max_model_len: int, num_prompt: int, requested: int | None, explicit: bool, param: str
) -> int:
    """The completion budget: what was asked for, or the rest of the context window. Only an
    explicit `max_tokens` that does not fit is an error; the default is quietly capped (as OpenAI)."""
    check_prompt_len(max_model_len, num_prompt, param, min_room=1)
    room = max_model_len - num_prompt
    if requested is None:
        return room
    if requested > room and explicit:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt + requested} tokens ({num_prompt} in the prompt, {requested} for the completion). "
            "Please reduce the length of the prompt or the completion.",
            "max_tokens",
        )
    return min(requested, room)


def sampling_params(
    req: proto.SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    constraint: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """OpenAI/vLLM request fields as engine parameters; `max_tokens` is already resolved against the
    context window. A combination SamplingParams rejects becomes a 400, not a 500."""
    top_k = req.top_k if req.top_k not in (None, 0) else -1  # vLLM: 0 and -1 both disable
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k,
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=None if req.seed is None else req.seed % proto.INT64,  # folded into [0, 2**63)
            max_tokens=max_tokens,
            min_tokens=min(req.min_tokens, max_tokens),
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            structured_outputs=constraint,
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from None


# --- structured outputs and tools -----------------------------------------------------------------

_GUIDED_BACKENDS = ("auto", "guidance", "llguidance")


def structured_outputs(req: proto.SamplingFields) -> StructuredOutputsParams | None:
    """The one output constraint a request asks for (response_format, structured_outputs or a
    guided_* field), checked with the grammar library now so that a bad schema is a 400 naming
    its field. Asking for two is a 400, never a silent pick."""
    _refuse_unserved_guided_fields(req)
    asked = [
        *_from_response_format(req.response_format),
        *_from_structured_outputs(req.structured_outputs),
        *_from_guided_fields(req),
    ]
    found = [(param, _constraint(param, kwargs)) for param, kwargs in asked]
    if not found:
        return None
    if len(found) > 1:
        raise bad_request(f"give one output constraint, not {' and '.join(p for p, _ in found)}", found[1][0])
    param, spec = found[0]
    check_constraint(spec, param)
    return spec


# (request field, StructuredOutputsParams keyword arguments) of each constraint a request sets
_Asked = list[tuple[str, dict[str, Any]]]


def _refuse_unserved_guided_fields(req: proto.SamplingFields) -> None:
    for name in ("guided_whitespace_pattern", "structural_tag"):
        if getattr(req, name) is not None:
            raise bad_request(f"{name} is not supported", name)
    if req.guided_decoding_backend not in (None, *_GUIDED_BACKENDS):
        raise bad_request(
            f"guided_decoding_backend {req.guided_decoding_backend!r} is not served; this server "
            f"uses llguidance ({', '.join(_GUIDED_BACKENDS)})",
            "guided_decoding_backend",
        )


def _constraint(param: str, kwargs: dict[str, Any]) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kwargs)
    except ValueError as exc:
        raise bad_request(str(exc), param) from None


def _from_response_format(fmt: proto.ResponseFormat | None) -> _Asked:
    if fmt is not None and fmt.type == "json_object":
        return [("response_format", {"json_object": True})]
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request(
                "response_format json_schema needs json_schema.schema", "response_format.json_schema"
            )
        return [("response_format.json_schema.schema", {"json": json.dumps(fmt.json_schema.schema_)})]
    return []


def _from_structured_outputs(so: proto.StructuredOutputsRequest | None) -> _Asked:
    if so is None:
        return []
    schema = so.json_ if so.json_ is None or isinstance(so.json_, str) else json.dumps(so.json_)
    kwargs = {
        "json": schema,
        "regex": so.regex,
        "choice": tuple(so.choice) if so.choice is not None else None,
        "grammar": so.grammar,
        "json_object": bool(so.json_object),
    }
    return [("structured_outputs", kwargs)]


def _from_guided_fields(req: proto.SamplingFields) -> _Asked:
    asked: _Asked = []
    if req.guided_json is not None:
        schema = req.guided_json if isinstance(req.guided_json, str) else json.dumps(req.guided_json)
        asked.append(("guided_json", {"json": schema}))
    if req.guided_regex is not None:
        asked.append(("guided_regex", {"regex": req.guided_regex}))
    if req.guided_choice is not None:
        asked.append(("guided_choice", {"choice": tuple(req.guided_choice)}))
    if req.guided_grammar is not None:
        asked.append(("guided_grammar", {"grammar": req.guided_grammar}))
    return asked


def check_constraint(spec: StructuredOutputsParams, param: str) -> None:
    try:
        grammar_for(spec)
    except ValueError as exc:
        raise bad_request(str(exc), param) from None


def tool_mode(req: proto.ChatCompletionRequest, context: ModelContext) -> ToolMode:
    """tool_choice as vLLM serves it: "auto" needs --enable-auto-tool-choice and a parser;
    "required" and a named function are forced with a grammar (`tool_constraint`)."""
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
    parallel = req.parallel_tool_calls is not False
    if choice == "none":
        return ToolMode("none")
    if not req.tools:
        raise bad_request(f"tool_choice {_choice_name(choice)} needs tools", "tool_choice")
    names = [t.function.name for t in req.tools]
    if len(set(names)) != len(names):
        raise bad_request("tool function names must be unique", "tools")
    for i, tool in enumerate(req.tools):
        if tool.function.parameters is not None:
            check_constraint(
                StructuredOutputsParams(json=json.dumps(tool.function.parameters)),
                f"tools.{i}.function.parameters",
            )
    if choice == "auto":
        if not (context.enable_auto_tool_choice and context.tool_call_parser):
            raise bad_request(
                '"auto" tool choice requires the server to run with --enable-auto-tool-choice and '
                "--tool-call-parser",
                "tool_choice",
            )
        return ToolMode("auto", context.tool_call_parser, parallel=parallel)
    if choice == "required":
        return ToolMode("required", "required", parallel=parallel)
    if choice.function.name not in names:
        raise bad_request(
            f"tool_choice names function {choice.function.name!r}, which is not in tools", "tool_choice"
        )
    return ToolMode("named", "named", choice.function.name)


def _choice_name(choice: Any) -> str:
    return repr(choice) if isinstance(choice, str) else f"function {choice.function.name!r}"


def _parameters(tool: proto.ChatTool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else {"type": "object"}


def tool_constraint(mode: ToolMode, tools: list[proto.ChatTool]) -> StructuredOutputsParams | None:
    """The grammar of a forced tool choice: the named function's arguments, or for "required" a
    non-empty array of {name, parameters} whose parameters match that function's schema."""
    if mode.choice == "named":
        tool = next(t for t in tools if t.function.name == mode.function_name)
        return StructuredOutputsParams(json=json.dumps(_parameters(tool)))
    if mode.choice != "required":
        return None
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "parameters": _parameters(t)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    array = {
        "type": "array",
        "minItems": 1,
        "items": {"anyOf": calls},
        **({} if mode.parallel else {"maxItems": 1}),
    }
    return StructuredOutputsParams(json=json.dumps(array))


# --- whole requests --------------------------------------------------------------------------------


def prepare_completion(req: proto.CompletionRequest, context: ModelContext, model: str) -> Prepared:
    """Every prompt is tokenized and checked; one max_tokens (the tightest) serves them all."""
    ids_list, texts = [], []
    for prompt in req.prompts():
        if isinstance(prompt, str):
            ids, text = encode(context.tokenizer, prompt, True, "prompt"), prompt
        else:
            check_token_ids(prompt, context.vocab_size, "prompt")
            ids, text = prompt, context.tokenizer.decode(prompt) if req.echo else ""
        ids_list.append(ids)
        texts.append(text)
    if req.max_tokens == 0:
        if not req.echo:
            raise bad_request(
                "max_tokens must be at least 1 (0 is allowed only with echo: the prompt alone)", "max_tokens"
            )
        for ids in ids_list:  # the one step vLLM runs anyway fits even a prompt of max_model_len tokens
            check_prompt_len(context.max_model_len, len(ids), "prompt", min_room=0)
        max_tokens = 1
    else:
        explicit = "max_tokens" in req.model_fields_set
        max_tokens = min(
            resolve_max_tokens(context.max_model_len, len(ids), req.max_tokens, explicit, "prompt")
            for ids in ids_list
        )
    params = sampling_params(
        req, max_tokens, req.logprobs, req.num_prompt_logprobs(), structured_outputs(req)
    )
    return Prepared(ids_list, texts, params, model, echo_only=req.echo_only)


def prepare_embedding(req: proto.EmbeddingRequest, context: ModelContext, model: str) -> Prepared:
    """Every input tokenized (with the tokenizer's special tokens) and fitting the context window."""
    if context.task != "embed":
        raise bad_request(
            "This server generates text: start it with --task embed to serve embeddings.", "model"
        )
    if req.dimensions is not None and req.dimensions != context.hidden_size:
        raise bad_request(
            f"dimensions={req.dimensions} is not supported: this model's embeddings have "
            f"{context.hidden_size} dimensions",
            "dimensions",
        )
    if isinstance(req.input, list) and not req.input:
        raise bad_request("input must not be empty", "input")
    ids_list = []
    for item in req.inputs():
        if isinstance(item, str):
            ids = encode(context.tokenizer, item, True, "input")
        else:
            check_token_ids(item, context.vocab_size, "input")
            ids = item
        check_prompt_len(context.max_model_len, len(ids), "input", min_room=0)
        ids_list.append(ids)
    params = SamplingParams(max_tokens=1, detokenize=False, temperature=0.0)
    return Prepared(ids_list, [""] * len(ids_list), params, model)


UNSUPPORTED_CHAT_FIELDS = {
    "functions": "the legacy functions field is not supported: send tools",
    "function_call": "the legacy function_call field is not supported: send tool_choice",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}


def prepare_chat(req: proto.ChatCompletionRequest, context: ModelContext, model: str) -> Prepared:
    for name, why in UNSUPPORTED_CHAT_FIELDS.items():
        if getattr(req, name) is not None:
            raise bad_request(why, name)
    constraint = structured_outputs(req)
    mode = tool_mode(req, context)
    forced = tool_constraint(mode, req.tools or [])
    if forced is not None and constraint is not None:
        raise bad_request(
            f"tool_choice {_choice_name(req.tool_choice)} cannot be combined with another output "
            "constraint (response_format / structured_outputs / guided_*)",
            "tool_choice",
        )
    ids = chat_ids(
        context.tokenizer,
        req.messages,
        req.add_generation_prompt,
        req.continue_final_message,
        req.chat_template_kwargs,
        req.tools,
    )
    requested = req.requested_max_tokens()
    max_tokens = resolve_max_tokens(
        context.max_model_len, len(ids), requested, requested is not None, "messages"
    )
    params = sampling_params(req, max_tokens, req.num_logprobs(), req.prompt_logprobs, forced or constraint)
    if mode.choice == "auto" and mode.parser in ("mistral", "llama3_json"):
        params.skip_special_tokens = (
            False  # [TOOL_CALLS] / <|python_tag|> are special tokens the parser reads
        )
    return Prepared([ids], [""], params, model, tool_mode=mode)
