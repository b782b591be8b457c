"""Authentication units: the token verification matrix, key rotation, JWKS files and URLs, API keys."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from serve_app.access.authn import Authenticator, AuthError, Principal, api_key_hash
from serve_app.access.keys import AuthSettings
from tests.support.auth_helpers import (
    SECRET_1,
    SECRET_2,
    JwksServer,
    authenticate,
    authenticator,
    b64url,
    bearer,
    claims,
    forged,
)

# --- token verification matrix -------------------------------------------------------------------------


def test_valid_tokens_of_every_key_give_the_tenant_and_roles(keys: dict[str, Any]) -> None:
    auth = authenticator(keys)
    admin = claims("ops", roles=["admin"])
    for token in (
        jwt.encode(admin, SECRET_1, "HS256", headers={"kid": "k1"}),
        jwt.encode(admin, SECRET_2, "HS256", headers={"kid": "k2"}),
        jwt.encode(admin, SECRET_2, "HS256"),  # no kid: every HMAC secret is tried
        jwt.encode(admin, keys["rsa"], "RS256", headers={"kid": "rsa-1"}),
        jwt.encode(admin, keys["ec"], "ES256"),
    ):
        principal = authenticate(auth, bearer(token))
        assert principal == Principal("ops", frozenset({"admin"}), "user@ops") and principal.is_admin


@pytest.mark.parametrize(
    ("name", "make_token", "message"),
    [
        ("expired", lambda k: jwt.encode(claims(ttl_s=-120), SECRET_1, "HS256"), "expired"),
        ("not yet valid", lambda k: jwt.encode(claims(nbf=int(time.time()) + 600), SECRET_1, "HS256"), "not yet"),
        (
            "issued in the future",
            lambda k: jwt.encode(claims(iat=int(time.time()) + 600), SECRET_1, "HS256"),
            "not yet",
        ),
        ("no exp", lambda k: jwt.encode({"tenant": "a", "sub": "a"}, SECRET_1, "HS256"), "exp"),
        ("wrong signature", lambda k: jwt.encode(claims(), "x" * 40, "HS256"), "signature"),
        ("alg none", lambda k: forged({"alg": "none", "typ": "JWT"}, claims(), None), "'none'"),
        ("HS256 keyed with the RS public key", lambda k: forged({"alg": "HS256"}, claims(), k["rsa_pem"]), "signature"),
        (
            "RS256 by an unknown key",
            lambda k: jwt.encode(claims(), rsa.generate_private_key(65537, 2048), "RS256"),
            "signature",
        ),
        ("unknown kid", lambda k: jwt.encode(claims(), SECRET_1, "HS256", headers={"kid": "k9"}), "kid"),
        ("kid of another family", lambda k: jwt.encode(claims(), SECRET_1, "HS256", headers={"kid": "rsa-1"}), "kid"),
        ("disallowed algorithm", lambda k: jwt.encode(claims(), SECRET_1 * 2, "HS512"), "HS512"),
        ("unexpected audience", lambda k: jwt.encode(claims(aud="other"), SECRET_1, "HS256"), "(?i)audience"),
        ("no tenant", lambda k: jwt.encode({"exp": int(time.time()) + 60}, SECRET_1, "HS256"), "tenant"),
        ("malformed", lambda k: "abc.def.ghi", "Malformed"),
        ("exp as a string", lambda k: jwt.encode(claims(exp=str(int(time.time()) + 60)), SECRET_1, "HS256"),
         "must be a number"),
        ("exp in year 9999", lambda k: jwt.encode(claims(exp=253402300799), SECRET_1, "HS256"), "lifetime"),
        ("exp of 2^63", lambda k: jwt.encode(claims(exp=2**63), SECRET_1, "HS256"), "lifetime"),
        ("31 days left", lambda k: jwt.encode(claims(ttl_s=31 * 86400), SECRET_1, "HS256"), "lifetime"),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(keys: dict[str, Any], name: str, make_token: Any, message: str) -> None:
    with pytest.raises(AuthError, match=message):
        authenticate(authenticator(keys), bearer(make_token(keys)))


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "Token abc"])
def test_missing_or_non_bearer_credentials_are_refused(keys: dict[str, Any], header: str | None) -> None:
    with pytest.raises(AuthError, match="Missing bearer token"):
        authenticate(authenticator(keys), header)


def test_token_lifetime_bound_is_configurable(keys: dict[str, Any]) -> None:
    month = jwt.encode(claims(ttl_s=29 * 86400), SECRET_1, "HS256")
    assert authenticate(authenticator(keys), bearer(month)).tenant == "team-a"  # within the default 30 days
    with pytest.raises(AuthError, match="lifetime exceeds this server's maximum of 3600 s"):
        authenticate(authenticator(keys, max_token_lifetime_s=3600), bearer(month))


def test_issuer_and_audience_are_enforced_when_configured(keys: dict[str, Any]) -> None:
    auth = authenticator(keys, issuer="https://idp.test/", audience="modelserve")
    good = claims(iss="https://idp.test/", aud="modelserve")
    assert authenticate(auth, bearer(jwt.encode(good, SECRET_1, "HS256"))).tenant == "team-a"
    for bad, reason in (
        ({**good, "iss": "https://evil.test/"}, "issuer"),
        ({**good, "aud": "other"}, "audience"),
        ({k: v for k, v in good.items() if k != "iss"}, "iss"),
    ):
        with pytest.raises(AuthError, match=f"(?i){reason}"):
            authenticate(auth, bearer(jwt.encode(bad, SECRET_1, "HS256")))


def test_key_rotation_picks_up_added_and_removed_kid_files(keys: dict[str, Any], tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "old").write_text(SECRET_1)
    settings = AuthSettings(keys_reload_s=0)
    auth = Authenticator(settings, {}, environ={"MODELSERVE_JWT_SECRET_FILE": str(secrets_dir)})
    old = jwt.encode(claims(), SECRET_1, "HS256", headers={"kid": "old"})
    new = jwt.encode(claims(), SECRET_2, "HS256", headers={"kid": "new"})
    assert authenticate(auth, bearer(old)).tenant == "team-a"
    with pytest.raises(AuthError, match="kid"):
        authenticate(auth, bearer(new))
    (secrets_dir / "new").write_text(SECRET_2)  # rotation step 1: both valid
    assert authenticate(auth, bearer(old)).tenant == authenticate(auth, bearer(new)).tenant == "team-a"
    (secrets_dir / "old").unlink()  # step 2: the old key is retired
    assert authenticate(auth, bearer(new)).tenant == "team-a"
    with pytest.raises(AuthError, match="kid"):
        authenticate(auth, bearer(old))


def test_jwks_file_keys_verify_and_symmetric_entries_are_ignored(keys: dict[str, Any], tmp_path: Path) -> None:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys["rsa"].public_key()))
    oct_key = {"kty": "oct", "kid": "sym", "k": b64url(b"s" * 40)}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "idp-1", "alg": "RS256"}, oct_key]}))
    auth = Authenticator(
        AuthSettings(algorithms=["RS256", "HS256"], jwks_file=str(tmp_path / "jwks.json")),
        {},
        environ={"MODELSERVE_JWT_SECRET": SECRET_1},
    )
    token = jwt.encode(claims(), keys["rsa"], "RS256", headers={"kid": "idp-1"})
    assert authenticate(auth, bearer(token)).tenant == "team-a"
    with pytest.raises(AuthError, match="kid"):
        authenticate(auth, bearer(jwt.encode(claims(), b"s" * 40, "HS256", headers={"kid": "sym"})))


def test_claim_names_fallbacks_and_static_api_keys(keys: dict[str, Any]) -> None:
    service = Principal("batch", frozenset(), "api-key:nightly")
    auth = authenticator(keys, {api_key_hash("msk-secret-key"): service}, tenant_claim="org", roles_claim="groups")
    token = jwt.encode(claims(org="acme", groups="admin, reader"), SECRET_1, "HS256")
    assert authenticate(auth, bearer(token)) == Principal("acme", frozenset({"admin", "reader"}), "user@team-a")
    only_sub = jwt.encode({"sub": "solo", "role": "admin", "exp": int(time.time()) + 60}, SECRET_1, "HS256")
    assert authenticate(auth, bearer(only_sub)) == Principal("solo", frozenset({"admin"}), "solo")
    assert authenticate(auth, bearer("msk-secret-key")) == service
    with pytest.raises(AuthError, match="Incorrect API key"):
        authenticate(auth, bearer("msk-wrong-key"))


def test_settings_refuse_none_and_keys_in_config_text(keys: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="algorithms"):
        AuthSettings.model_validate({"algorithms": ["none"]})
    with pytest.raises(ValueError, match="secret"):
        AuthSettings.model_validate({"secret": "in-config"})
    with pytest.raises(ValueError, match="no verification keys"):
        Authenticator(AuthSettings(), {}, environ={})
    with pytest.raises(ValueError, match="shorter than 32"):
        Authenticator(AuthSettings(), {}, environ={"MODELSERVE_JWT_SECRET": "short"})


def test_jwks_url_is_cached_and_refetched_for_a_new_kid(keys: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    server = JwksServer()
    try:
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys["rsa"].public_key()))
        server.document = {"keys": [{**public, "kid": "2025-01", "alg": "RS256"}]}
        auth = Authenticator(AuthSettings(algorithms=["RS256"], jwks_url=server.url), {}, environ={})
        old = jwt.encode(claims(), keys["rsa"], "RS256", headers={"kid": "2025-01"})
        new = jwt.encode(claims(), keys["rsa"], "RS256", headers={"kid": "2025-06"})
        assert authenticate(auth, bearer(old)).tenant == authenticate(auth, bearer(old)).tenant == "team-a"
        assert server.fetches == 1  # cached
        server.document["keys"].append({**public, "kid": "2025-06", "alg": "RS256"})  # the IdP rotates
        with pytest.raises(AuthError, match="kid"):
            authenticate(auth, bearer(new))  # within the refetch cooldown: no stampede on unknown kids
        assert server.fetches == 1
        monkeypatch.setattr("serve_app.access.keys.JWKS_COOLDOWN_S", 0.0)
        assert authenticate(auth, bearer(new)).tenant == "team-a"
        assert server.fetches == 2
    finally:
        server.stop()
