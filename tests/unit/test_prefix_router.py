"""What the prefix router matches requests on: tenant-scoped chained block hashes of the prompt."""

from __future__ import annotations

from deployments.api import GenerationRequest
from deployments.prefix_router import block_hashes, prompt_key

SYSTEM = {"role": "system", "content": "You are a helpful assistant who answers in one sentence. " * 3}


def hashes(tenant: str, *messages: dict[str, str], shared: bool = False) -> list[int]:
    return block_hashes(prompt_key(GenerationRequest("r", messages=messages, tenant=tenant), shared), 64)


def test_a_later_turn_extends_the_earlier_turns_hashes() -> None:
    first = hashes("a", SYSTEM, {"role": "user", "content": "hi"})
    later = hashes("a", SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                   {"role": "user", "content": "how are you?"})
    assert len(later) > len(first) > 0
    assert later[: len(first)] == first


def test_tenants_share_no_hashes_unless_the_cache_is_shared() -> None:
    assert not set(hashes("a", SYSTEM)) & set(hashes("b", SYSTEM))
    assert hashes("a", SYSTEM, shared=True) == hashes("b", SYSTEM, shared=True)


def test_a_prompt_shorter_than_a_block_has_no_hashes() -> None:
    assert block_hashes(prompt_key(GenerationRequest("r", prompt="short", tenant="a"), False), 64) == []
