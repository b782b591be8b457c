"""Bad input gets an OpenAI error object with the right status, never a 500 or a crash."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.strict import ConfigError
from serve_app.app import build_app, build_model_app
from serve_app.cli.serve_file import parse_serve_config
from tests.support.cluster import GEMMA, ROOT, TINY

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture
def post(app_url: str, auth: dict[str, str]):
    """POST a raw body (possibly not JSON at all) with a valid token."""

    def send(path: str, content: bytes | str) -> httpx.Response:
        headers = {"Content-Type": "application/json", **auth}
        return httpx.post(f"{app_url}{path}", content=content, headers=headers, timeout=60)

    return send


def assert_error(response: httpx.Response, status: int, code: str, param: str | None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    error = body["error"]
    assert error["code"] == code and error["param"] == param
    assert error["message"] and "Traceback" not in error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"model": "' + GEMMA + '"}', "messages"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "model"),
        ('{"model": "' + GEMMA + '", "messages": 5}', "messages"),
        ('{"model": "' + GEMMA + '", "messages": []}', "messages"),
        ('{"model": "' + GEMMA + '", "messages": [{"role": "wizard", "content": "hi"}]}', "messages[0].role"),
        ('{"model": "' + GEMMA + '", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}',
         "max_tokens"),
        ('{"model": "' + GEMMA + '", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
         "temperature"),
        ('{"model": "' + GEMMA + '", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
         "max_tokens"),
        ('{"model": "' + GEMMA + '", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
    ],
)
def test_invalid_chat_fields(post, body: str, param: str) -> None:
    error = assert_error(post("/v1/chat/completions", body), 400, "invalid_request", param)
    assert param.split("[")[0] in error["message"]


def test_malformed_json(post) -> None:
    assert_error(post("/v1/chat/completions", "{not json"), 400, "invalid_request", None)


def test_unknown_fields_are_ignored(post) -> None:
    body = '{"model": "%s", "prompt": "hi", "max_tokens": 2, "vendor_extension": {"x": 1}}' % TINY
    assert post("/v1/completions", body).status_code == 200


def test_unknown_model(post) -> None:
    body = '{"model": "gpt-99", "messages": [{"role": "user", "content": "hi"}]}'
    assert_error(post("/v1/chat/completions", body), 404, "model_not_found", "model")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "n": 9}' % TINY, "n"),
        ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", '
         '"json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 1}}}}' % TINY, "response_format"),
    ],
)
def test_parameters_it_cannot_serve(post, body: str, param: str) -> None:
    assert_error(post("/v1/chat/completions", body), 400, "unsupported_parameter", param)


def test_more_choices_than_the_replica_has_slots(post) -> None:
    body = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 2}' % TINY
    error = assert_error(post("/v1/chat/completions", body), 400, "invalid_request", "n")
    assert "at most 2" in error["message"]


def test_batched_prompts_rejected(post) -> None:
    body = '{"model": "%s", "prompt": ["a", "b"]}' % TINY
    assert_error(post("/v1/completions", body), 400, "unsupported_parameter", "prompt")


def test_prompt_longer_than_context(post) -> None:
    long_prompt = "word " * 600  # the tiny model's context is 256 tokens
    body = '{"model": "%s", "messages": [{"role": "user", "content": "%s"}]}' % (TINY, long_prompt)
    error = assert_error(post("/v1/chat/completions", body), 400, "context_length_exceeded", "messages")
    assert "256" in error["message"]


def test_max_tokens_beyond_context(post) -> None:
    body = '{"model": "%s", "prompt": "hello", "max_tokens": 100000}' % TINY
    assert_error(post("/v1/completions", body), 400, "context_length_exceeded", "max_tokens")


def test_unknown_route_is_an_openai_error(app_url: str, auth: dict[str, str]) -> None:
    response = httpx.get(f"{app_url}/v1/nothing-here", headers=auth, timeout=30)
    assert response.status_code == 404 and set(response.json()["error"]) == ERROR_KEYS


def _bad_config(tmp_path: Path) -> Path:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["applications"][1]["args"]["model"]["engine"]["n_ctx"] = "lots"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_modelserve_validate(tmp_path: Path) -> None:
    good = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", "validate", str(ROOT / "serve_config.yaml")],
        capture_output=True, text=True,
    )
    assert good.returncode == 0 and GEMMA in good.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", "validate", str(_bad_config(tmp_path))],
        capture_output=True, text=True,
    )
    assert bad.returncode == 1
    assert f"application '{GEMMA}'" in bad.stderr and "model.engine.n_ctx" in bad.stderr and "'lots'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_build_model_app_rejects_bad_args_naming_field_and_value() -> None:
    args = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][1]["args"]
    args["model"]["backend"] = "tensorrt"
    with pytest.raises(ConfigError) as info:
        build_model_app(args)
    assert "model.backend" in str(info.value) and "'tensorrt'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        build_app({"ingress": {"first_token_timeout_s": -1}})
    assert "ingress.first_token_timeout_s" in str(info.value) and "-1" in str(info.value)


def test_a_model_application_must_be_named_after_its_model_and_have_no_route() -> None:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    misnamed = copy.deepcopy(config)
    misnamed["applications"][1]["name"] = "gemma"
    with pytest.raises(ConfigError, match=f"application 'gemma' serves model '{GEMMA}'"):
        parse_serve_config(misnamed)
    routed = copy.deepcopy(config)
    routed["applications"][1]["route_prefix"] = "/gemma"
    with pytest.raises(ConfigError, match="route_prefix: null"):
        parse_serve_config(routed)


def test_oversized_requests_are_refused_before_anything_else(app_url: str, auth: dict[str, str]) -> None:
    body = json.dumps({"model": TINY, "prompt": "a" * (9 * 1024 * 1024), "max_tokens": 1})
    json_header = {"Content-Type": "application/json"}
    for headers in (json_header, {**json_header, **auth}):  # refused before authentication too
        response = httpx.post(f"{app_url}/v1/completions", content=body, headers=headers, timeout=60)
        assert_error(response, 413, "request_too_large", None)

    def chunked():  # no Content-Length: refused once the body passes the limit
        for start in range(0, len(body), 1024 * 1024):
            yield body[start:start + 1024 * 1024].encode()

    response = httpx.post(f"{app_url}/v1/completions", content=chunked(), headers={**json_header, **auth}, timeout=60)
    assert_error(response, 413, "request_too_large", None)
    response = httpx.get(f"{app_url}/v1/models", headers={**auth, "X-Padding": "a" * 100_000}, timeout=60)
    assert_error(response, 431, "request_header_fields_too_large", None)
    ok = httpx.post(f"{app_url}/v1/completions", json={"model": TINY, "prompt": "hi", "max_tokens": 2},
                    headers=auth, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] > 0  # serving normally afterwards


def test_openapi_document_lists_the_real_error_responses(app_url: str, auth: dict[str, str]) -> None:
    document = httpx.get(f"{app_url}/openapi.json", headers=auth, timeout=30).json()
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "429", "503"} <= set(chat) and "422" not in chat
    assert chat["429"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "403" in document["paths"]["/v1/admin/status"]["get"]["responses"]
    assert not any("422" in op["responses"] for ops in document["paths"].values() for op in ops.values())
