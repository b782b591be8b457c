"""CLI for access control: mint dev tokens, make API keys, and sync policy files into serve_config.yaml.

The policy reaches the ingress as its Serve `user_config`, set in serve_config.yaml under
`applications[].deployments[{name: ingress}]`. `modelserve policy sync` inlines a policy file there
(keeping the file's comments), so `serve deploy serve_config.yaml` reloads it in place: a
user_config-only change calls `reconfigure()` on the running replicas and restarts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Iterable
from io import StringIO
from pathlib import Path
from typing import Any

import jwt
import platformdirs
import yaml

from deployments.strict import ConfigError
from serve_app.access.authn import api_key_hash
from serve_app.access.keys import SECRET_ENV, SECRET_FILE_ENV, AuthSettings
from serve_app.access.policy import load_policy_file, parse_policy
from serve_app.cli.serve_file import ingress_applications, load_serve_config
from serve_app.config import INGRESS_DEPLOYMENT

DEV_SECRET_FILE = "jwt-secret"
DEFAULT_POLICY = "policies/default.yaml"
_TTL = re.compile(r"^(\d+)([smhd]?)$")


def state_dir() -> Path:
    return Path(platformdirs.user_state_dir("modelserve"))


def parse_ttl(text: str) -> int:
    """'90', '90s', '30m', '1h', '7d' -> seconds."""
    match = _TTL.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"invalid TTL {text!r}: use a positive number with s, m, h or d (e.g. 1h)")
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def signing_secret(state: str | Path, kid: str | None = None) -> tuple[str | None, str]:
    """(kid, secret) to sign dev tokens with, found the way the ingress finds its verification secrets.

    MODELSERVE_JWT_SECRET, else MODELSERVE_JWT_SECRET_FILE (a directory: the `kid` file, or the newest),
    else a secret generated once into the state dir (0600) — never a hard-coded one.
    """
    if os.environ.get(SECRET_ENV):
        return None, os.environ[SECRET_ENV]
    if os.environ.get(SECRET_FILE_ENV):
        path = Path(os.environ[SECRET_FILE_ENV])
        if not path.is_dir():
            return None, path.read_text(encoding="utf-8").strip()
        files = [p for p in path.iterdir() if not p.name.startswith(".") and p.is_file()]
        chosen = next((p for p in files if p.name == kid), None) if kid else max(files, key=_mtime, default=None)
        if chosen is None:
            raise ValueError(f"{SECRET_FILE_ENV} directory {path} has no key {kid or ''}".rstrip())
        return chosen.name, chosen.read_text(encoding="utf-8").strip()
    return None, _generated_secret(Path(state))


def dev_secret(state: str | Path) -> str:
    """The HS256 secret `modelserve up` deploys with and `modelserve token` signs with."""
    return signing_secret(state)[1]


def dev_secret_env(state: str | Path) -> dict[str, str]:
    """Environment for the Ray processes `modelserve up` starts: point them at the generated secret file."""
    if os.environ.get(SECRET_ENV) or os.environ.get(SECRET_FILE_ENV):
        return {}
    _generated_secret(Path(state))
    return {SECRET_FILE_ENV: str(Path(state) / DEV_SECRET_FILE)}


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def _generated_secret(state: Path) -> str:
    """Read the state dir's secret, creating it first (0600, atomically, race-free) if absent."""
    target = state / DEV_SECRET_FILE
    if not target.exists():
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=state, prefix=".jwt-secret-")  # mkstemp creates it 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(secrets.token_urlsafe(48))
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, target)  # fails if another process won the race; then we read theirs
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return target.read_text(encoding="utf-8").strip()


def mint_token(
    secret: str,
    tenant: str,
    roles: Iterable[str],
    ttl_s: int,
    *,
    kid: str | None = None,
    settings: AuthSettings | None = None,
) -> str:
    """An HS256 JWT for `tenant`, valid from now for `ttl_s`, with the claims `settings` expects."""
    settings = settings or AuthSettings()
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": tenant,
        settings.tenant_claim: tenant,
        settings.roles_claim: list(roles),
        "iat": now,
        "nbf": now,
        "exp": now + ttl_s,
    }
    if settings.issuer:
        claims["iss"] = settings.issuer
    if settings.audience:
        claims["aud"] = settings.audience[0]
    return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": kid} if kid else None)


def _policy_auth(path: str | None) -> AuthSettings:
    if path is None:
        return AuthSettings()
    return parse_policy(load_policy_file(path), path).auth


def _token(args: argparse.Namespace) -> int:
    try:
        ttl_s = parse_ttl(args.ttl)
        policy = args.policy if args.policy or not Path(DEFAULT_POLICY).exists() else DEFAULT_POLICY
        settings = _policy_auth(policy)
        if ttl_s > settings.max_token_lifetime_s:
            raise ValueError(f"--ttl {args.ttl} is longer than the policy's auth.max_token_lifetime_s "
                             f"({settings.max_token_lifetime_s:g} s): the ingress would refuse the token")
        kid, secret = signing_secret(args.state_dir, args.kid)
        print(mint_token(secret, args.tenant, args.role or [], ttl_s, kid=kid, settings=settings))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _api_key(args: argparse.Namespace) -> int:
    key = "msk-" + secrets.token_urlsafe(32)
    entry = {"name": args.name, "sha256": api_key_hash(key), "tenant": args.tenant, "roles": args.role or []}
    print(f"API key (shown once, store it in your secret manager): {key}", file=sys.stderr)
    print("Add this entry under api_keys: in the policy file, then `modelserve policy sync`:", file=sys.stderr)
    print(yaml.safe_dump([entry], sort_keys=False), end="")
    return 0


def sync_policy(config_path: str | Path, policy_path: str | Path, app_name: str | None, check: bool) -> list[str]:
    """Inline a policy file into the ingress user_config of each modelserve app; returns what changed.

    With `check`, nothing is written: the returned list names the apps that are out of sync.
    """
    policy = load_policy_file(policy_path)
    plain = load_serve_config(config_path)
    apps = [a for a in ingress_applications(plain) if app_name in (None, a.get("name"))]
    if not apps:
        raise ConfigError(f"{config_path}: no modelserve ingress application{f' named {app_name!r}' if app_name else ''}")
    for app in apps:
        if (app.get("args") or {}).get("access") is not None:
            raise ConfigError(
                f"{config_path}: application {app.get('name')!r} sets args.access; remove it, the policy lives "
                f"in the ingress user_config (a change in args restarts the ingress)"
            )
    stale = [str(a.get("name")) for a in apps if _ingress_user_config(a) != policy]
    if check or not stale:
        return stale
    _write_user_config(Path(config_path), {str(a.get("name")) for a in apps}, policy, str(policy_path))
    return stale


def _ingress_user_config(app: dict[str, Any]) -> Any:
    entry = next((d for d in app.get("deployments") or [] if d.get("name") == INGRESS_DEPLOYMENT), {})
    return entry.get("user_config")


def _keep_anchors(node: Any) -> None:
    """ruamel drops an anchor nothing refers to yet (e.g. `&model_defaults` with one model): keep them all."""
    if getattr(node, "anchor", None) is not None and node.anchor.value:
        node.anchor.always_dump = True
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        _keep_anchors(child)


def _write_user_config(path: Path, app_names: set[str], policy: dict[str, Any], source: str) -> None:
    """Round-trip edit keeping comments and layout; verify the result parses as intended; replace atomically."""
    try:
        from ruamel.yaml import YAML
        from ruamel.yaml.comments import CommentedMap, CommentedSeq
    except ImportError:
        raise ConfigError(
            "`policy sync` edits YAML keeping comments with ruamel.yaml: pip install ruamel.yaml"
        ) from None

    editor = YAML()
    editor.indent(mapping=2, sequence=4, offset=2)
    editor.width = 4096
    editor.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = editor.load(path.read_text(encoding="utf-8"))
    _keep_anchors(document)
    for app in document["applications"]:
        if app.get("name") not in app_names:
            continue
        deployments = app.setdefault("deployments", CommentedSeq())
        entry = next((d for d in deployments if d.get("name") == INGRESS_DEPLOYMENT), None)
        if entry is None:
            entry = CommentedMap(name=INGRESS_DEPLOYMENT)
            deployments.append(entry)
        entry["user_config"] = editor.load(yaml.safe_dump(policy, sort_keys=False))
        entry.yaml_add_eol_comment(f"from {source} by `modelserve policy sync`: edit that file", "user_config")
    out = StringIO()
    editor.dump(document, out)
    text = out.getvalue()
    for app in ingress_applications(yaml.safe_load(text)):
        if app.get("name") in app_names and _ingress_user_config(app) != policy:
            raise ConfigError(f"{path}: the rewritten file does not carry the policy as intended; nothing written")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _policy_sync(args: argparse.Namespace) -> int:
    try:
        stale = sync_policy(args.config, args.policy, args.app, args.check)
    except (ConfigError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.check:
        if stale:
            print(
                f"{args.config}: ingress user_config of {', '.join(stale)} differs from {args.policy}; "
                f"run `modelserve policy sync`",
                file=sys.stderr,
            )
            return 1
        print(f"{args.config} is in sync with {args.policy}")
        return 0
    if stale:
        print(f"updated {args.config} ({', '.join(stale)}) from {args.policy}; apply with: serve deploy {args.config}")
    else:
        print(f"{args.config} already matches {args.policy}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `token`, `api-key` and `policy sync` to the main CLI."""
    token = subparsers.add_parser("token", help="mint a dev JWT (HS256) from the configured secret")
    token.add_argument("--tenant", required=True)
    token.add_argument("--role", action="append", help="repeatable, e.g. --role admin")
    token.add_argument("--ttl", default="1h", help="lifetime: 90s, 30m, 1h, 7d (default 1h)")
    token.add_argument("--kid", help=f"key id (a file name in the {SECRET_FILE_ENV} directory)")
    token.add_argument(
        "--policy", help=f"policy whose auth settings (iss, aud, claims) to follow; default {DEFAULT_POLICY} if present"
    )
    token.add_argument("--state-dir", type=Path, default=state_dir(), help="where `up` keeps its generated secret")
    token.set_defaults(func=_token)

    api_key = subparsers.add_parser("api-key", help="make a static API key and the hashed policy entry for it")
    api_key.add_argument("--tenant", required=True)
    api_key.add_argument("--name", required=True, help="label for the audit log, e.g. batch-jobs")
    api_key.add_argument("--role", action="append")
    api_key.set_defaults(func=_api_key)

    policy = subparsers.add_parser("policy", help="access policy files")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    sync = policy_commands.add_parser(
        "sync", help="inline a policy file into serve_config.yaml's ingress user_config (then `serve deploy`)"
    )
    sync.add_argument("--policy", default=DEFAULT_POLICY)
    sync.add_argument("--config", default="serve_config.yaml")
    sync.add_argument("--app", help="only this application (default: every modelserve application)")
    sync.add_argument("--check", action="store_true", help="write nothing; exit 1 if the config is out of sync")
    sync.set_defaults(func=_policy_sync)
