"""JWT test material shared by the auth unit tests and the end-to-end tests: secrets, key pairs, forged tokens."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from serve_app.access.authn import Authenticator, Principal
from serve_app.access.keys import AuthSettings

SECRET_1 = "k1-" + "a" * 40
SECRET_2 = "k2-" + "b" * 40


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A token built by hand, for the attacks pyjwt refuses to produce (alg none, HS256 keyed by a PEM)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def claims(tenant: str = "team-a", ttl_s: int = 300, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": f"user@{tenant}", "tenant": tenant, "roles": [], "iat": now, "exp": now + ttl_s, **extra}


def write_keys(root: Path) -> dict[str, Any]:
    """Two HMAC secrets in a kid directory (a mounted Secret), an RSA and an EC key pair as PEM files."""
    secret_dir = root / "jwt-secrets"
    secret_dir.mkdir()
    (secret_dir / "k1").write_text(SECRET_1)
    (secret_dir / "k2").write_text(SECRET_2)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pems = {}
    for name, private in (("rsa", rsa_key), ("ec", ec_key)):
        pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        (root / f"{name}.pem").write_bytes(pem)
        pems[name] = pem
    return {
        "secret_dir": secret_dir,
        "rsa": rsa_key,
        "ec": ec_key,
        "rsa_pem": pems["rsa"],
        "rsa_path": root / "rsa.pem",
        "ec_path": root / "ec.pem",
    }


def authenticator(keys: dict[str, Any], api_keys: dict[str, Principal] | None = None, **auth: Any) -> Authenticator:
    """An authenticator that knows the keys of `write_keys` (HS256 kid files, RS256 and ES256 PEMs)."""
    settings = AuthSettings.model_validate(
        {
            "algorithms": ["HS256", "RS256", "ES256"],
            "public_key_files": {"rsa-1": str(keys["rsa_path"]), "ec-1": str(keys["ec_path"])},
            **auth,
        }
    )
    return Authenticator(settings, api_keys or {}, environ={"MODELSERVE_JWT_SECRET_FILE": str(keys["secret_dir"])})


def authenticate(auth: Authenticator, header: str | None) -> Principal:
    return asyncio.run(auth.authenticate(header))


def bearer(token: str) -> str:
    return f"Bearer {token}"
