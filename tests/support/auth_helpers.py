"""JWT test material shared by the auth unit tests and the end-to-end tests: secrets, key pairs, forged tokens."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import http.server
import json
import threading
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


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 whose key set the test can rotate, or that misbehaves; counts fetches.

    `delay_s` holds each answer back; `raw` replaces the document with any bytes; `trickle_s` sends the
    body a byte at a time with that pause (each read within a socket timeout, the whole far longer).
    """

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.fetches = 0
        self.delay_s = self.trickle_s = 0.0
        self.raw: bytes | None = None
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                time.sleep(outer.delay_s)
                body = json.dumps(outer.document).encode() if outer.raw is None else outer.raw
                with contextlib.suppress(OSError):  # the client gave up (waiting for a slow answer, or a trickle)
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if not outer.trickle_s:
                        self.wfile.write(body)
                        return
                    for byte in body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(outer.trickle_s)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.running = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        """The endpoint goes down: connections are refused from now on."""
        if self.running:
            self.running = False
            self.server.shutdown()
            self.server.server_close()
