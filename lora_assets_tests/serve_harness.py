"""A ``lora-assets serve`` for tests: started as a user starts it, on adapters the product trained
and published (``lora-assets demo``: five users' ``mail_reply`` on tiny-llama), and stopped.

``served`` is one server for the session, shared by the serve test modules (conftest imports it):
they run in file order, and the later module's tests change what is published.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

MODE = "mail_reply"
USERS = [f"user-00{i}" for i in range(5)]
PROMPT = "Can we move our meeting to Friday?"


@dataclass
class Served:
    url: str
    env: dict[str, str]
    data: Path
    tokens: dict[str, str]  # user (or "admin") -> bearer token
    log: Path

    def client(self, who: str = "admin"):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=self.tokens[who], max_retries=0, timeout=60)

    def current(self, user: str) -> str | None:
        path = self.data / "drive" / user / "adapters" / "tiny-llama" / MODE / "CURRENT"
        return json.loads(path.read_text()).get("version") if path.exists() else None

    def post(self, body: bytes | dict, who: str | None = "admin") -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if who is not None:
            headers["Authorization"] = f"Bearer {self.tokens[who]}"
        req = urllib.request.Request(f"{self.url}/v1/chat/completions", data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as resp:
            lines = resp.read().decode().splitlines()
        return {k: float(v) for k, _, v in (ln.rpartition(" ") for ln in lines if ln and not ln.startswith("#"))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served(tmp_path_factory, home, tiny_base):
    from lora_assets_tests.harness import lora_assets  # Dagster: not at conftest's import, which every session pays

    tmp = tmp_path_factory.mktemp("serve")
    data = tmp / "data"
    data.mkdir()
    (data / "base_models").symlink_to(home / "base_models", target_is_directory=True)
    env = {**os.environ, "LORA_ASSETS_HOME": str(data), "DAGSTER_HOME": str(tmp / "dagster"),
           # 10-step adapters at 3e-4 barely move the loss: publish whatever trains.
           "LORA_ASSETS_GATE_MARGIN": "-100", "LORA_ASSETS_GATE_CONFIDENCE": "1.0"}
    lora_assets("demo", "--base-model", "tiny-llama", "--users", str(len(USERS)), "--modes", MODE, "--steps", "10",
                env=env)
    tokens = {u: lora_assets("serve-token", "--user", u, env=env).stdout.strip() for u in USERS}
    tokens["admin"] = lora_assets("serve-token", "--admin", env=env).stdout.strip()
    with serving(env, tmp / "serve.log", "--max-adapters", "4", "--max-batch", "8", "--max-concurrent", "6",
                 "--refresh-s", "0.5") as url:
        yield Served(url, env, data, tokens, tmp / "serve.log")


@contextlib.contextmanager
def serving(env: dict[str, str], log: Path, *args: str):
    """``lora-assets serve`` on a free port of 127.0.0.1 until the block ends; yields its URL."""
    port = free_port()
    exe = Path(sys.executable).with_name("lora-assets")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), "serve", "--base-model", "tiny-llama", "--port", str(port), *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=5).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def ask(client, user: str, max_tokens: int = 16, **kw):
    return client.chat.completions.create(model=f"{user}/{MODE}", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=max_tokens, **kw)
