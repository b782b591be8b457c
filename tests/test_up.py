"""The README's first command on a machine where nothing of Ray ever ran: `modelserve up`, a chat, down, up again.

Runs with HOME set to an empty directory (no ~/.ray/auth_token, no generated JWT secret) and with
no Ray or modelserve variables, the way a new user's shell is. It goes first in the session
(`machine_ray`): `modelserve down` runs `ray stop`, which ends every Ray process on the machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gemma-3-270m"
_FOREIGN = ("RAY_", "MODELSERVE_", "AWS_", "XDG_")


def fresh_user_env(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(_FOREIGN)}
    bin_dir = str(Path(sys.executable).parent)  # where pip put `modelserve`, `ray` and `serve`
    return {**env, "HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}


def modelserve(env: dict[str, str], *argv: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "modelserve"), *argv],
        cwd=ROOT, env=env, text=True, capture_output=True, timeout=timeout, check=False,
    )


def ray_running(env: dict[str, str]) -> bool:
    return subprocess.run(["ray", "status"], env=env, capture_output=True, timeout=120, check=False).returncode == 0


def up_and_chat(env: dict[str, str]) -> None:
    up = modelserve(env, "up")
    assert up.returncode == 0, f"modelserve up failed:\n{up.stdout}\n{up.stderr}"
    assert "modelserve is up" in up.stdout
    token = re.search(r"export TOKEN=(\S+)", up.stdout)
    curl = re.search(r"^curl (http://\S+/v1/chat/completions)", up.stdout, re.MULTILINE)
    assert token and curl, up.stdout
    base = curl.group(1).removesuffix("/chat/completions")
    client = openai.OpenAI(base_url=base, api_key=token.group(1), max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens >= 1


@pytest.mark.machine_ray
def test_up_chat_down_up_on_a_fresh_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = fresh_user_env(home)
    assert not ray_running(env), "a Ray is already running here; this test starts and stops the machine's Ray"
    try:
        up_and_chat(env)
        assert (home / ".ray" / "auth_token").is_file()  # created by `up`: `ray start` never makes one
        down = modelserve(env, "down", timeout=300)
        assert down.returncode == 0, down.stderr
        assert not ray_running(env)
        up_and_chat(env)  # and again after `down`, reusing the token and the JWT secret
    finally:
        modelserve(env, "down", timeout=300)
