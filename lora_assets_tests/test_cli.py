"""The lora-assets command, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def lora_assets(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lora-assets")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def cli_env(tmp_path, home, tiny_base) -> dict[str, str]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "base_models").symlink_to(home / "base_models", target_is_directory=True)
    return {**os.environ, "LORA_ASSETS_HOME": str(data), "DAGSTER_HOME": str(tmp_path / "dagster")}


def test_demo_trains_through_dagster_and_generate_uses_the_adapter(cli_env):
    from dagster import DagsterInstance, RunsFilter

    done = lora_assets(
        "demo", "--base-model", "tiny-llama", "--users", "1", "--modes", "search_suggest", "--steps", "3",
        env=cli_env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line.split() for line in done.stdout.splitlines() if line.startswith("user-000")]
    assert table and table[0][:3] == ["user-000", "search_suggest", "tiny-llama"]
    assert "step 3/3" in done.stderr  # per-adapter progress

    os.environ["DAGSTER_HOME"] = cli_env["DAGSTER_HOME"]
    instance = DagsterInstance.get()
    runs = instance.get_run_records(RunsFilter(tags={"lora_assets/launched_by": "cli"}))
    assert len(runs) == 2 and all(r.dagster_run.is_success for r in runs)
    assert instance.get_dynamic_partitions("users") == ["user-000"]

    out = lora_assets(
        "generate", "--user", "user-000", "--mode", "search_suggest", "--base-model", "tiny-llama",
        "--max-new-tokens", "5", "Complete my search: best", env=cli_env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip()


def test_generate_without_an_adapter_says_so(cli_env):
    out = lora_assets(
        "generate", "--user", "nobody", "--mode", "mail_reply", "--base-model", "tiny-llama", "hi", env=cli_env
    )
    assert out.returncode == 1
    assert "no mail_reply adapter for user 'nobody'" in out.stderr


def test_bad_user_id_is_a_clear_error(cli_env):
    out = lora_assets("generate", "--user", "../etc", "--mode", "mail_reply", "--base-model", "tiny-llama", "x", env=cli_env)
    assert out.returncode == 2
    assert "invalid user id '../etc'" in out.stderr
