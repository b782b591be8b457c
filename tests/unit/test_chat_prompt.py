"""System messages reach the model under every chat format the README offers, or the request is refused (no Ray)."""

from __future__ import annotations

import pytest
from llama_cpp import llama_chat_format

from deployments.api import InvalidGenerationRequest, UnsupportedGenerationRequest
from deployments.llama_cpp.chat_prompt import fold_system_messages, missing_message, render_all
from tests.support.tiny_gguf import TINY_CHAT_TEMPLATE

SYSTEM, USER, ASSISTANT, AGAIN = "Answer like a pirate.", "Name a colour.", "Red, arr.", "Another one?"
CHAT = (
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER},
    {"role": "assistant", "content": ASSISTANT},
    {"role": "user", "content": AGAIN},
)
# engine.chat_format names: ChatTemplate resolves a name to llama_chat_format.format_<name>.
NAMED_FORMATS = sorted(name[len("format_"):] for name in dir(llama_chat_format) if name.startswith("format_"))
# Gemma 2's official template: system messages are an error (as several templates do).
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}<start_of_turn>model\n"
)
# A template that silently skips roles it does not know.
USER_ASSISTANT_ONLY = (
    "{% for message in messages %}{% if message['role'] in ['user', 'assistant'] %}"
    "[{{ message['role'] }}] {{ message['content'] }}\n{% endif %}{% endfor %}[assistant] "
)


def jinja(template: str) -> llama_chat_format.Jinja2ChatFormatter:
    return llama_chat_format.Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")


def test_every_named_format_is_offered() -> None:
    assert "gemma" in NAMED_FORMATS and len(NAMED_FORMATS) > 15


# llama-cpp-python formats that lose turns whatever we send: `open_orca` maps roles "User"/"Assistant", which
# never match, and `saiga` expects role "bot" for the assistant. Refused rather than served half a conversation.
LOSSY_FORMATS = {"open_orca": 0, "saiga": 2}  # the index of the first message each loses


@pytest.mark.parametrize("name", NAMED_FORMATS)
def test_named_formats_carry_every_message_or_refuse(name: str) -> None:
    formatter = getattr(llama_chat_format, f"format_{name}")
    if name in LOSSY_FORMATS:
        with pytest.raises(UnsupportedGenerationRequest) as info:
            render_all(formatter, CHAT)
        lost = LOSSY_FORMATS[name]
        assert info.value.param == f"messages[{lost}].role"
        assert CHAT[lost]["content"] not in formatter(messages=list(CHAT)).prompt
        return
    prompt = render_all(formatter, CHAT).prompt
    assert missing_message(prompt, [m for m in CHAT if m["role"] != "system"]) is None
    assert SYSTEM in prompt


def test_saiga_serves_a_conversation_without_assistant_turns() -> None:
    assert f"<s>system\n{SYSTEM}</s><s>user\n{USER}</s>" in render_all(llama_chat_format.format_saiga, CHAT[:2]).prompt


def test_gemma_folds_the_system_prompt_into_the_first_user_turn_like_its_official_template() -> None:
    prompt = render_all(llama_chat_format.format_gemma, CHAT).prompt
    assert f"<start_of_turn>user\n{SYSTEM}\n\n{USER}<end_of_turn>" in prompt


@pytest.mark.parametrize("template", [TINY_CHAT_TEMPLATE, NO_SYSTEM_TEMPLATE, USER_ASSISTANT_ONLY])
def test_jinja_templates_carry_every_message(template: str) -> None:
    prompt = render_all(jinja(template), CHAT).prompt
    assert SYSTEM in prompt and missing_message(prompt, CHAT[1:]) is None


def test_a_template_with_its_own_system_role_keeps_it() -> None:
    assert "<|system|>\n" + SYSTEM in render_all(jinja(TINY_CHAT_TEMPLATE), CHAT).prompt


def test_fold_keeps_every_system_message_in_order() -> None:
    messages = [{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
                {"role": "user", "content": "u"}, {"role": "assistant", "content": "x"},
                {"role": "system", "content": "late"}]
    assert fold_system_messages(messages) == [
        {"role": "user", "content": "a\n\nb\n\nu"}, {"role": "assistant", "content": "x"},
        {"role": "user", "content": "late"},
    ]


def test_a_format_that_cannot_carry_a_message_is_refused_naming_it() -> None:
    only_first_user = jinja("{{ messages[1]['content'] }}")  # drops the system and later turns whatever we do
    with pytest.raises(UnsupportedGenerationRequest) as info:
        render_all(only_first_user, CHAT)
    assert info.value.param == "messages[0].role"
    with pytest.raises(InvalidGenerationRequest) as info:
        render_all(jinja("{{ raise_exception('no') }}"), CHAT)
    assert info.value.param == "messages"
