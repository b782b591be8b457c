"""Tool-call formats without a model: reading output back, the generic prompt, the grammar (no Ray)."""

from __future__ import annotations

import json

import pytest
from llama_cpp import llama_chat_format

from deployments.llama_cpp.chat_prompt import render_all
from deployments.llama_cpp.tools import tool_grammar
from deployments.tool_use import ToolUse, generic_messages, native_messages, parse_calls

WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                 "required": ["city"]}}
CLOCK = {"name": "get_time"}  # no parameters: any object
TOOLS = ToolUse((WEATHER, CLOCK))
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


@pytest.mark.parametrize(
    "text",
    [CALL, f"  {CALL}\n", f"```json\n{CALL}\n```", f"<tool_call>\n{CALL}\n</tool_call>",
     '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',
     '{"name": "get_weather", "parameters": {"city": "Paris"}}'],
)
def test_a_call_is_read_in_every_format_models_write(text: str) -> None:
    [call] = parse_calls(text, TOOLS)
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})


@pytest.mark.parametrize(
    "text",
    ["Paris is sunny.", CALL + " and more", '{"name": "get_weather", "arguments": {"city": 3}}',
     '{"name": "get_weather", "arguments": {}}', '{"name": "launch", "arguments": {}}', '{"name": "get_weather"',
     '{"name": "get_weather", "arguments": {"city": "x"}, "extra": 1}', "[1, 2]", ""],
)
def test_anything_but_whole_valid_calls_stays_text(text: str) -> None:
    assert parse_calls(text, TOOLS) is None


def test_several_calls_only_when_parallel_calls_are_allowed() -> None:
    text = CALL + '\n{"name": "get_time", "arguments": {}}'
    assert [c.name for c in parse_calls(text, TOOLS)] == ["get_weather", "get_time"]
    assert parse_calls(text, ToolUse(TOOLS.functions, parallel=False)) is None


def test_a_named_function_is_the_only_callable_one() -> None:
    only_clock = ToolUse(TOOLS.functions, "function", "get_time")
    assert parse_calls(CALL, only_clock) is None
    assert parse_calls('{"name": "get_time", "arguments": {}}', only_clock)


def test_the_generic_prompt_lists_tools_and_plain_roles_carry_the_history() -> None:
    history = (
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    )
    system, user, assistant, result = generic_messages(history, TOOLS)
    assert system["role"] == "system" and '"name": "get_weather"' in system["content"]
    assert user == history[0]
    assert json.loads(assistant["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert result == {"role": "user", "content": "Result of tool call c1 (get_weather):\nsunny"}
    assert len(generic_messages(history, None)) == 3  # no tools offered: only the history


def test_a_template_that_knows_tools_renders_them_itself() -> None:
    template = ("{% for t in tools %}TOOL {{ t.function.name }}\n{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}"
                "{% for c in m.tool_calls or [] %}CALL {{ c.function.arguments | tojson }}{% endfor %}\n{% endfor %}")
    formatter = llama_chat_format.Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")
    history = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"})
    prompt = render_all(formatter, native_messages(history), tools=[{"type": "function", "function": WEATHER}]).prompt
    assert prompt.startswith("TOOL get_weather\n") and 'CALL {"city": "Paris"}' in prompt and "tool: sunny" in prompt


def test_the_grammar_admits_calls_only_when_one_is_required() -> None:
    assert tool_grammar(TOOLS, hermes=False) is None
    single = tool_grammar(ToolUse(TOOLS.functions, "function", "get_weather", parallel=False), hermes=False)
    assert single.rstrip().endswith("root ::= modelserve-tool-call") and '"\\"get_weather\\""' in single
    assert "\\x00-\\x1F]" in single  # strings hold no raw control characters: JSON forbids them
    several = tool_grammar(ToolUse((WEATHER, {"name": "root"}), "required"), hermes=True)
    assert '"\\"root\\""' in several  # a tool named like the converter's rule keeps its name
    assert several.count("\nroot ::=") == 1 and "<tool_call>" in several
