"""Policy units: policy documents, tenant caps and allowlists, the token and policy-sync CLI helpers."""

from __future__ import annotations

import argparse
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from deployments.api import SamplingParams, default_max_tokens
from deployments.strict import ConfigError
from serve_app.access.authn import Authenticator, Principal
from serve_app.access.gate import AccessGate, RequestAccount, reset_duration
from serve_app.access.keys import AuthSettings
from serve_app.access.policy import TenantPolicy, parse_policy
from serve_app.cli.tokens import dev_secret, mint_token, parse_ttl, register, sync_policy
from serve_app.ingress.protocol import OpenAIError
from tests.support.auth_helpers import SECRET_1, SECRET_2, authenticate, authenticator, bearer

# --- policy documents ----------------------------------------------------------------------------------


def test_policy_errors_name_each_bad_field() -> None:
    bad = {
        "tenants": {"dev": {"models": ["*"], "max_tokens": 0, "rpm": 5}},
        "default": {"over_max_tokens": "truncate"},
        "auth": {"algorithms": ["none"]},
        "api_keys": [{"name": "k", "sha256": "plain-text-key", "tenant": "dev"}],
    }
    with pytest.raises(ConfigError) as info:
        parse_policy(bad, "policies/bad.yaml")
    message = str(info.value)
    assert message.startswith("invalid policies/bad.yaml:")
    for expected in (
        "tenants.dev.max_tokens: Input should be greater than or equal to 1 (got 0)",
        "tenants.dev.rpm: Extra inputs are not permitted",
        "default.over_max_tokens: Input should be 'clamp' or 'reject'",
        "auth.algorithms[0]: Input should be",
        "api_keys[0] (k).sha256: Value error, must be the 64-character",
    ):
        assert expected in message
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_policy(["dev"])


def test_shipped_policies_validate_and_default_denies_unknown_tenants() -> None:
    root = Path(__file__).resolve().parents[2] / "policies"
    default = parse_policy(yaml.safe_load((root / "default.yaml").read_text()))
    assert default.tenant("dev").allows("anything") and default.tenant("dev").requests_per_minute
    assert not default.tenant("stranger").allows("anything")
    example = parse_policy(yaml.safe_load((root / "example-multitenant.yaml").read_text()))
    assert example.tenant("search").allows("gemma-3-270m") and not example.tenant("search").allows("llama-3")


def test_globs_admin_and_max_tokens_clamp_or_reject() -> None:
    def account(policy: TenantPolicy, roles: frozenset[str] = frozenset()) -> RequestAccount:
        return RequestAccount(Principal("t", roles, "s"), policy, "rev")

    clamp = account(TenantPolicy(models=["gemma-*", "tiny-?"], max_tokens=64))
    assert [AccessGate.allows(clamp, m) for m in ("gemma-3-270m", "tiny-a", "tiny-ab", "Gemma-3")] == [
        True,
        True,
        False,
        False,
    ]
    assert AccessGate.allows(account(TenantPolicy(), frozenset({"admin"})), "anything")
    # unset stays unset: the model's default_max_tokens applies, bounded by the cap (default_max_tokens below)
    assert [AccessGate.max_tokens(clamp, n) for n in (None, 10, 64, 500)] == [None, 10, 64, 64]
    reject = account(TenantPolicy(max_tokens=64, over_max_tokens="reject"))
    assert AccessGate.max_tokens(reject, None) is None
    with pytest.raises(OpenAIError) as info:
        AccessGate.max_tokens(reject, 65)
    assert info.value.status == 400 and info.value.body.error.param == "max_tokens"
    assert AccessGate.max_tokens(account(TenantPolicy()), None) is None


def test_an_unset_max_tokens_gets_the_models_default_within_the_tenant_cap() -> None:
    assert default_max_tokens(SamplingParams(), 1024) == 1024
    assert default_max_tokens(SamplingParams(max_tokens_cap=64), 1024) == 64
    assert default_max_tokens(SamplingParams(max_tokens_cap=4096), 1024) == 1024
    assert default_max_tokens(SamplingParams(max_tokens_cap=64), None) == 64
    assert default_max_tokens(SamplingParams(), None) is None


def test_reset_durations_use_openai_format() -> None:
    assert [reset_duration(s) for s in (0.02, 1.5, 12, 360)] == ["20ms", "1.5s", "12s", "6m0s"]


# --- CLI helpers ---------------------------------------------------------------------------------------


def test_dev_secret_is_generated_once_private_and_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELSERVE_JWT_SECRET", raising=False)
    monkeypatch.delenv("MODELSERVE_JWT_SECRET_FILE", raising=False)
    state = tmp_path / "state"
    first = dev_secret(state)
    assert len(first) >= 32 and dev_secret(state) == first
    assert stat.S_IMODE((state / "jwt-secret").stat().st_mode) == 0o600
    assert sorted(p.name for p in state.iterdir()) == ["jwt-secret"]
    assert dev_secret(tmp_path / "other") != first
    (tmp_path / "file-secret").write_text(SECRET_2 + "\n")
    monkeypatch.setenv("MODELSERVE_JWT_SECRET_FILE", str(tmp_path / "file-secret"))
    assert dev_secret(state) == SECRET_2
    monkeypatch.setenv("MODELSERVE_JWT_SECRET", SECRET_1)
    assert dev_secret(state) == SECRET_1


def test_minted_tokens_verify_and_expire(keys: dict[str, Any]) -> None:
    token = mint_token(SECRET_1, "dev", ["admin"], parse_ttl("1h"), kid="k1")
    assert jwt.get_unverified_header(token)["kid"] == "k1"
    principal = authenticate(authenticator(keys), bearer(token))
    assert principal.tenant == "dev" and principal.is_admin
    assert [parse_ttl(t) for t in ("90", "90s", "30m", "1h", "7d")] == [90, 90, 1800, 3600, 604800]
    for bad in ("0", "1w", "-5m", "soon"):
        with pytest.raises(ValueError, match="invalid TTL"):
            parse_ttl(bad)


def unsynced_copy(tmp_path: Path) -> Path:
    """The committed serve_config.yaml without its synced ingress user_config (the block up to the blank line)."""
    text = (Path(__file__).resolve().parents[2] / "serve_config.yaml").read_text()
    config = tmp_path / "serve_config.yaml"
    start = text.index("    deployments:\n")
    config.write_text(text[:start] + text[text.index("\n\n", start) + 1 :])
    return config


def test_committed_serve_config_carries_the_default_policy() -> None:
    root = Path(__file__).resolve().parents[2]
    assert sync_policy(root / "serve_config.yaml", root / "policies" / "default.yaml", None, check=True) == []


def test_policy_sync_inlines_the_file_keeps_comments_and_checks(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    config = unsynced_copy(tmp_path)
    unsynced = config.read_text()
    before = yaml.safe_load(unsynced)
    policy = root / "policies" / "default.yaml"
    assert sync_policy(config, policy, None, check=True) == ["modelserve"]
    assert config.read_text() == unsynced  # --check writes nothing
    assert sync_policy(config, policy, None, check=False) == ["modelserve"]
    after = yaml.safe_load(config.read_text())
    ingress = next(d for d in after["applications"][0]["deployments"] if d["name"] == "ingress")
    assert ingress["user_config"] == yaml.safe_load(policy.read_text())
    after["applications"][0].pop("deployments")
    assert after == before  # nothing else changed
    assert "# Merged under the model entry" in config.read_text() and "&model_defaults" in config.read_text()
    assert sync_policy(config, policy, None, check=True) == []
    other = root / "policies" / "example-multitenant.yaml"
    assert sync_policy(config, other, None, check=True) == ["modelserve"]
    broken = tmp_path / "broken.yaml"
    broken.write_text("tenants: {dev: {max_tokens: -1}}\n")
    with pytest.raises(ConfigError, match="tenants.dev.max_tokens"):
        sync_policy(config, broken, None, check=False)
    shadowed = yaml.safe_load(config.read_text())
    shadowed["applications"][0]["args"]["access"] = {}
    config.write_text(yaml.safe_dump(shadowed))
    with pytest.raises(ConfigError, match="args.access"):
        sync_policy(config, policy, None, check=False)


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_mints_tokens_and_api_keys_the_ingress_accepts(
    keys: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODELSERVE_JWT_SECRET_FILE", str(keys["secret_dir"]))
    monkeypatch.delenv("MODELSERVE_JWT_SECRET", raising=False)
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"auth": {"issuer": "https://idp.test/", "audience": "ms"}}))
    args = cli("token", "--tenant", "dev", "--role", "admin", "--ttl", "30m", "--kid", "k2", "--policy", str(policy))
    assert args.func(args) == 0
    minted = capsys.readouterr().out.strip()
    settings = AuthSettings(issuer="https://idp.test/", audience=["ms"])
    auth = Authenticator(settings, {}, environ={"MODELSERVE_JWT_SECRET_FILE": str(keys["secret_dir"])})
    assert authenticate(auth, bearer(minted)) == Principal("dev", frozenset({"admin"}), "dev")
    assert 1790 <= jwt.decode(minted, options={"verify_signature": False})["exp"] - time.time() <= 1800
    args = cli("token", "--tenant", "dev", "--kid", "k9")
    assert args.func(args) == 1 and "no key k9" in capsys.readouterr().err

    args = cli("api-key", "--tenant", "batch", "--name", "nightly")
    assert args.func(args) == 0
    out = capsys.readouterr()
    key = out.err.split("shown once, store it in your secret manager): ")[1].split()[0]
    document = parse_policy({"api_keys": yaml.safe_load(out.out)})
    assert key not in out.out  # only the hash goes into the policy
    auth = Authenticator(AuthSettings(), document.api_key_principals(), environ={"MODELSERVE_JWT_SECRET": SECRET_1})
    assert authenticate(auth, bearer(key)) == Principal("batch", frozenset(), "api-key:nightly")


def test_cli_policy_sync_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parents[2]
    config = unsynced_copy(tmp_path)
    policy = str(root / "policies" / "default.yaml")
    check = cli("policy", "sync", "--config", str(config), "--policy", policy, "--check")
    assert check.func(check) == 1 and "run `modelserve policy sync`" in capsys.readouterr().err
    sync = cli("policy", "sync", "--config", str(config), "--policy", policy)
    assert sync.func(sync) == 0 and "serve deploy" in capsys.readouterr().out
    assert check.func(check) == 0
    broken = cli("policy", "sync", "--config", str(tmp_path / "missing.yaml"), "--policy", policy)
    assert broken.func(broken) == 1 and "error:" in capsys.readouterr().err
