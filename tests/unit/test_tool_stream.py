"""Tool calls read out of a text engine's stream (deployments.tool_stream), fed in small pieces (no model, no Ray).

Constrained output (a required call under a grammar) must stream a call's id and name first and then its
arguments in several fragments; `auto` output must hold back anything that may be a call until it validates.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from deployments.api import GenerationChunk
from deployments.llama_cpp.tools import streams_arguments
from deployments.tool_stream import read_tool_calls
from deployments.tool_use import ToolUse

WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                 "required": ["city"]}}
CLOCK = {"name": "get_time"}  # no parameters: any object
AUTO = ToolUse((WEATHER, CLOCK))
REQUIRED = ToolUse((WEATHER, CLOCK), "required")
# What the grammar lets a model write: optional spaces, Hermes tags, strings holding brackets and escapes.
TRICKY = {"city": 'P}a"r{is [x]', "nested": {"a": [1, {"b": "}"}]}}
CALLS = (f'<tool_call>\n{{ "name" : "get_weather", "arguments" : {json.dumps(TRICKY)} }}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def read(text: str, tools: ToolUse, constrained: bool, finish: str = "stop", piece: int = 3,
         choices: int = 1) -> list[GenerationChunk]:
    """`text` generated `piece` characters at a time by each of `choices` choices, interleaved."""
    async def generated() -> AsyncIterator[GenerationChunk]:
        pieces = [text[i:i + piece] for i in range(0, len(text), piece)]
        for i, part in enumerate(pieces):
            for index in range(choices):
                yield GenerationChunk(part, 5, i + 1, finish if i == len(pieces) - 1 else None, index=index)

    async def collect() -> list[GenerationChunk]:
        return [chunk async for chunk in read_tool_calls(generated(), tools, constrained)]

    return asyncio.run(collect())


def calls(chunks: list[GenerationChunk]) -> list[tuple[str, str, dict]]:
    """(id, name, parsed arguments) of each call, checking the OpenAI fragment order on the way."""
    heads: list[tuple[str, str]] = []
    arguments: list[str] = []
    for fragment in (f for chunk in chunks for f in chunk.tool_calls):
        if fragment.id is not None:
            assert fragment.index == len(heads) and fragment.name
            heads.append((fragment.id, fragment.name))
            arguments.append(fragment.arguments)
        else:
            assert fragment.index == len(heads) - 1 and fragment.name is None
            arguments[fragment.index] += fragment.arguments
    return [(id_, name, json.loads(args)) for (id_, name), args in zip(heads, arguments)]


def test_constrained_calls_stream_name_first_then_argument_fragments() -> None:
    chunks = read(CALLS, REQUIRED, constrained=True)
    assert [(name, args) for _, name, args in calls(chunks)] == [("get_weather", TRICKY), ("get_time", {})]
    assert len({id_ for id_, _, _ in calls(chunks)}) == 2 and all(i.startswith("call_") for i, _, _ in calls(chunks))
    weather_fragments = [f for c in chunks for f in c.tool_calls if f.index == 0 and f.id is None]
    assert len(weather_fragments) > 5  # generated 3 characters at a time, passed on as they come
    assert "".join(c.text for c in chunks) == "" and chunks[-1].finish_reason == "tool_calls"
    first_fragment = next(i for i, c in enumerate(chunks) if c.tool_calls)
    assert first_fragment < len(chunks) // 3  # announced long before the output ends


def test_a_constrained_call_cut_by_max_tokens_stays_cut_and_says_length() -> None:
    chunks = read('{"name": "get_weather", "arguments": {"city": "Par', REQUIRED, constrained=True, finish="length")
    fragments = [f for c in chunks for f in c.tool_calls]
    assert fragments[0].name == "get_weather" and "".join(f.arguments for f in fragments) == '{"city": "Par'
    assert chunks[-1].finish_reason == "length"
    before_a_name = read('{"name": "get_we', REQUIRED, constrained=True, finish="length")
    assert "".join(c.text for c in before_a_name) == '{"name": "get_we'
    assert not any(c.tool_calls for c in before_a_name) and before_a_name[-1].finish_reason == "length"


def test_auto_passes_text_at_once_and_a_call_only_when_whole_and_valid() -> None:
    text = read("It is sunny.", AUTO, constrained=False)
    assert text[0].text == "It " and "".join(c.text for c in text) == "It is sunny." and text[-1].finish_reason == "stop"
    call = read('{"name": "get_weather", "arguments": {"city": "Paris"}}', AUTO, constrained=False)
    assert not any(c.tool_calls or c.text for c in call[:-1])
    [(_, name, arguments)] = calls(call[-1:])
    assert (name, arguments, call[-1].finish_reason) == ("get_weather", {"city": "Paris"}, "tool_calls")
    invalid = '{"name": "get_weather", "arguments": {"town": 3}}'
    broken = read(invalid, ToolUse((WEATHER,)), constrained=False)
    assert ("".join(c.text for c in broken), broken[-1].finish_reason) == (invalid, "stop")
    assert not any(c.tool_calls for c in broken)


def test_each_of_n_choices_is_read_on_its_own() -> None:
    chunks = read(CALLS, REQUIRED, constrained=True, choices=3)
    for index in range(3):
        mine = [c for c in chunks if c.index == index]
        assert [name for _, name, _ in calls(mine)] == ["get_weather", "get_time"]
        assert mine[-1].finish_reason == "tool_calls"
    assert len({id_ for c in chunks for f in c.tool_calls if (id_ := f.id)}) == 6


def test_arguments_stream_only_where_the_grammar_enforces_every_schema() -> None:
    assert streams_arguments(REQUIRED) and streams_arguments(ToolUse((WEATHER,), "function", "get_weather"))
    assert not streams_arguments(AUTO)
    bounded = {"name": "f", "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}
    assert not streams_arguments(ToolUse((bounded, WEATHER), "required"))  # the grammar cannot enforce minimum
    assert streams_arguments(ToolUse((bounded, WEATHER), "function", "get_weather"))  # only the named one counts
