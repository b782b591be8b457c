"""The request fields that shape generation beyond plain sampling: response_format, logit_bias, logprobs, n.

Their values are checked here (a malformed one is a 400 `invalid_request` naming it) and go to the engine
in `SamplingParams`. What only the engine can judge it refuses by name itself: a token id outside its
vocabulary (`logit_bias`), a schema its grammar cannot enforce (`response_format`), more choices than a
replica has slots (`n`).
"""

from __future__ import annotations

import re
from typing import Any

from serve_app.ingress.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError

MAX_N = 8
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs
_SCHEMA_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def invalid(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="invalid_request")


def generation_options(body: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """The `SamplingParams` fields these request fields set."""
    chat = isinstance(body, ChatCompletionRequest)
    return {
        "logit_bias": logit_bias(body.logit_bias),
        "logprobs": chat_logprobs(body) if chat else completion_logprobs(body),  # type: ignore[arg-type]
        "n": body.n or 1,
        "response_format": response_format(body.response_format) if chat else None,  # type: ignore[union-attr]
    }


def logit_bias(value: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} map, bias -100 to 100 (added to the token's logit before sampling)."""
    biases = []
    for key, bias in (value or {}).items():
        if not re.fullmatch(r"\d+", key):
            raise invalid("logit_bias", f"logit_bias keys must be token ids (integers as strings), not {key!r}.")
        if not -100 <= bias <= 100:
            raise invalid("logit_bias", f"logit_bias values must be between -100 and 100; token {key} has {bias}.")
        biases.append((int(key), float(bias)))
    return tuple(biases)


def chat_logprobs(body: ChatCompletionRequest) -> int | None:
    """How many alternatives each token's logprob comes with (None: no logprobs)."""
    top = body.top_logprobs
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise invalid("top_logprobs", f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, not {top}.")
    if not body.logprobs:
        if top is not None:
            raise invalid("top_logprobs", "top_logprobs needs logprobs: true.")
        return None
    return top or 0


def completion_logprobs(body: CompletionRequest) -> int | None:
    if body.logprobs is None:
        return None
    if body.echo:
        raise OpenAIError(400, "logprobs with echo is not supported: prompt tokens get no logprobs here.",
                          param="logprobs", code="unsupported_parameter")
    if not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise invalid("logprobs", f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, not {body.logprobs}.")
    return body.logprobs


def response_format(value: Any) -> dict[str, Any] | None:
    """`json_object` or `json_schema` as the engine gets it; `text` (or none) is None."""
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise invalid("response_format", "response_format.type must be text, json_object or json_schema.")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid("response_format.json_schema", "Missing required parameter: 'response_format.json_schema'.")
    if not isinstance(spec.get("name"), str) or not _SCHEMA_NAME.match(spec["name"]):
        raise invalid("response_format.json_schema.name",
                      "response_format.json_schema.name must be 1-64 letters, digits, underscores or dashes.")
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise invalid("response_format.json_schema.schema", "response_format.json_schema.schema must be an object.")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise invalid("response_format.json_schema.strict", "response_format.json_schema.strict must be a boolean.")
    return {"type": "json_schema", "json_schema": {"name": spec["name"], "schema": schema or {}}}
