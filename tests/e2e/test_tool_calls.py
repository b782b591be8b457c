"""Tool calls end to end through the unmodified openai SDK against the real app (issue #17).

`required` and named functions are grammar-constrained, so even output sampled at temperature 1.5
is a valid call, and streamed its arguments arrive in fragments as generated; `auto` output is parsed
and validated (an invalid call comes back as text). With n > 1 each choice makes its own call. Every
response and stream chunk is also checked against OpenAI's schema by conftest.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from tests.support.cluster import GEMMA, TINY

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": False},
    },
}
# Bounded values only: sampled wildly under the grammar, a call still has to finish within a few tokens.
FORECAST = {
    "type": "function",
    "function": {
        "name": "forecast",
        "parameters": {"type": "object",
                       "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer"}, "rain": {"type": "boolean"}},
                       "required": ["unit", "days", "rain"], "additionalProperties": False},
    },
}
# Arguments long enough to take several of the stream's 100 ms intervals to generate (the grammar enforces minLength).
NOTE = {
    "type": "function",
    "function": {
        "name": "save_note",
        "description": "Save a note about the weather.",
        "parameters": {"type": "object", "properties": {"text": {"type": "string", "minLength": 160, "maxLength": 200}},
                       "required": ["text"], "additionalProperties": False},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def named(tool: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": tool["function"]["name"]}}


def check_call(call: Any, tool: dict[str, Any]) -> dict[str, Any]:
    """A call names `tool`, has an id, and its arguments (a JSON string) validate against the tool's schema."""
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


def test_a_named_function_is_called_with_arguments_that_validate(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=GEMMA, messages=ASK, tools=[WEATHER], tool_choice=named(WEATHER),
                                           temperature=0, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    assert check_call(choice.message.tool_calls[0], WEATHER)["city"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_constrains_even_wildly_sampled_output_to_a_valid_call(client: openai.OpenAI, seed: int) -> None:
    reply = client.chat.completions.create(model=GEMMA, messages=ASK, tools=[FORECAST, WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, seed=seed, temperature=1.5, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    [call] = choice.message.tool_calls
    check_call(call, WEATHER if call.function.name == "get_weather" else FORECAST)


def streamed_calls(stream: Any) -> dict[int, dict[int, list[Any]]]:
    """Each choice's tool call deltas, by choice and call index (no content may come with them)."""
    calls: dict[int, dict[int, list[Any]]] = {}
    for chunk in stream:
        for choice in chunk.choices:
            assert not choice.delta.content
            for delta in choice.delta.tool_calls or []:
                calls.setdefault(choice.index, {}).setdefault(delta.index, []).append(delta)
    return calls


def joined_arguments(deltas: list[Any]) -> str:
    """A streamed call's arguments, checking OpenAI's delta format: index, id, type and name first, then fragments."""
    head, *fragments = deltas
    assert head.id.startswith("call_") and head.type == "function" and head.function.name
    assert all(d.index == head.index and d.id is None and d.function.name is None for d in fragments)
    return (head.function.arguments or "") + "".join(d.function.arguments for d in fragments)


def test_a_streamed_call_arrives_as_openai_deltas_with_its_arguments_in_fragments(client: openai.OpenAI) -> None:
    params: dict[str, Any] = {"model": GEMMA, "messages": ASK, "tools": [WEATHER, NOTE], "tool_choice": named(NOTE),
                              "temperature": 0, "max_tokens": 300, "seed": 0}  # seeded: both prefilled in full
    whole = client.chat.completions.create(**params).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(**params, stream=True))
    [deltas] = streamed_calls(chunks)[0].values()
    assert deltas[0].index == 0 and deltas[0].function.name == "save_note"
    assert len(deltas) > 2  # id and name, then the arguments as generated: more than one fragment
    assert json.loads(joined_arguments(deltas)) == json.loads(whole.function.arguments)
    assert [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == ["tool_calls"]


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_each_make_their_own_call(client: openai.OpenAI, stream: bool) -> None:
    params: dict[str, Any] = {"model": GEMMA, "messages": ASK, "tools": [FORECAST, WEATHER], "n": 3, "seed": 4,
                              "tool_choice": "required", "parallel_tool_calls": False, "temperature": 1.0,
                              "max_tokens": 60}
    if not stream:
        reply = client.chat.completions.create(**params)
        assert [c.index for c in reply.choices] == [0, 1, 2]
        for choice in reply.choices:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            [call] = choice.message.tool_calls
            check_call(call, WEATHER if call.function.name == "get_weather" else FORECAST)
        assert len({c.message.tool_calls[0].id for c in reply.choices}) == 3
        return
    calls = streamed_calls(client.chat.completions.create(**params, stream=True))
    assert sorted(calls) == [0, 1, 2] and all(list(by_call) == [0] for by_call in calls.values())
    for by_call in calls.values():
        tool = WEATHER if by_call[0][0].function.name == "get_weather" else FORECAST
        jsonschema.validate(json.loads(joined_arguments(by_call[0])), tool["function"]["parameters"])


def test_an_agent_loop_calls_the_tool_then_answers_from_its_result(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=GEMMA, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=60)
    [call] = first.choices[0].message.tool_calls
    city = check_call(call, WEATHER)["city"]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"city": city, "sky": "sunny", "c": 18})}]
    answer = client.chat.completions.create(model=GEMMA, messages=history, tools=[WEATHER], temperature=0,
                                            max_tokens=40)
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert choice.message.content.strip()
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result reached the model


def test_auto_output_is_the_same_streamed_or_not_and_never_broken_calls(client: openai.OpenAI) -> None:
    """Auto: Gemma 270M answers this history with JSON that is no valid call; it must come back as text."""
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 18, "sky": "sunny"}'},
        {"role": "assistant", "content": "It is sunny in Paris, 18 degrees."},
        {"role": "user", "content": "What is the weather in Berlin?"}]
    params: dict[str, Any] = {"model": GEMMA, "messages": history, "tools": [WEATHER], "tool_choice": "auto",
                              "temperature": 0, "max_tokens": 40, "parallel_tool_calls": False,
                              "seed": 0}  # seeded: both prefilled in full, not one of them from the other's cached prefix
    whole = client.chat.completions.create(**params).choices[0]
    streamed = [c.choices[0] for c in client.chat.completions.create(**params, stream=True) if c.choices]
    assert "".join(c.delta.content or "" for c in streamed) == (whole.message.content or "")
    assert streamed[-1].finish_reason == whole.finish_reason
    if whole.message.tool_calls:
        for call in whole.message.tool_calls:
            check_call(call, WEATHER)
    else:
        assert whole.message.content and whole.finish_reason in ("stop", "length")


def test_tool_choice_none_sends_no_tools_and_makes_no_call(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=GEMMA, messages=ASK, temperature=0, max_tokens=4)
    none = client.chat.completions.create(model=GEMMA, messages=ASK, tools=[WEATHER], tool_choice="none",
                                          temperature=0, max_tokens=4)
    offered = client.chat.completions.create(model=GEMMA, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=4)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < offered.usage.prompt_tokens
    assert none.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    ("extra", "code", "param"),
    [
        ({"tools": [{"type": "custom", "custom": {"name": "grep"}}]}, "unsupported_parameter", "tools[0].type"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "invalid_request", "tool_choice"),
        ({"tool_choice": "required"}, "invalid_request", "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
         "invalid_request", "tools[0].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "invalid_request", "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "invalid_request", "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}},
         "unsupported_parameter", "tool_choice"),
    ],
)
def test_tools_the_server_cannot_use_are_refused_by_name(
    client: openai.OpenAI, extra: dict[str, Any], code: str, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=ASK, max_tokens=2, extra_body=extra)
    assert (info.value.body["code"], info.value.body["param"]) == (code, param)
