"""A JWKS endpoint that is slow, down or answers garbage: auth fails closed, cached keys keep working, and no
request waits longer than `auth.jwks_timeout_s` (a real HTTP server on 127.0.0.1 plays the identity provider)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from serve_app.access import keys
from serve_app.access.authn import Authenticator, AuthError
from serve_app.access.keys import AuthSettings
from tests.support.auth_helpers import JwksServer, claims

BOUND_S = 0.3  # auth.jwks_timeout_s in these tests
SLACK_S = 0.3  # scheduling on a busy 2-core machine


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def server(key: rsa.RSAPrivateKey) -> Iterator[JwksServer]:
    jwks = JwksServer()
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks.document = {"keys": [{**public, "kid": "k1", "alg": "RS256"}]}
    yield jwks
    jwks.stop()


def token(key: rsa.RSAPrivateKey, kid: str) -> str:
    return "Bearer " + jwt.encode(claims(), key, "RS256", headers={"kid": kid})


def misbehave(server: JwksServer, how: str) -> None:
    """Turn a working endpoint into a hostile one."""
    if how == "down":
        server.stop()
    elif how == "slow":
        server.delay_s = 3.0
    elif how == "trickling":
        server.raw, server.trickle_s = b'{"keys":[]}', BOUND_S / 3  # each byte within the socket timeout, not the whole
    else:
        server.raw = GARBAGE[how]


GARBAGE = {
    "not JSON": b"<html>502 Bad Gateway</html>",
    "a JSON list": b"[1, 2, 3]",
    "no keys list": b'{"keys": "none"}',
    "unusable keys": json.dumps({"keys": [{"kty": "RSA", "kid": "k1"}, {"kty": "EC", "crv": "P-999", "kid": "k1"},
                                          {"kty": "OKP", "crv": "X25519", "x": "AAAA", "kid": "k1"}, 7]}).encode(),
    "invalid UTF-8": b'{"keys": ["\xff\xfe"]}',
}
HOSTILE = ["down", "slow", "trickling", *GARBAGE]


async def timed(auth: Authenticator, header: str) -> tuple[Any, float]:
    """The principal or the AuthError, and how long the request waited."""
    started = time.perf_counter()
    try:
        result: Any = await auth.authenticate(header)
    except AuthError as exc:
        result = exc
    return result, time.perf_counter() - started


def authenticator(server: JwksServer, cache_s: float = 300.0) -> Authenticator:
    settings = AuthSettings(algorithms=["RS256"], jwks_url=server.url, jwks_timeout_s=BOUND_S, jwks_cache_s=cache_s)
    return Authenticator(settings, {}, environ={})


def run(scenario: Callable[[], Any]) -> Any:
    """asyncio.run, except that a JWKS fetch still trickling in its thread once the checks are done is left to end
    on its own (asyncio.run would wait for the whole trickle)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(scenario())
    finally:
        if pending := asyncio.all_tasks(loop):
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()  # shuts the thread pool down without waiting for its threads


@pytest.mark.parametrize("how", HOSTILE)
def test_without_cached_keys_a_hostile_jwks_fails_closed_within_the_bound(
    how: str, server: JwksServer, key: rsa.RSAPrivateKey
) -> None:
    misbehave(server, how)
    auth = authenticator(server)

    async def scenario() -> None:
        results = await asyncio.gather(*(timed(auth, token(key, "k1")) for _ in range(5)))
        for result, waited in results:
            assert isinstance(result, AuthError) and "kid" in str(result)
            assert waited < BOUND_S + SLACK_S
        assert server.fetches <= 1  # concurrent requests share one fetch

    run(scenario)


@pytest.fixture
def refresh_log() -> Iterator[list[logging.LogRecord]]:
    """What the key ring logs (its logger is under ray.serve's, which does not propagate to caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    keys.logger.addHandler(handler)
    yield records
    keys.logger.removeHandler(handler)


async def refresh_failed(log: list[logging.LogRecord], failures: int) -> None:
    """Until the `failures`-th failed JWKS refresh is logged, or the bound has passed (a trickle outlasts it)."""
    deadline = time.monotonic() + BOUND_S + SLACK_S
    while time.monotonic() < deadline:
        if sum(r.getMessage().startswith("JWKS fetch") and "failed" in r.getMessage() for r in log) >= failures:
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("how", ["down", "slow", "trickling", "not JSON", "unusable keys"])
def test_cached_keys_keep_working_while_the_jwks_endpoint_misbehaves(
    how: str, server: JwksServer, key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch,
    refresh_log: list[logging.LogRecord],
) -> None:
    auth = authenticator(server, cache_s=0.05)

    async def scenario() -> None:
        principal, _ = await timed(auth, token(key, "k1"))
        assert principal.tenant == "team-a"
        misbehave(server, how)
        monkeypatch.setattr("serve_app.access.keys.JWKS_COOLDOWN_S", 0.0)
        for refresh in (1, 2):
            await asyncio.sleep(0.1)  # the keys are stale now: the next request refreshes them in the background
            principal, waited = await timed(auth, token(key, "k1"))
            assert principal.tenant == "team-a" and waited < 0.1  # never waits for the endpoint
            await refresh_failed(refresh_log, refresh)  # the failed refresh has ended: the keys survived it
        refused, waited = await timed(auth, token(key, "k2"))  # a kid the cache lacks: fail closed, bounded
        assert isinstance(refused, AuthError) and waited < BOUND_S + SLACK_S

    run(scenario)
