"""Every field of OpenAI's chat and text completion requests, and what this server does with it.

Nothing a client sends is dropped: a field is honoured, accepted where it changes no output (what
happens to it is written here), or refused with 400 `unsupported_parameter` naming it, unless its
value asks for nothing this server lacks (`tools: []`, `n: 1`). `FIELDS` is the one list: the
README's table is rendered from it and tests check it against OpenAI's published request schemas.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from serve_app.ingress.generation_fields import MAX_N
from serve_app.ingress.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, OpenAIError

CHAT, COMPLETIONS = "chat", "completions"
BOTH = frozenset({CHAT, COMPLETIONS})


def _unset(value: Any) -> bool:
    return value is None


def _off(value: Any) -> bool:
    return value is None or value is False


def _empty(value: Any) -> bool:
    return value is None or value in ([], {}, "")


def _anything(_: Any) -> bool:
    return True


def _one_of(*allowed: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or value in allowed


def _one_prompt(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and len(value) == 1 and isinstance(value[0], str))


@dataclass(frozen=True)
class FieldRule:
    """What a request field gets: `honoured` values, and the `refused` ones (`allows` says which are fine)."""

    honoured: str
    refused: str = ""
    allows: Callable[[Any], bool] = _anything
    endpoints: frozenset[str] = BOTH


_TEXT_ONLY = "the model produces text only"
_DEPRECATED = "deprecated by OpenAI: use `tools`"

FIELDS: dict[str, FieldRule] = {
    "model": FieldRule("the served model's id (`/v1/models`)"),
    "messages": FieldRule("roles system, developer, user, assistant; text content (see below)",
                          "see the message rows below", endpoints=frozenset({CHAT})),
    "prompt": FieldRule("a string, or a list of one string", "several prompts; token-id prompts",
                        _one_prompt, frozenset({COMPLETIONS})),
    "max_tokens": FieldRule("caps the completion; unset: the model's `engine.default_max_tokens`; "
                            "a tenant's `max_tokens` clamps it (completions: 16 when unset, as OpenAI)"),
    "max_completion_tokens": FieldRule("as `max_tokens` (wins over it)", endpoints=frozenset({CHAT})),
    "temperature": FieldRule("0-2; 0 is greedy"),
    "top_p": FieldRule("nucleus sampling"),
    "stop": FieldRule("a string or up to 4; the stop text is not returned"),
    "seed": FieldRule("the same seed and parameters reproduce a sampled completion when the request runs alone "
                      "(see Reproducibility)"),
    "presence_penalty": FieldRule("-2 to 2, over the last 64 generated tokens"),
    "frequency_penalty": FieldRule("-2 to 2, over the last 64 generated tokens"),
    "stream": FieldRule("server-sent events, ending with `data: [DONE]`"),
    "stream_options": FieldRule("`include_usage`; `include_obfuscation: false`", "`include_obfuscation: true`",
                                lambda v: v is None or not v.include_obfuscation),
    "echo": FieldRule("the prompt precedes the completion", endpoints=frozenset({COMPLETIONS})),
    "n": FieldRule("1 to 8 choices of one prompt, prefilled once, each with its own tool calls (llama.cpp: at "
                   "most the replica's `engine.parallel`, else 400 naming `n`)", "more than 8",
                   lambda v: v is None or v <= MAX_N),
    "best_of": FieldRule("1", "any other value", _one_of(1), frozenset({COMPLETIONS})),
    "logprobs": FieldRule("chat: `true` returns each token's logprob; completions: 0-5 alternatives per token "
                          "(the model's distribution before bias, penalties, temperature and grammar)",
                          "with `echo` (completions): prompt tokens get no logprobs"),
    "top_logprobs": FieldRule("0-20 alternatives per token (needs `logprobs: true`)", endpoints=frozenset({CHAT})),
    "suffix": FieldRule("empty", "text after the insertion (fill-in-the-middle)", _empty, frozenset({COMPLETIONS})),
    "logit_bias": FieldRule("token id -> -100 to 100, added to the logit before sampling (llama.cpp: an id "
                            "outside the vocabulary is a 400 naming `logit_bias`)"),
    "response_format": FieldRule('`text`, `json_object`, `json_schema` (constrained decoding, see Structured '
                                 'output)', "a schema using keywords the grammar cannot enforce (llama.cpp)",
                                 _anything, frozenset({CHAT})),
    "tools": FieldRule("`function` tools: rendered by the model's chat template if it knows tools, else by a "
                       "generic prompt; vLLM: passed to vLLM (see Tool calls)",
                       "`custom` tools; any tools on a vLLM model without `vllm.tool_call_parser`",
                       endpoints=frozenset({CHAT})),
    "tool_choice": FieldRule('`"auto"`, `"none"`, `"required"`, a named function (the last two grammar-constrained); '
                             "streamed calls send their arguments in fragments", "`allowed_tools`, `custom`",
                             endpoints=frozenset({CHAT})),
    "parallel_tool_calls": FieldRule("`false`: at most one call; true/null: several (a named function: exactly one call)", endpoints=frozenset({CHAT})),
    "functions": FieldRule("`[]`", _DEPRECATED, _empty, frozenset({CHAT})),
    "function_call": FieldRule('`"none"`', _DEPRECATED, _one_of("none"), frozenset({CHAT})),
    "modalities": FieldRule('`["text"]`', f'`"audio"`: {_TEXT_ONLY}', lambda v: v is None or "audio" not in v,
                            frozenset({CHAT})),
    "audio": FieldRule("null", f"any value: {_TEXT_ONLY}", _unset, frozenset({CHAT})),
    "prediction": FieldRule("null", "predicted outputs", _unset, frozenset({CHAT})),
    "reasoning_effort": FieldRule("null", "any value: no reasoning models here", _unset, frozenset({CHAT})),
    "verbosity": FieldRule("null", "any value", _unset, frozenset({CHAT})),
    "web_search_options": FieldRule("null", "web search", _unset, frozenset({CHAT})),
    "moderation": FieldRule("null", "moderation", _unset, frozenset({CHAT})),
    "store": FieldRule("`false`", "`true`: this server stores no completions", _off, frozenset({CHAT})),
    "service_tier": FieldRule('`"auto"`, `"default"` (one tier here)', "`flex`, `scale`, `priority`, `fast`",
                              _one_of("auto", "default"), frozenset({CHAT})),
    "user": FieldRule("accepted: written to the audit line (SHA-256 prefix if it looks like an email)"),
    "safety_identifier": FieldRule("accepted: written to the audit line (as `user`)", endpoints=frozenset({CHAT})),
    "metadata": FieldRule("accepted, no effect: nothing is stored to tag", endpoints=frozenset({CHAT})),
    "prompt_cache_key": FieldRule("accepted, no effect: caching never changes output", endpoints=frozenset({CHAT})),
    "prompt_cache_retention": FieldRule("accepted, no effect (as `prompt_cache_key`)", endpoints=frozenset({CHAT})),
    "prompt_cache_options": FieldRule("accepted, no effect (as `prompt_cache_key`)", endpoints=frozenset({CHAT})),
}

# Fields beyond OpenAI's (as vLLM's server takes them).
EXTENSION_FIELDS: dict[str, FieldRule] = {
    "priority": FieldRule("an integer, default 0: among the caller's tenant's own requests waiting for a slot, "
                          "lower goes first (vLLM's meaning); tenants share slots by their policy `weight` whatever "
                          "it says"),
}

# Rows for the parts of a chat message (checked by `check_messages`).
MESSAGE_FIELDS: dict[str, FieldRule] = {
    "messages[].role": FieldRule("`system`, `developer` (as system), `user`, `assistant`, `tool` (a call's result)",
                                 f"`function`: {_DEPRECATED}"),
    "messages[].content": FieldRule("a string, or `text` parts (joined); null in an assistant turn with `tool_calls`",
                                    "`image_url`, `input_audio`, `file`, `refusal` parts; null elsewhere is a 400 "
                                    "`invalid_request`"),
    "messages[].name": FieldRule("null", "any name: chat templates cannot carry it"),
    "messages[].tool_calls": FieldRule("the calls an assistant turn made (rendered as the model would make them)"),
    "messages[].tool_call_id": FieldRule("required in a `tool` message: the call it answers"),
    "messages[].function_call": FieldRule("null", _DEPRECATED),
    "messages[].audio": FieldRule("null", _TEXT_ONLY),
    "messages[].refusal": FieldRule("null", "a refusal in an earlier assistant turn"),
}


def unsupported(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="unsupported_parameter")


def check_fields(body: ChatCompletionRequest | CompletionRequest) -> None:
    """Refuse the first field whose value asks for something this server cannot do."""
    endpoint = CHAT if isinstance(body, ChatCompletionRequest) else COMPLETIONS
    for name, rule in FIELDS.items():
        if endpoint in rule.endpoints and not rule.allows(getattr(body, name)):
            raise unsupported(name, f"'{name}' is not supported with this value ({rule.refused}).")
    if isinstance(body, ChatCompletionRequest):
        check_messages(body.messages)


def check_messages(messages: Iterable[ChatMessage]) -> None:
    """Refuse roles, parts and message fields the server cannot render into a prompt."""
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role == "function":
            raise unsupported(f"{where}.role", f"Role 'function' is not supported: {_DEPRECATED}.")
        if message.role == "tool" and not message.tool_call_id:
            raise OpenAIError(400, f"Missing tool_call_id in {where} (role tool).", param=f"{where}.tool_call_id",
                              code="invalid_request")
        for name in ("name", "function_call", "audio", "refusal"):
            if not _empty(getattr(message, name)):
                raise unsupported(f"{where}.{name}", f"'{name}' in a message is not supported "
                                                     f"({MESSAGE_FIELDS[f'messages[].{name}'].refused}).")
        if message.tool_calls and message.role != "assistant":
            raise OpenAIError(400, f"Only assistant messages carry tool_calls ({where} is {message.role}).",
                              param=f"{where}.tool_calls", code="invalid_request")
        if message.content is None and not message.tool_calls:
            raise OpenAIError(400, f"Missing content in {where} (role {message.role}).",
                              param=f"{where}.content", code="invalid_request")
        for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
            if part.type != "text":
                raise unsupported(f"{where}.content[{j}].type",
                                  f"Content parts of type '{part.type}' are not supported: {_TEXT_ONLY} from text.")
            if part.text is None:
                raise OpenAIError(400, f"Missing text in {where}.content[{j}].",
                                  param=f"{where}.content[{j}].text", code="invalid_request")


def audit_identifiers(body: BaseModel) -> dict[str, str]:
    """The caller's end-user ids for the audit line; ones that look like email addresses are hashed."""
    ids = {name: getattr(body, name, None) for name in ("user", "safety_identifier")}
    return {
        name: "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16] if "@" in value else value
        for name, value in ids.items()
        if isinstance(value, str) and value
    }


def markdown_table(rules: dict[str, FieldRule] | None = None) -> str:
    """A README table of request fields: by default FIELDS, EXTENSION_FIELDS and MESSAGE_FIELDS (chat and completions)."""
    rows = ["| field | honoured | refused (400 `unsupported_parameter`) |", "| --- | --- | --- |"]
    for name, rule in (rules or {**FIELDS, **EXTENSION_FIELDS, **MESSAGE_FIELDS}).items():
        where = "" if rule.endpoints == BOTH else f" ({', '.join(sorted(rule.endpoints))})"
        rows.append(f"| `{name}`{where} | {rule.honoured} | {rule.refused or '—'} |")
    return "\n".join(rows)
