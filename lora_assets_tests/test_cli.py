"""The lora-assets command, run as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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
    assert "[tiny-llama|user-000/search_suggest] 3 steps, eval loss" in done.stderr  # per-adapter outcome

    os.environ["DAGSTER_HOME"] = cli_env["DAGSTER_HOME"]
    instance = DagsterInstance.get()
    runs = instance.get_run_records(RunsFilter(tags={"lora_assets/launched_by": "cli"}))
    assert len(runs) == 2 and all(r.dagster_run.is_success for r in runs)
    from lora_assets.state import open_state

    assert open_state(f"sqlite:///{cli_env['LORA_ASSETS_HOME']}/state.sqlite").user_page(None, 10) == ["user-000"]

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


@pytest.fixture
def in_process(cli_env, monkeypatch):
    """Run ``lora-assets`` commands in this process (same entry point, no interpreter start-up)."""
    from lora_assets.cli import main

    for key in ("LORA_ASSETS_HOME", "DAGSTER_HOME"):
        monkeypatch.setenv(key, cli_env[key])

    def run(*args: str) -> int:
        return main(list(args))

    return run


def test_ingest_validates_writes_and_announces(in_process, cli_env, tmp_path, capsys):
    import re

    from lora_assets.settings import Settings

    batch = tmp_path / "mail.jsonl"
    batch.write_text(
        '{"id": "m1", "sender": "Sam", "subject": "Hi", "body": "Lunch?", "reply": "Sure!"}\n'
        '{"id": "m2", "sender": "Sam", "subject": "Re", "body": "Dinner?", "reply": "Yes"}\n'
    )
    assert in_process("ingest", "--user", "alice", "--source", "mail", str(batch)) == 0
    assert re.search(r"2 upserts, 0 deletes -> store segment 1, change event \d+$", capsys.readouterr().out.strip())

    batch.write_text('{"id": "m1", "_deleted": true}\n')
    assert in_process("ingest", "--user", "alice", "--source", "mail", str(batch)) == 0
    settings = Settings.from_env()
    assert [r["id"] for r in settings.store().read("alice", "mail").to_pylist()] == ["m2"]
    assert settings.feed().pending_count() == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "m3", "sender": "Sam", "subject": "Hi", "body": "Yo"}\n{"id": "m4", "subject": 12}\n')
    assert in_process("ingest", "--user", "alice", "--source", "mail", str(bad)) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: mail record 'm4': field 'subject': must be a string, got int 12" in err
    assert settings.store().head("alice", "mail") == 2, "nothing of a bad batch is written"
    assert settings.feed().pending_count() == 2

    bad.write_text("{not json\n")
    assert in_process("ingest", "--user", "alice", "--source", "mail", str(bad)) == 2
    assert f"{bad}:1: not valid JSON" in capsys.readouterr().err


def test_base_model_add_list_retire_and_backfill(in_process, cli_env, tmp_path, capsys):
    from dagster import DagsterInstance

    from lora_assets.orchestration.registry import backfill_requests
    from lora_assets.orchestration.runs import register_users
    from lora_assets.settings import Settings

    assert in_process("backfill", "--base-model", "tiny-llama") == 2
    assert "not registered" in capsys.readouterr().err

    assert in_process("base-model", "add", "tiny-llama") == 0
    assert "registered" in capsys.readouterr().out
    instance = DagsterInstance.get()
    register_users(Settings.from_env(), ["alice", "bob"])
    assert in_process("backfill", "--base-model", "tiny-llama") == 0
    out = capsys.readouterr().out
    ((backfill_id, request),) = backfill_requests(instance).items()
    assert request["base_model"] == "tiny-llama" and f"lora_assets/backfill={backfill_id}" in out

    local = Path(cli_env["LORA_ASSETS_HOME"]) / "base_models" / "tiny-llama"
    assert in_process("base-model", "add", "my-llama", "--path", str(local)) == 0
    assert in_process("base-model", "retire", "my-llama") == 0
    capsys.readouterr()
    assert in_process("base-model", "list") == 0
    listing = capsys.readouterr().out
    assert "tiny-llama\tactive" in listing and "my-llama\tretired" in listing
    assert in_process("backfill", "--base-model", "my-llama") == 2
    assert "retired" in capsys.readouterr().err
    assert in_process("base-model", "add", "bad/key") == 2


def test_feed_lists_dead_letters(in_process, cli_env, capsys):
    from lora_assets.orchestration.resources import LoraAssetsHome

    feed = LoraAssetsHome(home=cli_env["LORA_ASSETS_HOME"]).feed()
    event = feed.append("garbage")
    feed.dead_letter(event, "undecodable change event 'garbage'")
    assert in_process("feed") == 0
    out = capsys.readouterr().out
    assert "pending events: 0" in out and f"dead letter {event}: undecodable" in out


def test_a_base_model_that_cannot_load_is_not_registered(in_process, cli_env, tmp_path, capsys):
    from dagster import DagsterInstance

    local = Path(cli_env["LORA_ASSETS_HOME"]) / "base_models" / "tiny-llama"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((local / "config.json").read_text())  # a config and nothing else
    assert in_process("base-model", "add", "bare", "--path", str(bare)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bare} cannot be used as a base model: loading the tokenizer failed")
    assert "\n" not in err
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for f in local.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            (no_weights / f.name).write_bytes(f.read_bytes())
    assert in_process("base-model", "add", "noweights", "--path", str(no_weights)) == 2
    assert "loading the weights failed" in capsys.readouterr().err
    assert "bare" not in DagsterInstance.get().get_dynamic_partitions("base_models")
    assert in_process("base-model", "list") == 0
    listing = capsys.readouterr().out
    assert "bare" not in listing and "noweights" not in listing


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ui_started_in_the_background_stops_with_its_children_on_sigterm_and_sigint(cli_env, sig):
    """As ``lora-assets ui &`` from a script: the shell starts it with SIGINT ignored."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("lora-assets")

    def as_background_job():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.setpgrp()  # its own group, so the test can find every child it leaves

    ui = subprocess.Popen([str(exe), "ui", "--port", str(port)], env=cli_env, preexec_fn=as_background_job,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("the UI did not come up")
        ui.send_signal(sig)
        assert ui.wait(timeout=60) is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _group_alive(ui.pid):
            time.sleep(0.5)
        assert not _group_alive(ui.pid), "children of lora-assets ui outlived it"
    finally:
        if _group_alive(ui.pid):
            os.killpg(ui.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
