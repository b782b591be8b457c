"""CORS is off by default and, when origins are configured, answers preflights before authentication (no Ray)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serve_app.ingress.cors import CorsGate, CorsSettings

ORIGIN = "https://chat.example.com"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}


def client(cors: CorsSettings | None) -> TestClient:
    """An app that refuses everything with 401, as the ingress does without a token."""

    async def refuse(_: Request) -> JSONResponse:
        return JSONResponse({"error": {"message": "no", "type": "invalid_request_error", "param": None,
                                       "code": "invalid_api_key"}}, 401)

    app = Starlette(routes=[Route("/v1/chat/completions", refuse, methods=["GET", "POST", "OPTIONS"])])
    app.add_middleware(CorsGate)
    app.state.cors = cors
    return TestClient(app)


@pytest.mark.parametrize("cors", [None, CorsSettings()])
def test_without_origins_there_is_no_cors(cors: CorsSettings | None) -> None:
    response = client(cors).options("/v1/chat/completions", headers=PREFLIGHT)
    assert response.status_code == 401
    assert not [name for name in response.headers if name.startswith("access-control-")]


def test_configured_origins_get_preflights_answered_without_a_token() -> None:
    http = client(CorsSettings(allow_origins=[ORIGIN]))
    preflight = http.options("/v1/chat/completions", headers=PREFLIGHT)
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    refused = http.post("/v1/chat/completions", headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN  # readable
    stranger = http.options("/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example.net"})
    assert "access-control-allow-origin" not in stranger.headers


@pytest.mark.parametrize("origin", ["chat.example.com", "https://chat.example.com/app", "ftp://x.y"])
def test_an_origin_must_be_scheme_host_and_port(origin: str) -> None:
    with pytest.raises(ValidationError, match="not an origin"):
        CorsSettings(allow_origins=[origin])
