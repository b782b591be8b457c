"""The tiny GGUF generator must yield a file real llama.cpp loads, tokenizes, generates from and templates."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from tests.support.tiny_gguf import TINY_CHAT_TEMPLATE, write_tiny_gemma3_gguf, write_tiny_llama_gguf

N_CTX = 256


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def llm(tiny_model_path: Path) -> Iterator[llama_cpp.Llama]:
    model = llama_cpp.Llama(model_path=str(tiny_model_path), n_ctx=N_CTX, verbose=False)
    yield model
    model.close()


def test_file_is_deterministic_per_seed_and_leaves_no_temp_files(tmp_path: Path) -> None:
    first = write_tiny_llama_gguf(tmp_path / "a.gguf", seed=7)
    second = write_tiny_llama_gguf(tmp_path / "b.gguf", seed=7)
    other_seed = write_tiny_llama_gguf(tmp_path / "c.gguf", seed=8)

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert digest(first) == digest(second)
    assert digest(first) != digest(other_seed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "c.gguf"]


def test_rejects_non_positive_context(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_ctx_train"):
        write_tiny_llama_gguf(tmp_path / "bad.gguf", n_ctx_train=0)
    assert list(tmp_path.iterdir()) == []


def test_loads_with_requested_context_and_training_context(tmp_path: Path, llm: llama_cpp.Llama) -> None:
    assert llm.n_ctx() == N_CTX
    assert llm.metadata["general.architecture"] == "llama"
    assert llm.metadata["llama.context_length"] == "512"

    longer = write_tiny_llama_gguf(tmp_path / "long.gguf", n_ctx_train=1024)
    long_llm = llama_cpp.Llama(model_path=str(longer), n_ctx=0, verbose=False)
    try:
        assert long_llm.n_ctx() == 1024
    finally:
        long_llm.close()


def test_english_round_trip_uses_word_pieces(llm: llama_cpp.Llama) -> None:
    text = "Hello world, this is a quick test of the model."
    tokens = llm.tokenize(text.encode())

    assert tokens[0] == llm.token_bos()
    assert len(tokens) < len(text) // 2
    assert llm.detokenize(tokens).decode() == text


def test_non_ascii_round_trip_uses_byte_fallback(llm: llama_cpp.Llama) -> None:
    text = "Grüße, 日本語 😀"
    tokens = llm.tokenize(text.encode())
    kanji_pieces = [llm.detokenize([t]) for t in llm.tokenize("日".encode(), add_bos=False)]

    assert kanji_pieces[-3:] == [b"\xe6", b"\x97", b"\xa5"]
    assert llm.detokenize(tokens).decode() == text


def test_greedy_generation_is_repeatable(llm: llama_cpp.Llama) -> None:
    prompt = llm.tokenize(b"The quick brown fox")

    def generate_16() -> list[int]:
        generated: list[int] = []
        for token in llm.generate(prompt, temp=0.0):
            generated.append(token)
            if len(generated) == 16:
                break
        return generated

    first = generate_16()
    second = generate_16()

    assert len(first) == 16
    assert all(0 <= token < llm.n_vocab() for token in first)
    assert first == second


def test_chat_template_is_read_from_metadata_and_renders(llm: llama_cpp.Llama) -> None:
    template = llm.metadata["tokenizer.chat_template"]
    assert template == TINY_CHAT_TEMPLATE
    assert llm.chat_format == "chat_template.default"

    formatter = Jinja2ChatFormatter(template=template, bos_token="<s>", eos_token="</s>")
    rendered = formatter(messages=[{"role": "user", "content": "Hello there"}])

    assert rendered.prompt == "<s><|user|>\nHello there</s>\n<|assistant|>\n"
    prompt_tokens = llm.tokenize(rendered.prompt.encode(), add_bos=False, special=True)
    assert prompt_tokens[0] == llm.token_bos()
    assert llm.token_eos() in prompt_tokens


def test_gemma3_variant_has_the_sliding_window_it_was_given(tmp_path: Path) -> None:
    path = write_tiny_gemma3_gguf(tmp_path / "tiny-gemma3.gguf", sliding_window=32)
    model = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, verbose=False)
    try:
        assert model.metadata["general.architecture"] == "gemma3"
        assert llama_cpp.llama_model_n_swa(model.model) == 32
        assert model.detokenize(model.tokenize(b"The quick brown fox")) == b"The quick brown fox"
    finally:
        model.close()
